"""The CLI's promises: one line (exit 2) for a user mistake, verify reports damage, status/verify
need neither torch nor Ray, every option has help. OUTPUTs here are written by the pipeline's own
ShardSink (real Parquet, real manifests) without a model, so these tests need no Ray."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from pipeline.cli import EXIT_USAGE, build_parser, main
from pipeline.io import Storage
from pipeline.layout import RUN_FILE
from pipeline.shard.sink import ShardSink
from schemas import TokenLayout, fingerprint_digest, tokens_schema

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FP = {"schema_version": 1, "test": "cli"}


def write_output(root: str, stems: tuple[str, ...] = ("00000", "00001", "00002"), rows: int = 3,
                 errors: int = 1) -> str:
    """A committed OUTPUT: per stem `rows` rows and `errors` error records, as a run would leave it."""
    storage = Storage(root)
    digest = fingerprint_digest(FP)
    storage.put_bytes(json.dumps({"fingerprint_sha256": digest, "fingerprint": FP}).encode(), RUN_FILE)
    schema = tokens_schema(TokenLayout(pixel_ids=(1, 2, 2)), FP)
    for stem in stems:
        w = ShardSink(storage, stem, f"/in/{stem}.tar", schema, FP)
        w.add_rows({"key": [f"{stem}-{i}" for i in range(rows)], "shard": [f"/in/{stem}.tar"] * rows,
                    "sample_index": list(range(rows)), "image_hash": [bytes(16)] * rows,
                    "width": [4] * rows, "height": [4] * rows,
                    "pixel_ids": np.arange(rows * 4).reshape(rows, 1, 2, 2), "text": [None] * rows,
                    "meta": [None] * rows})
        for i in range(rows, rows + errors):
            w.add_error(f"{stem}-{i}", i, "decode", "unidentified", "not a supported image")
        w.commit(input_size=1, input_etag=None, attempts=1, seconds=0.5, run_fingerprint=digest)
        w.cleanup()
    return root


def run_cli(args: list[str], capsys) -> tuple[int, str, str]:
    rc = main(args)
    out, err = capsys.readouterr()
    return rc, out, err


def test_verify_reports_unreadable_manifests_as_problems(tmp_path, capsys):
    out = write_output(str(tmp_path / "out"))
    assert run_cli(["verify", out], capsys)[0] == 0
    (tmp_path / "out" / "_manifest" / "00000.json").write_text("{not json")
    (tmp_path / "out" / "_manifest" / "00001.json").write_text("{}")
    rc, text, err = run_cli(["verify", out], capsys)
    assert rc == 1 and "Traceback" not in err
    problems = [ln for ln in text.splitlines() if ln.startswith("PROBLEM")]
    assert len(problems) == 2
    assert "_manifest/00000.json: unreadable manifest: not JSON" in problems[0]
    assert "_manifest/00001.json: unreadable manifest: not a manifest" in problems[1]
    assert "checked 1 committed shards" in text  # the good one is still checked
    rc, text, _ = run_cli(["verify", out, "--json"], capsys)
    assert json.loads(text)["damaged_shards"] == ["00000", "00001"]


@pytest.mark.parametrize("content", ["{not json", "{}", "[1, 2]", '{"stem": 3}'])
def test_status_with_a_damaged_manifest_is_one_line(tmp_path, capsys, content):
    out = write_output(str(tmp_path / "out"))
    (tmp_path / "out" / "_manifest" / "00002.json").write_text(content)
    rc, text, err = run_cli(["status", out], capsys)
    assert rc == EXIT_USAGE and text == ""
    assert len(err.strip().splitlines()) == 1
    assert "00002.json is damaged" in err and f"wintok verify {out} --repair" in err


@pytest.mark.parametrize("cmd", ["status", "verify"])
def test_damaged_run_file_is_one_line(tmp_path, capsys, cmd):
    out = write_output(str(tmp_path / "out"), stems=("a",))
    (tmp_path / "out" / RUN_FILE).write_bytes(b"\x00garbage")
    rc, _, err = run_cli([cmd, out], capsys)
    assert rc == EXIT_USAGE and len(err.strip().splitlines()) == 1 and "--overwrite" in err


def test_repair_removes_exactly_the_damaged_shards(tmp_path, capsys):
    out = write_output(str(tmp_path / "out"), stems=("a", "b", "c", "d"))
    (tmp_path / "out" / "_manifest" / "a.json").write_text("{}")
    with open(tmp_path / "out" / "shards" / "b.parquet", "r+b") as f:
        f.truncate(100)
    before = {n: os.stat(tmp_path / "out" / "_manifest" / f"{n}.json").st_mtime_ns for n in "cd"}
    rc, text, _ = run_cli(["verify", out, "--repair"], capsys)
    assert rc == 1
    removed = sorted(ln.split()[1] for ln in text.splitlines() if ln.startswith("removed "))
    assert removed == ["_manifest/a.json", "_manifest/b.json", "errors/a.parquet", "errors/b.parquet",
                       "shards/a.parquet", "shards/b.parquet"]
    assert {n: os.stat(tmp_path / "out" / "_manifest" / f"{n}.json").st_mtime_ns for n in "cd"} == before
    assert not (tmp_path / "out" / "_lease.json").exists()
    rc, text, _ = run_cli(["verify", out], capsys)
    assert rc == 0 and "checked 2 committed shards" in text and "uncommitted" not in text


def _fresh(code: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": REPO}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)


@pytest.mark.parametrize("cmd", ["status", "verify"])
def test_status_and_verify_import_no_torch_or_ray(tmp_path, cmd):
    out = write_output(str(tmp_path / "out"))
    code = (f"import sys; from pipeline.cli import main; rc = main([{cmd!r}, {out!r}]); "
            "heavy = [m for m in ('torch', 'ray', 'transformers') if m in sys.modules]; "
            "print('RC', rc, 'HEAVY', heavy)")
    r = _fresh(code)
    assert "RC 0 HEAVY []" in r.stdout, r.stdout + r.stderr


def _one_line_exit_2(args: list[str], capsys) -> str:
    rc, out, err = run_cli(args, capsys)
    assert rc == EXIT_USAGE, (rc, out, err)
    lines = [ln for ln in err.splitlines() if not ln.startswith("wintok: warning: ")]  # e.g. a preset's
    assert len(lines) == 1 and lines[0].startswith("wintok: error: "), err
    return lines[0]


@pytest.mark.parametrize("pattern", ["{00000..00002.tar", "x}.tar", "{a,b.tar"])
def test_malformed_brace_pattern_is_one_line(tmp_path, capsys, pattern):
    err = _one_line_exit_2(["tokenize", f"{tmp_path}/{pattern}", str(tmp_path / "out"), "--model", "wintok-tiny",
                            "--no-progress"], capsys)
    assert "Unbalanced braces" in err and "{00000..00099}" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("below", [False, True])
def test_output_that_is_an_existing_file_is_one_line(tmp_path, capsys, below):
    (tmp_path / "afile").write_bytes(b"x")
    output = tmp_path / "afile" / "sub" if below else tmp_path / "afile"
    err = _one_line_exit_2(["tokenize", str(tmp_path / "in.tar"), str(output), "--model", "wintok-tiny",
                            "--no-progress"], capsys)
    assert "existing file" in err and "give a new folder" in err
    assert (tmp_path / "afile").read_bytes() == b"x"


def test_tokenize_without_a_model_is_one_line(tmp_path, capsys):
    args = [f"{tmp_path}/in.tar", str(tmp_path / "out"), "--no-progress"]
    err = _one_line_exit_2(["tokenize", *args], capsys)
    assert "tokenize needs --model" in err and "wintok embed" in err
    job = tmp_path / "job.yaml"
    job.write_text(f"inputs: [{tmp_path}/in.tar]\noutput: {tmp_path}/out\n")
    assert "tokenize needs --model" in _one_line_exit_2(["tokenize", "--job", str(job)], capsys)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("how", ["flag", "job"])
def test_a_preset_model_warns_on_stderr(tmp_path, capsys, how):
    job = tmp_path / "job.yaml"
    job.write_text(f"inputs: [{tmp_path}/nothing-*.tar]\noutput: {tmp_path}/out\nmodel: wintok-tiny\n")
    args = ["--job", str(job)] if how == "job" else [f"{tmp_path}/nothing-*.tar", str(tmp_path / "out"),
                                                    "--model", "wintok-tiny"]
    rc, _, err = run_cli(["tokenize", *args], capsys)
    assert rc == EXIT_USAGE and "no input matches" in err  # the run stops later, for its own reason
    warning = [ln for ln in err.splitlines() if "RANDOM weights" in ln]
    assert len(warning) == 1 and warning[0].startswith("wintok: warning: model 'wintok-tiny' is a preset")


def test_a_model_directory_does_not_warn(tmp_path, capsys):
    d = tmp_path / "wintok-tiny"  # a directory that happens to carry a preset's name is not a preset
    d.mkdir()
    rc, _, err = run_cli(["tokenize", f"{tmp_path}/nothing-*.tar", str(tmp_path / "out"), "--model", str(d)],
                         capsys)
    assert rc == EXIT_USAGE and "RANDOM" not in err


def test_throughput_counts_tokenized_images_only(tmp_path, capsys):
    from pipeline.driver import Summary

    only_errors = Summary(planned=1, done=1, images=0, errors=1203, wall_seconds=24.5, workers=1)
    d = only_errors.to_dict()
    assert d["images_per_second"] == 0.0 and d["samples_per_second"] == round(1203 / 24.5, 2)
    assert "throughput: 0.0 img/s" in only_errors.render()
    mixed = Summary(planned=1, done=1, images=30, errors=10, wall_seconds=2.0, workers=1).to_dict()
    assert (mixed["images_per_second"], mixed["samples_per_second"]) == (15.0, 20.0)
    out = write_output(str(tmp_path / "out"), stems=("a", "b"), rows=0, errors=5)  # 0.5 s per shard
    rc, text, _ = run_cli(["status", out, "--json"], capsys)
    st = json.loads(text)
    assert rc == 0 and st["images"] == 0 and st["sample_errors"] == 10 and st["images_per_worker_second"] == 0.0
    out = write_output(str(tmp_path / "out2"), stems=("a", "b"), rows=4, errors=4)
    assert json.loads(run_cli(["status", out, "--json"], capsys)[1])["images_per_worker_second"] == 8.0


def test_progress_without_a_terminal_is_plain_lines_every_interval(tmp_path):
    import io
    import time

    from pipeline.summary import Progress as _Progress

    log = io.StringIO()  # not a terminal: no bars
    p = _Progress(3, enabled=True, interval=0.2, stream=log)
    p.shard_done(4, 1)
    assert log.getvalue() == ""  # the first line comes after `interval` seconds, not per shard
    time.sleep(0.25)
    p.shard_done(5, 0)
    p.shard_failed()
    p.close()
    lines = log.getvalue().splitlines()
    assert len(lines) == 2, lines
    assert lines[0].startswith("progress: 2/3 shards (0 failed), 9 images tokenized, 1 sample errors; ")
    assert lines[1].startswith("progress: 3/3 shards (1 failed), 9 images tokenized, 1 sample errors; ")
    assert "\r" not in log.getvalue() and "\x1b" not in log.getvalue()
    quiet = io.StringIO()
    q = _Progress(1, enabled=False, interval=0.0, stream=quiet)
    q.shard_done(1)
    q.close()
    assert quiet.getvalue() == ""


def test_progress_on_a_terminal_uses_bars(tmp_path):
    import pty

    from pipeline.summary import Progress as _Progress

    master, slave = pty.openpty()
    with os.fdopen(slave, "w") as tty:
        p = _Progress(2, enabled=True, stream=tty)
        p.shard_done(3)
        p.close()
    out = os.read(master, 65536).decode()
    os.close(master)
    assert "shards" in out and "\r" in out and "progress: " not in out


def test_every_option_has_help():
    seen = []

    def walk(parser: argparse.ArgumentParser, where: str) -> None:
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    walk(sub, f"wintok {name}")
            elif action.dest != "help":
                seen.append(action)
                assert action.help, f"{where} {'/'.join(action.option_strings) or action.dest} has no help text"

    walk(build_parser(), "wintok")
    assert len(seen) > 50  # the walk reached every subcommand's options
