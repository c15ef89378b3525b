"""`wintok tokenize` as a user runs it, in its own process with its own local Ray, stderr to a file:
what lands on stderr is plain lines a log can hold, and nothing that every run repeats needlessly."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests import corpus

pytestmark = pytest.mark.e2e
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_tokenize_stderr_in_a_log_file(tmp_path):
    corpus.make_shards(tmp_path / "in", n_shards=2, per_shard=3, seed=4)
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE")}
    env["PYTHONPATH"] = REPO
    log = tmp_path / "stderr.log"
    with open(log, "wb") as f:
        r = subprocess.run([sys.executable, "-m", "pipeline.cli", "tokenize", f"{tmp_path}/in/*.tar",
                            str(tmp_path / "out"), "--model", "wintok-tiny", "--workers", "1", "--batch-size", "2"],
                           stdout=subprocess.PIPE, stderr=f, env=env, cwd=REPO, timeout=300)
    err = log.read_text()
    assert r.returncode == 0, err
    assert "\r" not in err and "\x1b[" not in err, err          # no progress bars in a log
    progress = [ln for ln in err.splitlines() if ln.startswith("progress: ")]
    assert progress and progress[-1].startswith("progress: 2/2 shards (0 failed), 6 images tokenized"), err
    assert "Token authentication" not in err, err                # Ray's per-run notice
    assert sum("RANDOM weights" in ln for ln in err.splitlines()) == 1, err
