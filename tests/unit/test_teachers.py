"""Frozen teacher registry: tiny random SigLIP / SigLIP2 / DINOv2 / CLIP built here, saved, reloaded."""

from __future__ import annotations

import hashlib
import json
import shutil
import socket
import time
from pathlib import Path

import pytest
import torch
import transformers as tf
from PIL import Image

from wintok_model.teachers import Teacher, TeacherError, load_teacher

TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
TEXT = dict(TINY, vocab_size=100, bos_token_id=1, eos_token_id=2, pad_token_id=0)
# HF image processors (PIL backend) round to uint8 after resizing; ours matches within one level.
ONE_LEVEL = 1.0 / 255.0
# bf16 vs fp32 on CPU, measured on these tiny models over 5 seeds x 4 kinds: max |diff| / max |fp32|
# <= 0.0122 and cosine >= 0.99988. Bounds with ~2.5x headroom:
BF16_REL, BF16_COS = 0.03, 0.999


def _images(n: int = 3, h: int = 32, w: int = 32, seed: int = 0) -> torch.Tensor:
    """Smooth random uint8 images (B, H, W, 3), natural-image-like rather than pure noise."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, 5, 5, generator=g) * 255
    up = torch.nn.functional.interpolate(low, size=(h, w), mode="bicubic", align_corners=False)
    return up.clamp(0, 255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous()


def _save(model: torch.nn.Module, path: Path, processor=None) -> Path:
    model.save_pretrained(path)
    if processor is not None:
        processor.save_pretrained(path)
    return path


def _pil(images: torch.Tensor) -> list[Image.Image]:
    return [Image.fromarray(im.numpy()) for im in images]


@pytest.fixture(scope="module")
def zoo(tmp_path_factory) -> dict[str, tuple[Path, torch.nn.Module]]:
    """Tiny saved checkpoints, keyed by name, with the in-memory model they were saved from."""
    root = tmp_path_factory.mktemp("teachers")
    torch.manual_seed(0)
    out = {}
    m = tf.SiglipModel(tf.SiglipConfig(vision_config=dict(TINY, image_size=32, patch_size=8), text_config=TEXT))
    out["siglip_full"] = (_save(m, root / "siglip_full", tf.SiglipImageProcessorPil(
        size={"height": 32, "width": 32}, resample=3)), m)
    m = tf.SiglipVisionModel(tf.SiglipVisionConfig(**TINY, image_size=32, patch_size=8))
    out["siglip_vision"] = (_save(m, root / "siglip_vision"), m)
    m = tf.Siglip2VisionModel(tf.Siglip2VisionConfig(**TINY, num_patches=16, patch_size=8))
    out["siglip2"] = (_save(m, root / "siglip2", tf.Siglip2ImageProcessorPil(patch_size=8, max_num_patches=16)), m)
    m = tf.Siglip2Model(tf.Siglip2Config(vision_config=dict(TINY, num_patches=16, patch_size=8), text_config=TEXT))
    out["siglip2_full"] = (_save(m, root / "siglip2_full"), m)
    m = tf.Dinov2Model(tf.Dinov2Config(**TINY, image_size=28, patch_size=14))
    out["dinov2"] = (_save(m, root / "dinov2", tf.BitImageProcessorPil(
        size={"shortest_edge": 32}, crop_size={"height": 28, "width": 28},
        image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225])), m)
    m = tf.Dinov2WithRegistersModel(tf.Dinov2WithRegistersConfig(**TINY, image_size=28, patch_size=14,
                                                                 num_register_tokens=2))
    out["dinov2_reg"] = (_save(m, root / "dinov2_reg"), m)
    m = tf.CLIPModel(tf.CLIPConfig(vision_config=dict(TINY, image_size=32, patch_size=8), text_config=TEXT,
                                   projection_dim=16))
    out["clip_full"] = (_save(m, root / "clip_full", tf.CLIPImageProcessorPil(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})), m)
    m = tf.CLIPVisionModelWithProjection(tf.CLIPVisionConfig(**TINY, image_size=32, patch_size=8, projection_dim=24))
    out["clip_vision"] = (_save(m, root / "clip_vision"), m)
    for _, model in out.values():
        model.eval()
    return out


def _reference(name: str, model: torch.nn.Module, x: torch.Tensor, patch: int = 8) -> torch.Tensor:
    """The pooled output computed by calling the transformers model directly on pixel tensor x."""
    if name.startswith("siglip2"):
        b, c, s = x.shape[0], x.shape[1], x.shape[-1]
        n = s // patch  # same layout as transformers' convert_image_to_patches
        pv = x.reshape(b, c, n, patch, n, patch).permute(0, 2, 4, 3, 5, 1).reshape(b, n * n, -1)
        kw = dict(pixel_values=pv, pixel_attention_mask=torch.ones(b, n * n, dtype=torch.int32),
                  spatial_shapes=torch.tensor([[n, n]] * b))
        return (model.vision_model(**kw) if name.endswith("full") else model(**kw)).pooler_output
    if name == "siglip_full":
        return model.vision_model(pixel_values=x).pooler_output
    if name == "clip_full":
        out = model.get_image_features(pixel_values=x)
        return out if torch.is_tensor(out) else out.pooler_output
    if name == "clip_vision":
        return model(pixel_values=x).image_embeds
    if name.startswith("dinov2"):
        return model(pixel_values=x).last_hidden_state[:, 0]
    return model(pixel_values=x).pooler_output


NAMES = ["siglip_full", "siglip_vision", "siglip2", "siglip2_full", "dinov2", "dinov2_reg", "clip_full",
         "clip_vision"]


@pytest.mark.parametrize("name", NAMES)
def test_embedding_matches_transformers(zoo, name):
    path, model = zoo[name]
    teacher = load_teacher(str(path))
    imgs = _images(3, 32, 32)
    x = teacher.preprocess(imgs)
    assert x.shape == (3, 3, teacher.spec.image_size, teacher.spec.image_size) and x.dtype == torch.float32
    with torch.no_grad():
        ref = _reference(name, model, x)
    emb = teacher(imgs)["embedding"]
    assert emb.dtype == torch.float32 and emb.shape == (3, teacher.spec.embed_dim)
    torch.testing.assert_close(emb, ref.float(), atol=1e-5, rtol=1e-5)
    assert not teacher.model.training
    assert not any(p.requires_grad for p in teacher.parameters())


def test_specs_per_family(zoo):
    s = load_teacher(str(zoo["siglip_full"][0])).spec
    assert (s.kind, s.image_size, s.mean, s.resize, s.pooling, s.embed_dim) == (
        "siglip", 32, (0.5, 0.5, 0.5), "bicubic", "pooler_output", 32)
    s = load_teacher(str(zoo["siglip2"][0])).spec  # NaFlex: isqrt(16) patches of 8 -> 32
    assert (s.kind, s.image_size, s.resize) == ("siglip2", 32, "bilinear")
    s = load_teacher(str(zoo["dinov2"][0])).spec
    assert (s.kind, s.image_size, s.resize, s.pooling) == ("dinov2", 28, "bicubic+center_crop(32)", "cls")
    s = load_teacher(str(zoo["dinov2_reg"][0])).spec  # no preprocessor: HF defaults, 256 -> crop 224
    assert (s.image_size, s.resize, s.mean, s.std) == (
        224, "bicubic+center_crop(256)", (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    s = load_teacher(str(zoo["clip_full"][0])).spec
    assert (s.kind, s.image_size, s.pooling, s.embed_dim) == ("clip", 32, "image_embeds", 16)
    assert s.mean == (0.48145466, 0.4578275, 0.40821073)
    assert load_teacher(str(zoo["clip_vision"][0])).spec.embed_dim == 24


@pytest.mark.parametrize("name,processor,size", [
    ("siglip_full", tf.SiglipImageProcessorPil(size={"height": 32, "width": 32}, resample=3), (48, 40)),
    ("siglip_full", tf.SiglipImageProcessorPil(size={"height": 32, "width": 32}, resample=3), (20, 20)),
    ("dinov2", tf.BitImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 28, "width": 28},
                                       image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225]),
     (40, 56)),
    ("clip_full", tf.CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
     (64, 48)),
])
def test_preprocess_matches_hf_image_processor(zoo, name, processor, size):
    """Down- and upscaling, non-square inputs, shortest-edge + center crop, vs the PIL-based HF processors."""
    teacher = load_teacher(str(zoo[name][0]))
    imgs = _images(2, *size, seed=1)
    ref = processor(_pil(imgs), return_tensors="pt")["pixel_values"]
    ours = teacher.preprocess(imgs)
    assert ours.shape == ref.shape
    tol = ONE_LEVEL / min(teacher.spec.std) + 1e-5
    assert (ours - ref).abs().max().item() <= tol


def test_siglip2_patch_layout_matches_hf_processor(zoo):
    """Our patchified NaFlex input equals Siglip2ImageProcessor's (layout, mask, spatial shapes)."""
    path, model = zoo["siglip2"]
    teacher = load_teacher(str(path))
    imgs = _images(2, 64, 64, seed=2)
    hf = tf.Siglip2ImageProcessorPil(patch_size=8, max_num_patches=16)(_pil(imgs), return_tensors="pt")
    assert hf["pixel_values"].shape == (2, 16, 8 * 8 * 3)
    assert hf["spatial_shapes"].tolist() == [[4, 4], [4, 4]] and bool(hf["pixel_attention_mask"].all())
    x = teacher.preprocess(imgs)
    ours = x.reshape(2, 3, 4, 8, 4, 8).permute(0, 2, 4, 3, 5, 1).reshape(2, 16, -1)
    assert (ours - hf["pixel_values"]).abs().max().item() <= ONE_LEVEL / 0.5 + 1e-5
    with torch.no_grad():
        ref = model(**hf).pooler_output
    emb = teacher(imgs)["embedding"]
    assert torch.nn.functional.cosine_similarity(emb, ref, dim=-1).min().item() > 0.999


