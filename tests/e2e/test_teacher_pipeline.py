"""Teacher embeddings in the same pass, and teacher-only mode, on a local Ray."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers as tf

from pipeline.cli import main as cli_main
from pipeline.config import JobConfig
from pipeline.driver import RunRefused, run_job
from pipeline.preprocess import PreprocessConfig, decode_image
from schemas import column_to_numpy
from tests import corpus
from tests.e2e.helpers import read_output
from wintok_model.teachers import load_teacher

pytestmark = pytest.mark.e2e
TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)


@pytest.fixture(scope="module")
def teachers(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("teachers")
    torch.manual_seed(0)
    out = {}
    m = tf.SiglipVisionModel(tf.SiglipVisionConfig(**TINY, image_size=32, patch_size=8))
    m.save_pretrained(root / "siglip")
    out["siglip"] = str(root / "siglip")
    m = tf.Dinov2Model(tf.Dinov2Config(**TINY, image_size=28, patch_size=14))
    m.save_pretrained(root / "dinov2")
    out["dinov2"] = str(root / "dinov2")
    m = tf.CLIPVisionModelWithProjection(tf.CLIPVisionConfig(**TINY, image_size=32, patch_size=8, projection_dim=24))
    m.save_pretrained(root / "clip")
    out["clip"] = str(root / "clip")
    return out


def _job(inputs, output, **kw) -> JobConfig:
    base = dict(inputs=tuple(inputs), output=str(output), batch_size=4, decode_threads=2, max_retries=1,
                retry_backoff=0.05, progress=False, workers=1)
    base.update(kw)
    return JobConfig(**base)


def _direct(teacher_dir: str, image_size: int, data: bytes, patch: bool = False) -> dict[str, np.ndarray]:
    teacher = load_teacher(teacher_dir)
    pixels = torch.from_numpy(decode_image(data, PreprocessConfig(image_size=image_size)).pixels[None])
    out = teacher(pixels, patch_tokens=patch)
    return {k: v[0].numpy() for k, v in out.items()}


def _image(sample: dict) -> bytes:
    return next(v for k, v in sample["members"].items() if k in ("jpg", "png"))


def test_tokens_and_teacher_in_one_pass(tmp_path, ray_session, tiny_model_dir, teachers):
    corpus.make_shards(tmp_path / "in", n_shards=2, per_shard=3, seed=21)
    cfg = _job([f"{tmp_path}/in/*.tar"], tmp_path / "out", model=tiny_model_dir, teacher=teachers["dinov2"],
               teacher_patch_tokens=True)
    summary = run_job(cfg)
    assert summary.ok and summary.images == 6
    plan = {s["key"]: s for shard in corpus.shard_plan(2, 3, seed=21) for s in shard}
    for t in read_output(str(tmp_path / "out"))["rows"].values():
        assert {"pixel_ids", "semantic_pooled", "teacher_embedding", "teacher_patch_tokens"} <= set(t.column_names)
        emb = column_to_numpy(t, "teacher_embedding")
        patches = column_to_numpy(t, "teacher_patch_tokens")
        assert emb.dtype == np.float16 and patches.shape[1:] == (256, 32)  # DINOv2 family default input 224 / patch 14
        for i, key in enumerate(t.column("key").to_pylist()):
            # the teacher sees the image decoded once at WinTok's size (64) and resizes it on the device
            ref = _direct(teachers["dinov2"], 64, _image(plan[key]), patch=True)
            np.testing.assert_allclose(emb[i].astype(np.float32), ref["embedding"], rtol=2e-3, atol=2e-3)
            np.testing.assert_array_equal(emb[i], ref["embedding"].astype(np.float16))
            np.testing.assert_array_equal(patches[i], ref["patch_tokens"].astype(np.float16))


@pytest.mark.parametrize("kind", ["siglip", "clip"])
def test_teacher_only_mode_commits_and_resumes(tmp_path, ray_session, teachers, kind):
    corpus.make_shards(tmp_path / "in", n_shards=2, per_shard=3, seed=22, broken=False)
    out = tmp_path / "out"
    cfg = _job([f"{tmp_path}/in/*.tar"], out, model=None, teacher=teachers[kind])
    first = run_job(cfg)
    assert first.ok and first.done == 2
    plan = {s["key"]: s for shard in corpus.shard_plan(2, 3, seed=22) for s in shard}
    for t in read_output(str(out))["rows"].values():
        assert "pixel_ids" not in t.column_names and "teacher_embedding" in t.column_names
        emb = column_to_numpy(t, "teacher_embedding")
        for i, key in enumerate(t.column("key").to_pylist()):
            ref = _direct(teachers[kind], 32, _image(plan[key]))["embedding"]  # decoded at the teacher's size
            np.testing.assert_array_equal(emb[i], ref.astype(np.float16))
    again = run_job(cfg)
    assert again.done == 0 and again.skipped == 2


def test_changing_the_teacher_is_refused(tmp_path, ray_session, tiny_model_dir, teachers):
    corpus.make_shards(tmp_path / "in", n_shards=1, per_shard=2, seed=23)
    cfg = _job([f"{tmp_path}/in/*.tar"], tmp_path / "out", model=tiny_model_dir, teacher=teachers["siglip"])
    assert run_job(cfg).ok
    with pytest.raises(RunRefused, match="teacher"):
        run_job(cfg.replace(teacher=teachers["clip"]))
    with pytest.raises(RunRefused, match="teacher"):
        run_job(cfg.replace(teacher=None))


def test_embed_cli_and_missing_teacher(tmp_path, ray_session, teachers, capsys):
    corpus.make_shards(tmp_path / "in", n_shards=1, per_shard=2, seed=24)
    rc = cli_main(["embed", f"{tmp_path}/in/00000.tar", str(tmp_path / "out"), "--teacher", teachers["clip"],
                   "--no-progress", "--workers", "1"])
    assert rc == 0
    assert (tmp_path / "out" / "_manifest" / "00000.json").exists()
    rc = cli_main(["embed", f"{tmp_path}/in/00000.tar", str(tmp_path / "out2"), "--teacher",
                   str(tmp_path / "no-such-teacher"), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and "not found" in err and "Traceback" not in err
    assert not (tmp_path / "out2" / "_run.json").exists()
