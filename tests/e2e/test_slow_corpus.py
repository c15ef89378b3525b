"""A larger corpus end to end (opt-in: `pytest -m slow`): 8 shards of 30 samples plus the broken
corpus, two workers decoding in child processes, against a one-worker run decoding in threads."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.config import JobConfig
from pipeline.driver import run_job
from pipeline.verify import verify
from tests import corpus
from tests.e2e.helpers import ids_by_key, read_output

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
N_SHARDS, PER_SHARD, SEED = 8, 30, 61


def _job(tmp_path, out: str, **kw) -> JobConfig:
    base = dict(inputs=(f"{tmp_path}/in/*.tar",), output=str(tmp_path / out), model=kw.pop("model"),
                max_retries=1, retry_backoff=0.05, progress=False)
    return JobConfig(**base, **kw)


def test_larger_corpus_processes_vs_threads(tmp_path, ray_session, tiny_model_dir):
    corpus.make_shards(tmp_path / "in", n_shards=N_SHARDS, per_shard=PER_SHARD, seed=SEED, broken=True)
    plan = corpus.shard_plan(N_SHARDS, PER_SHARD, seed=SEED, broken=True)
    expected = {s["key"]: s for shard in plan for s in shard}
    a = run_job(_job(tmp_path, "a", model=tiny_model_dir, workers=2, decode_mode="processes", decode_threads=2,
                     batch_size=8))
    b = run_job(_job(tmp_path, "b", model=tiny_model_dir, workers=1, decode_mode="threads", decode_threads=2,
                     batch_size=5))
    assert a.ok and b.ok and a.done == b.done == N_SHARDS
    for name in ("a", "b"):
        report = verify(str(tmp_path / name))
        assert report.clean(strict=True), report.render()
        assert report.rows + report.errors == len(expected)
    out = read_output(str(tmp_path / "a"))
    rows = ids_by_key(out["rows"])
    errors = {k: r for t in out["errors"].values()
              for k, r in zip(t.column("key").to_pylist(), t.column("reason").to_pylist(), strict=True)}
    assert rows.keys().isdisjoint(errors) and set(rows) | set(errors) == set(expected)
    for key, s in expected.items():
        if s["expect"] == "ok":
            assert key in rows, key
        else:
            assert errors.get(key) == s["expect"].split(":", 1)[1], (key, errors.get(key), s["expect"])
    other = ids_by_key(read_output(str(tmp_path / "b"))["rows"])
    assert other.keys() == rows.keys()
    for k in rows:
        np.testing.assert_array_equal(rows[k], other[k], err_msg=k)
    again = run_job(_job(tmp_path, "a", model=tiny_model_dir, workers=2, batch_size=8))
    assert again.done == 0 and again.skipped == N_SHARDS