@pytest.mark.parametrize("name", ["siglip_full", "siglip2", "dinov2", "clip_full"])
def test_bf16_cpu_agrees_with_fp32(zoo, name):
    path = str(zoo[name][0])
    imgs = _images(4, 32, 32, seed=3)
    e32 = load_teacher(path)(imgs)["embedding"]
    t16 = load_teacher(path, dtype=torch.bfloat16)
    assert t16.dtype == torch.bfloat16 and t16.preprocess(imgs).dtype == torch.bfloat16
    e16 = t16(imgs)["embedding"]
    assert e16.dtype == torch.float32
    assert ((e16 - e32).abs().max() / e32.abs().max()).item() < BF16_REL
    assert torch.nn.functional.cosine_similarity(e16, e32, dim=-1).min().item() > BF16_COS


@pytest.mark.parametrize("name,n,dp", [
    ("siglip_full", 16, 32), ("siglip2", 16, 32), ("dinov2", 4, 32), ("dinov2_reg", 256, 32), ("clip_full", 16, 32),
])
def test_patch_tokens_drop_cls_and_registers(zoo, name, n, dp):
    path, model = zoo[name]
    teacher = load_teacher(str(path))
    imgs = _images(2, 32, 32)
    out = teacher(imgs, patch_tokens=True)
    assert out["patch_tokens"].shape == (2, n, dp) and out["patch_tokens"].dtype == torch.float32
    if name == "dinov2_reg":  # 1 CLS + 2 registers precede the patches
        with torch.no_grad():
            hidden = model(pixel_values=teacher.preprocess(imgs)).last_hidden_state
        assert hidden.shape[1] == 1 + 2 + 256
        torch.testing.assert_close(out["patch_tokens"], hidden[:, 3:], atol=1e-5, rtol=1e-5)
    assert set(teacher(imgs)) == {"embedding"}


