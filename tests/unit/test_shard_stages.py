"""pipeline/shard/: the threaded-stage helper, and the shard processor without Ray."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from pipeline.shard.stage import Chain, threaded

REPO = Path(__file__).resolve().parents[2]


def test_threaded_yields_in_order_and_forwards_the_exception():
    def gen():
        yield from range(5)
        raise ValueError("boom")

    got = []
    with pytest.raises(ValueError, match="boom"):
        for x in threaded(gen(), 2, "t-test"):
            assert threading.current_thread().name != "t-test"
            got.append(x)
    assert got == [0, 1, 2, 3, 4]
    assert not [t for t in threading.enumerate() if t.name == "t-test"]


def test_threaded_closed_early_stops_its_thread_and_closes_the_iterator_there():
    closed_in: list[str] = []

    def endless():
        try:
            i = 0
            while True:
                yield i
                i += 1
        finally:
            closed_in.append(threading.current_thread().name)

    it = threaded(endless(), 3, "t-endless")
    assert [next(it) for _ in range(4)] == [0, 1, 2, 3]
    t0 = time.monotonic()
    it.close()
    assert time.monotonic() - t0 < 5
    assert closed_in == ["t-endless"]
    assert not [t for t in threading.enumerate() if t.name == "t-endless"]


def test_chain_keeps_each_stages_stats():
    chain = Chain()
    src = chain.source("src", iter(range(10)))
    doubled = chain.stage("double", lambda xs: (2 * x for x in xs), src)
    assert list(chain.thread(doubled, 2, "t-chain")) == [2 * x for x in range(10)]
    chain.close()
    assert chain.stats["src"].items == chain.stats["double"].items == 10
    assert chain.stats["double"].thread == "t-chain"
    assert all(s.busy >= 0 and s.waiting >= 0 for s in chain.stats.values())


def test_shard_processor_runs_where_ray_cannot_be_imported(tmp_path):
    """A plain image without Ray can run (and benchmark) the shard path: `import ray` fails here."""
    from tests import corpus

    (shard,) = corpus.make_shards(tmp_path / "in", 1, 6, seed=3)
    script = textwrap.dedent(f"""
        import sys
        sys.modules["ray"] = None  # any `import ray` now raises ImportError
        from pipeline.protocol import ShardTask
        from pipeline.shard.encode import ModelSpec
        from pipeline.shard.processor import ShardProcessor, WorkerConfig
        from schemas import SCHEMA_VERSION
        proc = ShardProcessor(WorkerConfig(output={str(tmp_path / "out")!r}, batch_size=4, decode_threads=1,
                                           model=ModelSpec(model="wintok-tiny", device="cpu"),
                                           fingerprint={{"schema_version": SCHEMA_VERSION}}))
        res = proc.process(ShardTask({shard!r}, "00000", 1))
        proc.close()
        assert "ray" not in [m for m in sys.modules if sys.modules[m] is not None], "ray was imported"
        print(res.manifest if res.ok else res.error)
    """)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    manifest = json.loads(proc.stdout)
    assert manifest["rows"] == 6 and manifest["samples"] == 6
    assert (tmp_path / "out" / "shards" / "00000.parquet").exists()
