"""CUDA paths of the runner (pinned buffer reuse, bf16 autocast, static padding for compile).
Opt-in: `pytest -m gpu` on a machine with a GPU; without CUDA tests/conftest.py skips them."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.shard.encode import ModelSpec, Runner

pytestmark = pytest.mark.gpu


def _batches(rng, size, sizes=(8, 8, 3)):
    return [rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8) for n in sizes]


def test_cuda_fp32_matches_cpu_and_bf16_agrees():
    rng = np.random.default_rng(0)
    cpu = Runner(ModelSpec(model="wintok-small", device="cpu", dtype="fp32"))
    gpu32 = Runner(ModelSpec(model="wintok-small", device="cuda", dtype="fp32"))
    gpu16 = Runner(ModelSpec(model="wintok-small", device="cuda", dtype="bf16"))
    for batch in _batches(rng, cpu.image_size):
        a, b, c = cpu.run(batch), gpu32.run(batch), gpu16.run(batch)
        assert b["pixel_ids"].shape == a["pixel_ids"].shape == (batch.shape[0], 4, 8, 8)
        assert (a["pixel_ids"] == b["pixel_ids"]).mean() >= 0.99
        assert (a["pixel_ids"] == c["pixel_ids"]).mean() >= 0.90
        np.testing.assert_allclose(a["semantic_pooled"], b["semantic_pooled"], atol=1e-3)


def test_compiled_runner_pads_short_batches():
    rng = np.random.default_rng(1)
    plain = Runner(ModelSpec(model="wintok-tiny", device="cuda", dtype="fp32"))
    compiled = Runner(ModelSpec(model="wintok-tiny", device="cuda", dtype="fp32", compile=True))
    for batch in _batches(rng, plain.image_size):
        a, b = plain.run(batch), compiled.run(batch)
        assert b["pixel_ids"].shape[0] == batch.shape[0]
        assert (a["pixel_ids"] == b["pixel_ids"]).mean() >= 0.99
