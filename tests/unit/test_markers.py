"""The suite's markers do what pyproject declares: `-m gpu` selects the GPU tests (and they skip
cleanly without CUDA), `-m slow` selects at least one long test, the default run selects neither."""

from __future__ import annotations

import os
import subprocess
import sys

import torch

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _pytest(*args: str) -> str:
    env = {**os.environ, "PYTHONPATH": REPO}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode in (0, 5), proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def test_gpu_and_slow_markers_select_their_tests():
    files = ["tests/e2e/test_gpu.py", "tests/e2e/test_slow_corpus.py"]
    gpu = _pytest("-m", "gpu", "--collect-only", "-q", *files)
    assert "test_gpu.py::test_cuda_fp32_matches_cpu_and_bf16_agrees" in gpu and "test_slow_corpus" not in gpu
    slow = _pytest("-m", "slow", "--collect-only", "-q", *files)
    assert "test_slow_corpus.py::" in slow and "test_gpu.py" not in slow
    default = _pytest("--collect-only", "-q", *files)
    assert "test_gpu.py::" not in default and "test_slow_corpus.py::" not in default


def test_gpu_tests_skip_cleanly_without_cuda():
    out = _pytest("-m", "gpu", "-q", "-rs", "tests/e2e/test_gpu.py")
    if torch.cuda.is_available():
        assert "2 passed" in out, out
    else:
        assert "2 skipped" in out and "needs a CUDA device" in out, out
