"""`wintok train` with `workers: 2`: two DDP processes under Ray Train (gloo, a local Ray of 2 CPUs)
train as one process with twice the batch, write the same output, and resume exactly.

A Ray Train run costs ~25 s of worker start-up here, so the default suite runs one (the
equality with one process) and the rank streams' resume property without Ray; the resumed
2-worker run against an uninterrupted one is `-m slow`."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import yaml

from pipeline.cli import main
from pipeline.train import TrainConfigError, TrainData, Trainer
from tests.unit.test_train import _cfg, _log, data  # noqa: F401  (data: the shards, teacher and cache fixture)
from wintok_model.checkpoint import load_model
from wintok_model.config import get_preset

# entropy off: its batch-mean term is not a mean over samples, so it alone differs between one
# batch of 8 and two of 4 (l1, l2, vq and distill are means); with it off the loss and its
# gradient are the same, and the second step checks that DDP averaged the gradients
TWO = dict(batch_size=4, steps=4, checkpoint_every=2, losses={"entropy": 0.0})


@pytest.fixture(scope="module")
def ray_local():
    """A local Ray of 2 CPUs: the suite's own when the e2e tests already started it (session-wide)."""
    import ray

    if ray.is_initialized():
        yield ray
        return
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def two_workers(data, ray_local, tmp_path_factory):  # noqa: F811
    """One uninterrupted 2-worker run of 4 steps through the CLI; its output folder and printed result."""
    tmp, shards = data
    out = tmp_path_factory.mktemp("ray") / "straight"
    cfg = _cfg(tmp, shards, out, cache=str(tmp / "cache"), workers=2, use_gpu=False, **TWO)
    path = out.parent / "train.yaml"
    fields = {k: getattr(cfg, k) for k in ("output", "model", "cache", "batch_size", "steps", "warmup", "lr",
                                           "checkpoint_every", "log_every", "augment", "shuffle_buffer", "seed",
                                           "threads", "losses", "workers", "use_gpu")}
    path.write_text(yaml.safe_dump({"inputs": list(cfg.inputs), **fields}))
    return out, path


def _run_cli(path, capsys) -> dict:
    assert main(["train", str(path), "--json"]) == 0
    text = capsys.readouterr().out
    return json.loads(text[text.index("{\n"):])


def test_two_workers_train_as_one_process_with_twice_the_batch(data, two_workers, tmp_path, capsys):  # noqa: F811
    tmp, shards = data
    out, path = two_workers
    result = _run_cli(path, capsys)
    one = Trainer(_cfg(tmp, shards, tmp_path / "one", cache=str(tmp / "cache"),
                       **{**TWO, "batch_size": 8, "steps": 2}))
    single = [one.train_step(), one.train_step()]
    log = {r["step"]: r for r in _log(out)}
    assert sorted(log) == [1, 2, 3, 4]
    for step, ref in enumerate(single, 1):  # the same 8 samples per step, gradients averaged over the 2
        for k in ("l1", "l2", "vq", "distill", "loss"):
            assert log[step][k] == pytest.approx(ref[k], rel=1e-4), (step, k)
    assert result["steps"] == 4 and result["last"]["loss"] == pytest.approx(log[4]["loss"], rel=1e-5)
    assert set(result) == set(one.run().keys())  # the driver prints what one process does
    final = load_model(str(out / "final"))
    ckpt = load_model(str(out / "checkpoints" / "step-0000004" / "model"))
    for (name, a), (_, b) in zip(final.state_dict().items(), ckpt.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    state = json.loads((out / "checkpoints" / "step-0000002" / "state.json").read_text())
    # 12 samples an epoch, 6 per rank: two steps of 4 cross into epoch 1 on both ranks
    assert state["ranks"] == [[1, 3], [1, 4]] and (out / "loss.png").exists()


def test_rank_streams_split_the_epoch_and_resume_anywhere(data):  # noqa: F811
    tmp, shards = data
    d = TrainData(_cfg(tmp, shards, tmp / "unused", augment=True, shuffle_buffer=3),
                  get_preset("wintok-tiny").image_size)
    full = {pos: ex.student for pos, ex in d.stream(0)}
    ranks = [{pos: ex.student for pos, ex in d.stream(0, 0, r, 2)} for r in (0, 1)]
    assert sorted(full) == list(range(12))
    assert sorted(ranks[0]) == list(range(0, 12, 2)) and sorted(ranks[1]) == list(range(1, 12, 2))
    for r in ranks:  # each rank's sample at a position is the one-process sample there, augmentation included
        for pos, pixels in r.items():
            assert (pixels == full[pos]).all(), pos
    tail = {pos: ex.student for pos, ex in d.stream(0, 5, 1, 2)}  # a resumed rank 1 at position 5
    assert sorted(tail) == [5, 7, 9, 11] and all((tail[p] == ranks[1][p]).all() for p in tail)


@pytest.mark.slow
def test_a_resumed_two_worker_run_continues_with_the_same_losses(data, two_workers, tmp_path, capsys):  # noqa: F811
    tmp, shards = data
    straight, path = two_workers
    if not (straight / "final").exists():
        _run_cli(path, capsys)
    # the run as it stood when stopped after step 2: its checkpoint, its log, nothing later
    resumed = tmp_path / "resumed"
    shutil.copytree(straight, resumed, ignore=shutil.ignore_patterns("step-0000004", "final", "loss.png", "ray_train"))
    (resumed / "checkpoints" / "latest").write_text("step-0000002")
    (resumed / "loss_log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _log(straight) if r["step"] <= 2))
    with pytest.raises(TrainConfigError, match="written by 2 worker"):  # positions are per rank
        Trainer(_cfg(tmp, shards, resumed, cache=str(tmp / "cache"), **TWO))
    cfg = yaml.safe_load(path.read_text())
    cfg["output"] = str(resumed)
    (tmp_path / "resume.yaml").write_text(yaml.safe_dump(cfg))
    _run_cli(tmp_path / "resume.yaml", capsys)
    a = {r["step"]: r for r in _log(straight)}
    b = {r["step"]: r for r in _log(resumed)}
    assert sorted(b) == [1, 2, 3, 4]
    for step in (3, 4):
        for k in ("l1", "l2", "vq", "entropy", "distill", "loss"):
            assert b[step][k] == pytest.approx(a[step][k], rel=1e-6), (step, k)


def test_a_checkpoint_resumes_only_with_the_workers_that_wrote_it(data, tmp_path, capsys):  # noqa: F811
    tmp, shards = data
    out = tmp_path / "one"
    Trainer(_cfg(tmp, shards, out, steps=1, checkpoint_every=1)).run()
    path = tmp_path / "two.yaml"
    path.write_text(yaml.safe_dump({"inputs": list(shards), "output": str(out), "workers": 2, "steps": 2}))
    assert main(["train", str(path)]) == 2  # the driver refuses it before starting any worker
    err = capsys.readouterr().err.strip()
    assert "written by 1 worker(s)" in err and "workers: 1" in err and len(err.splitlines()) == 1
