"""`wintok download`'s user mistakes end in one line before img2dataset starts."""

from __future__ import annotations

from pipeline.cli import main


def test_missing_or_unknown_url_list_is_one_line(tmp_path, capsys):
    assert main(["download", str(tmp_path / "nope.txt"), str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err.strip() == f"wintok: error: URL list {tmp_path / 'nope.txt'} not found"
    (tmp_path / "urls.xyz").write_text("http://127.0.0.1:9/a.jpg\n")
    assert main(["download", str(tmp_path / "urls.xyz"), str(tmp_path / "out")]) == 2
    assert "give --input-format" in capsys.readouterr().err
    assert main(["download", str(tmp_path / "urls.xyz"), str(tmp_path / "out"), "--threads", "0"]) == 2
    assert not (tmp_path / "out").exists()
