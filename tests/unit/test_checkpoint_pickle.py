"""A checkpoint that torch's weights-only loader refuses: blocked pickled code or a corrupt file?

The files are written here with torch.save, in the zip and the legacy format and in pickle
protocols 0, 2 and 4 (protocol 4 imports classes with STACK_GLOBAL, which torch's weights-only
unpickler reports as 'Unsupported operand 149', not as an unsupported global)."""

from __future__ import annotations

import warnings

import pytest
import torch

from wintok_model import CheckpointError, load_model


class Custom:
    """A trainer's own config object: loading it needs this class, i.e. pickled code."""

    def __init__(self) -> None:
        self.lr = 1e-4


class Payload:
    """Unpickling this runs `code`: a malicious checkpoint."""

    def __init__(self, code: str) -> None:
        self.code = code

    def __reduce__(self):
        return (exec, (self.code,))


def _save(path, args, protocol: int, zip_format: bool) -> str:
    ckpt = {"args": args, "trainer": {"unitok": {"w": torch.zeros(2)}}}
    torch.save(ckpt, path, pickle_protocol=protocol, _use_new_zipfile_serialization=zip_format)
    return str(path)


FORMATS = [(2, True), (4, True), (2, False), (4, False), (0, False)]


@pytest.mark.parametrize(("protocol", "zip_format"), FORMATS)
def test_custom_class_is_reported_as_pickled_code(tmp_path, protocol, zip_format):
    p = _save(tmp_path / "custom.pth", Custom(), protocol, zip_format)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch notes protocols other than 2
        with pytest.raises(CheckpointError) as e:
            load_model(p)
    msg = str(e.value)
    assert "needs pickled code" in msg and "--allow-pickle" in msg and "corrupt" not in msg, msg
    assert "Custom" in msg, msg  # names what the file imports


@pytest.mark.parametrize(("protocol", "zip_format"), FORMATS)
def test_a_malicious_payload_is_refused_and_the_check_runs_nothing(tmp_path, protocol, zip_format):
    marker = tmp_path / "PWNED"
    p = _save(tmp_path / "evil.pth", Payload(f"open({str(marker)!r}, 'w').close()"), protocol, zip_format)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(CheckpointError, match="needs pickled code"):
            load_model(p)
    assert not marker.exists()


@pytest.mark.parametrize(("protocol", "zip_format"), FORMATS)
@pytest.mark.parametrize("cut", [0.3, 0.6, 0.9])
def test_a_truncated_file_is_corrupt_not_pickled_code(tmp_path, protocol, zip_format, cut):
    """Cut anywhere in a zip file, or in the pickles of a legacy one (its raw tensor bytes come
    after them: a legacy file cut there is found only when loaded with allow_pickle)."""
    whole = _save(tmp_path / "whole.pth", Custom(), protocol, zip_format)
    data = open(whole, "rb").read()
    end = len(data) if zip_format else len(data) - 8 - 8  # legacy: one float32 x2 storage (numel + bytes)
    p = tmp_path / "cut.pth"
    p.write_bytes(data[: int(end * cut)])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(CheckpointError) as e:
            load_model(str(p))
    assert str(p) in str(e.value) and "pickled code" not in str(e.value), str(e.value)
