"""`wintok train`: losses fall, cache == online teacher, resume continues exactly, gaps are counted."""

from __future__ import annotations

import json

import pytest
import torch
import transformers as tf

from pipeline.cli import main
from pipeline.shard.encode import ModelSpec
from pipeline.train import TrainConfig, TrainConfigError, Trainer, lr_at
from tests import corpus
from tests.readers import process_shards


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Two shards of 6 images, a tiny teacher of wintok-tiny's width (64), and a tokenize OUTPUT
    that caches the teacher for the first shard only."""
    tmp = tmp_path_factory.mktemp("train")
    shards = corpus.make_shards(tmp / "in", 2, 6, seed=5)
    torch.manual_seed(0)
    tf.SiglipVisionModel(tf.SiglipVisionConfig(hidden_size=64, intermediate_size=64, num_hidden_layers=1,
                                               num_attention_heads=4, image_size=32, patch_size=8)
                         ).save_pretrained(tmp / "teacher")
    process_shards(shards, tmp / "cache", ModelSpec(model="wintok-tiny", teacher=str(tmp / "teacher"), device="cpu"))
    (tmp / "cache_half").mkdir()
    import shutil

    shutil.copytree(tmp / "cache", tmp / "cache_half", dirs_exist_ok=True)
    (tmp / "cache_half" / "_manifest" / "00001.json").unlink()
    return tmp, shards


def _cfg(tmp, shards, out, **kw) -> TrainConfig:
    base = dict(inputs=tuple(shards), output=str(out), model="wintok-tiny", batch_size=4, steps=4, warmup=1,
                lr=2e-3, checkpoint_every=2, log_every=1, augment=False, shuffle_buffer=4, seed=1, threads=1)
    base.update(kw)
    return TrainConfig(**base)


def _log(out) -> list[dict]:
    return [json.loads(line) for line in open(out / "loss_log.jsonl")]


def test_a_few_steps_lower_every_loss(data, tmp_path):
    tmp, shards = data
    # one shard of 6 images, batches of 6, no augmentation: the same batch every step
    t = Trainer(_cfg(tmp, shards[:1], tmp_path / "o", batch_size=6, steps=12, warmup=1, teacher=str(tmp / "teacher"),
                     checkpoint_every=100))
    first = t.train_step()
    for _ in range(10):
        last = t.train_step()
    for k in ("l1", "l2", "vq", "entropy", "distill", "loss"):
        assert last[k] < first[k], (k, first[k], last[k])


def test_cache_and_online_teacher_give_the_same_first_loss(data, tmp_path):
    tmp, shards = data
    online = Trainer(_cfg(tmp, shards, tmp_path / "a", teacher=str(tmp / "teacher"))).train_step()
    cached = Trainer(_cfg(tmp, shards, tmp_path / "b", cache=str(tmp / "cache"))).train_step()
    assert cached["distill"] == pytest.approx(online["distill"], abs=2e-3)  # the cache is float16
    assert cached["l1"] == pytest.approx(online["l1"], rel=1e-6)


def test_resume_continues_with_the_same_batches_and_losses(data, tmp_path):
    tmp, shards = data
    straight = tmp_path / "straight"
    Trainer(_cfg(tmp, shards, straight, steps=5, shuffle_buffer=3)).run()
    resumed = tmp_path / "resumed"
    Trainer(_cfg(tmp, shards, resumed, steps=2, shuffle_buffer=3)).run()
    t = Trainer(_cfg(tmp, shards, resumed, steps=5, shuffle_buffer=3))  # picks up checkpoints/latest
    assert t.step == 2 and t.position == 8  # 2 steps x 4 samples read from epoch 0
    t.run()
    a = {r["step"]: r for r in _log(straight)}
    b = {r["step"]: r for r in _log(resumed)}
    for step in (3, 4, 5):  # step 4 crosses into epoch 1 (12 samples per epoch)
        assert b[step]["loss"] == pytest.approx(a[step]["loss"], rel=1e-5), step
    assert (resumed / "final" / "model.safetensors").exists() and (resumed / "loss.png").exists()


def test_samples_missing_from_the_cache_are_counted(data, tmp_path):
    tmp, shards = data
    t = Trainer(_cfg(tmp, shards, tmp_path / "m", cache=str(tmp / "cache_half"), steps=3))
    result = t.run()
    assert result["missing_from_cache"] >= 6  # shard 00001's samples, at least once
    assert result["missing_from_cache"] % 6 == 0


def test_lr_schedule_warms_up_then_decays_to_the_floor():
    cfg = TrainConfig(inputs=("x",), output="o", steps=100, warmup=10, lr=1.0, min_lr_ratio=0.1)
    assert lr_at(0, cfg) == pytest.approx(0.1) and lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(10, cfg) == pytest.approx(1.0) and lr_at(100, cfg) == pytest.approx(0.1)
    assert lr_at(10, cfg) > lr_at(50, cfg) > lr_at(90, cfg)


def test_config_mistakes_are_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("inputs: [a.tar]\noutput: o\nstpes: 3\n")
    with pytest.raises(TrainConfigError, match="unknown key"):
        TrainConfig.from_yaml(str(bad))
    assert main(["train", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert "stpes" in err and len(err.splitlines()) == 1