def test_dinov2_poolings(zoo):
    path = str(zoo["dinov2"][0])
    imgs = _images(2, 32, 32)
    cls = load_teacher(path)(imgs, patch_tokens=True)
    mean = load_teacher(path, pooling="mean")(imgs)["embedding"]
    torch.testing.assert_close(mean, cls["patch_tokens"].mean(1))
    both = load_teacher(path, pooling="cls+mean")
    assert both.spec.embed_dim == 64
    torch.testing.assert_close(both(imgs)["embedding"], torch.cat([cls["embedding"], mean], -1))
    with pytest.raises(TeacherError, match="pooling"):
        load_teacher(path, pooling="pooler_output")


def test_siglip_without_head(tmp_path):
    m = tf.SiglipVisionModel(tf.SiglipVisionConfig(**TINY, image_size=32, patch_size=8, vision_use_head=False))
    _save(m, tmp_path / "headless")
    with pytest.raises(TeacherError, match="attention-pooling head"):
        load_teacher(str(tmp_path / "headless"))
    teacher = load_teacher(str(tmp_path / "headless"), pooling="mean")
    imgs = _images(2)
    with torch.no_grad():
        ref = m.eval()(pixel_values=teacher.preprocess(imgs)).last_hidden_state.mean(1)
    torch.testing.assert_close(teacher(imgs)["embedding"], ref, atol=1e-5, rtol=1e-5)
    # config says there is a head, weights have none: refused instead of a random head
    cfg = json.loads((tmp_path / "headless" / "config.json").read_text())
    cfg["vision_use_head"] = True
    (tmp_path / "headless" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(TeacherError, match="head"):
        load_teacher(str(tmp_path / "headless"))


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """HF offline, an empty HF cache, and any socket connection is a test failure."""
    import huggingface_hub.constants as hub

    cache = tmp_path / "hf_cache"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(cache))
    calls = []

    def refuse(self, address, *args):
        calls.append(address)
        raise OSError(f"network access attempted: {address}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    return cache, calls


@pytest.mark.parametrize("spec", ["/no/such/teacher/dir", "acme-nonexistent/siglip2-tiny", "bad id!!", "./rel/x"])
def test_missing_teacher_fails_fast_without_network(offline, spec):
    _, calls = offline
    start = time.monotonic()
    with pytest.raises(TeacherError) as err:
        load_teacher(spec)
    assert time.monotonic() - start < 5
    assert calls == []
    msg = str(err.value)
    assert spec in msg and "not found" in msg and "save_pretrained" in msg and "hf download" in msg


def test_folder_without_weights_or_config(tmp_path, zoo):
    (tmp_path / "empty").mkdir()
    with pytest.raises(TeacherError, match="config.json"):
        load_teacher(str(tmp_path / "empty"))
    shutil.copy(zoo["dinov2"][0] / "config.json", tmp_path / "empty")
    with pytest.raises(TeacherError, match="no weights"):
        load_teacher(str(tmp_path / "empty"))
    (tmp_path / "resnet").mkdir()
    (tmp_path / "resnet" / "config.json").write_text('{"model_type": "resnet"}')
    with pytest.raises(TeacherError, match="unsupported model_type"):
        load_teacher(str(tmp_path / "resnet"))


def test_model_id_from_local_hf_cache(offline, zoo):
    """A model id resolves to its snapshot in the HF cache layout (refs/main -> snapshots/<sha>)."""
    cache, calls = offline
    repo = cache / "models--acme--tiny-dinov2"
    sha = "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(zoo["dinov2"][0], repo / "snapshots" / sha)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(sha)
    teacher = load_teacher("acme/tiny-dinov2")
    assert teacher.spec.name == "acme/tiny-dinov2" and teacher.spec.kind == "dinov2"
    direct = load_teacher(str(zoo["dinov2"][0]))
    assert teacher.spec.weights_sha256 == direct.spec.weights_sha256
    assert calls == []


def test_fingerprint_tracks_weights(tmp_path):
    torch.manual_seed(1)
    m = tf.SiglipVisionModel(tf.SiglipVisionConfig(**TINY, image_size=32, patch_size=8))
    a = load_teacher(str(_save(m, tmp_path / "a")))
    fp = a.fingerprint()
    assert json.loads(json.dumps(fp)) == fp
    assert fp["weights_sha256"] == hashlib.sha256((tmp_path / "a" / "model.safetensors").read_bytes()).hexdigest()
    assert fp["mean"] == [0.5, 0.5, 0.5] and fp["kind"] == "siglip" and len(fp["config_sha256"]) == 64
    with torch.no_grad():
        m.post_layernorm.weight[0] += 1.0
    b = load_teacher(str(_save(m, tmp_path / "b"))).fingerprint()
    assert b["weights_sha256"] != fp["weights_sha256"]
    assert b["config_sha256"] == fp["config_sha256"]
    c = load_teacher(str(_save(m, tmp_path / "c")), pooling="mean").fingerprint()
    assert c["weights_sha256"] == b["weights_sha256"] and c["pooling"] == "mean"


def test_sharded_weights(tmp_path, zoo):
    path, model = zoo["clip_vision"]
    model.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    shards = sorted(p.name for p in (tmp_path / "sharded").glob("model-*.safetensors"))
    assert len(shards) > 1
    t1 = load_teacher(str(tmp_path / "sharded"))
    assert t1.spec.weights_sha256 == load_teacher(str(tmp_path / "sharded")).spec.weights_sha256
    torch.testing.assert_close(t1(_images())["embedding"], load_teacher(str(path))(_images())["embedding"])
    (tmp_path / "sharded" / shards[-1]).unlink()
    with pytest.raises(TeacherError, match="missing"):
        load_teacher(str(tmp_path / "sharded"))


def test_input_validation_and_device(zoo):
    teacher = load_teacher(str(zoo["siglip_vision"][0]), device=torch.device("cpu"))
    assert isinstance(teacher, Teacher)
    with pytest.raises(ValueError, match="uint8"):
        teacher(torch.zeros(1, 32, 32, 3))
    with pytest.raises(ValueError, match="uint8"):
        teacher(torch.zeros(1, 3, 32, 32, dtype=torch.uint8))


def test_input_size_differs_from_config_interpolates_positions(tmp_path, zoo):
    """A preprocessor size other than the config's image_size runs with interpolated position embeddings."""
    _, model = zoo["siglip_vision"]
    path = _save(model, tmp_path / "s48", tf.SiglipImageProcessorPil(size={"height": 48, "width": 48}))
    teacher = load_teacher(str(path))
    assert teacher.spec.image_size == 48
    imgs = _images(2, 32, 32)
    with torch.no_grad():
        ref = model(pixel_values=teacher.preprocess(imgs), interpolate_pos_encoding=True).pooler_output
    torch.testing.assert_close(teacher(imgs)["embedding"], ref, atol=1e-5, rtol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", ["siglip_full", "siglip2", "dinov2", "clip_full"])
def test_cuda_matches_cpu(zoo, name):
    """CPU uint8 input, teacher on CUDA: preprocessing within one level, fp32 and bf16 embeddings close."""
    path = str(zoo[name][0])
    imgs = _images(4, 40, 40, seed=4)
    cpu = load_teacher(path)
    gpu = load_teacher(path, device="cuda")
    x = gpu.preprocess(imgs)
    assert x.device.type == "cuda"
    assert (x.cpu() - cpu.preprocess(imgs)).abs().max().item() <= ONE_LEVEL / min(cpu.spec.std) + 1e-5
    e = cpu(imgs)["embedding"]
    torch.testing.assert_close(gpu(imgs)["embedding"].cpu(), e, atol=1e-3, rtol=1e-3)
    e16 = load_teacher(path, device="cuda", dtype=torch.bfloat16)(imgs.cuda())["embedding"].cpu()
    assert torch.nn.functional.cosine_similarity(e16, e, dim=-1).min().item() > BF16_COS
