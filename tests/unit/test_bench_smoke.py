"""benchmarks/: the cheap sections run end to end on a tiny corpus, the report re-renders the
committed results, and the in-process section's stage timing reads the stages' own stats."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def test_cheap_sections_run_and_report(tmp_path):
    """`python -m benchmarks` on 16 images: limit, decode and inproc in child processes, sampled."""
    import torch

    from benchmarks import report
    from pipeline.cluster import shape_for
    from pipeline.config import JobConfig

    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "benchmarks", "--preset", "wintok-tiny", "--images", "16", "--shard-size", "8",
           "--pool", "4", "--only", "limit,decode,inproc", "--limit-seconds", "0.1", "--work", str(tmp_path / "work"),
           "--json", str(out / "r.json"), "--markdown", str(out / "r.md"), "--png", str(out / "r.png")]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((out / "r.json").read_text())
    runs = {r["section"]: r for r in results["runs"]}
    assert list(runs) == ["limit", "decode", "inproc"] and all(r["ok"] for r in runs.values()), runs
    assert results["corpora"]["wintok-tiny"]["shards"] == 2
    assert runs["decode"]["images"] == runs["inproc"]["images"] == 16
    assert runs["limit"]["img_s"] > 0 and runs["limit"]["bare_img_s"] > 0 and runs["limit"]["matmul_tflops"] > 0
    assert 0 < runs["inproc"]["share_model"] < 1 and 0 < runs["inproc"]["share_consume"] < 1
    for r in runs.values():  # sampled from outside: the child's process tree and its CPU time
        assert r["memory_mib"]["pss_total"] > 0 and r["memory_mib"]["samples"] >= 1 and r["cpu_seconds_tree"] > 0
    # the decode section runs the pipeline's decoders: its workers x decoders per worker, in its mode
    shape = shape_for(JobConfig(inputs=("x",), model="wintok-tiny"), 2, cpus=os.cpu_count() or 1, gpus=torch.cuda.device_count())
    assert runs["decode"]["decode_threads"] == shape.actors * shape.decode_threads
    assert runs["decode"]["decode_mode"] == runs["inproc"]["decode_mode"] == shape.decode_mode
    md = (out / "r.md").read_text()
    assert "| (b) decode alone | wintok-tiny | 16 |" in md and "### Details" in md
    assert report.markdown(results) == md  # what `report` renders from the JSON is what the run wrote


def test_report_renders_the_committed_results_as_in_results_md():
    """Every table line rendered from benchmarks/results.json is in benchmarks/RESULTS.md."""
    from benchmarks import report

    results = json.loads((REPO / "benchmarks" / "results.json").read_text())
    doc = (REPO / "benchmarks" / "RESULTS.md").read_text()
    lines = [ln for ln in report.markdown(results).splitlines() if ln.startswith("|")]
    assert len(lines) > 20
    assert [ln for ln in lines if ln not in doc] == []


def test_stage_times_come_from_the_processors_stats(tmp_path):
    """The inproc section reads model, consume and write time from the stats the stages keep
    (`ShardProcessor.stats`): nothing of the worker is wrapped or patched."""
    from benchmarks.sections.inproc import StageTimes
    from pipeline.protocol import ShardTask
    from pipeline.shard import sink
    from pipeline.shard.encode import ModelSpec
    from pipeline.shard.processor import ShardProcessor, WorkerConfig
    from schemas import SCHEMA_VERSION
    from tests import corpus

    (shard,) = corpus.make_shards(tmp_path / "in", 1, 8, seed=5)
    proc = ShardProcessor(WorkerConfig(output=str(tmp_path / "out"), batch_size=4, decode_threads=1,
                                       model=ModelSpec(model="wintok-tiny", device="cpu"),
                                       fingerprint={"schema_version": SCHEMA_VERSION}))
    add_rows, run, attrs = sink.ShardSink.add_rows, proc.runner.run, set(vars(proc))
    res = proc.process(ShardTask(shard, "00000", 1))
    times = StageTimes()
    times.add(proc.stats)
    proc.close()
    assert res.ok, res
    assert json.loads(res.manifest)["rows"] == 8
    assert all(times.spent[k] > 0 for k in ("model", "consume", "write")), times
    assert times.threads["model"] and times.threads["consume"]
    assert {proc.stats[k].items for k in ("read", "decode", "write")} == {8}  # samples, rows
    assert {proc.stats[k].items for k in ("batch", "encode", "sink")} == {2}  # batches of 4
    assert sink.ShardSink.add_rows is add_rows
    assert "run" not in vars(proc.runner) and set(vars(proc)) == attrs and proc.runner.run == run


@pytest.mark.parametrize("cpus,gpus", [(2, 0), (16, 0), (16, 1), (16, 2)])
def test_sections_use_the_pipelines_worker_shape(monkeypatch, tmp_path, cpus, gpus):
    """decode and inproc take decoders, decode mode and torch threads from pipeline.cluster.shape_for
    (the bench's own copy of that rule had drifted: 1 worker x 8 threads at 16 CPUs, not 4 x 2)."""
    import torch

    from benchmarks.sections import decode, inproc
    from pipeline.cluster import shape_for
    from pipeline.config import JobConfig

    monkeypatch.setattr(os, "cpu_count", lambda: cpus)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    spec = {"corpus": {"glob": str(tmp_path / "*.tar"), "shards": 32}, "preset": "wintok-tiny", "teacher": None,
            "batch_size": 64, "decode_threads": None, "workers": None, "decode_mode": "auto"}
    shape = shape_for(JobConfig(inputs=(spec["corpus"]["glob"],), model="wintok-tiny"), 32, cpus=cpus, gpus=gpus)
    assert decode.decoders(spec) == (shape.actors * shape.decode_threads, shape.decode_mode)
    wcfg = inproc.worker_config(spec, str(tmp_path / "out"))
    assert (wcfg.decode_threads, wcfg.decode_mode, wcfg.torch_threads) == (
        shape.decode_threads, shape.decode_mode, shape.torch_threads)
