"""Teachers whose preprocessor_config.json differs from the family defaults.

Every teacher of the test zoo used its family's default mean/std, so a teacher whose mean was
taken from the family default instead of its own preprocessor config passed everything. Here
each family gets a tiny saved teacher with a non-default image_mean / image_std and input size;
the pipeline's preprocessing must match the Hugging Face image processor called directly on
the same PIL images (within one uint8 level), and the embedding must equal transformers' model
run on the processor's own pixel_values.
"""

from __future__ import annotations

import pytest
import torch
import transformers as tf
from PIL import Image

from wintok_model.teachers import load_teacher

TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
ONE_LEVEL = 1.0 / 255.0
MEAN, STD = [0.21, 0.62, 0.37], [0.17, 0.31, 0.24]  # far from 0.5, ImageNet and CLIP's values


def _images(n: int, h: int, w: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, 5, 5, generator=g) * 255
    up = torch.nn.functional.interpolate(low, size=(h, w), mode="bicubic", align_corners=False)
    return up.clamp(0, 255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous()


def _make(kind: str):
    """(model, processor) with a non-default mean/std and an input size other than the config's."""
    torch.manual_seed(1)
    if kind == "siglip":
        model = tf.SiglipVisionModel(tf.SiglipVisionConfig(**TINY, image_size=32, patch_size=8))
        proc = tf.SiglipImageProcessorPil(size={"height": 24, "width": 24}, resample=3, image_mean=MEAN,
                                          image_std=STD)
    elif kind == "siglip2":
        model = tf.Siglip2VisionModel(tf.Siglip2VisionConfig(**TINY, num_patches=16, patch_size=8))
        proc = tf.Siglip2ImageProcessorPil(patch_size=8, max_num_patches=9, image_mean=MEAN, image_std=STD)
    elif kind == "dinov2":
        model = tf.Dinov2Model(tf.Dinov2Config(**TINY, image_size=28, patch_size=14))
        proc = tf.BitImageProcessorPil(size={"shortest_edge": 36}, crop_size={"height": 28, "width": 28},
                                       image_mean=MEAN, image_std=STD)
    else:
        model = tf.CLIPVisionModelWithProjection(tf.CLIPVisionConfig(**TINY, image_size=32, patch_size=8,
                                                                     projection_dim=24))
        proc = tf.CLIPImageProcessorPil(size={"shortest_edge": 40}, crop_size={"height": 32, "width": 32},
                                        image_mean=MEAN, image_std=STD)
    return model.eval(), proc


def _hf_embedding(kind: str, model, inputs) -> torch.Tensor:
    with torch.no_grad():
        if kind == "siglip":
            return model(pixel_values=inputs["pixel_values"], interpolate_pos_encoding=True).pooler_output
        if kind == "siglip2":
            return model(**inputs).pooler_output
        if kind == "dinov2":
            return model(pixel_values=inputs["pixel_values"]).last_hidden_state[:, 0]
        return model(pixel_values=inputs["pixel_values"]).image_embeds


KINDS = ["siglip", "siglip2", "dinov2", "clip"]
SIZES = {"siglip": 24, "siglip2": 24, "dinov2": 28, "clip": 32}


@pytest.mark.parametrize("kind", KINDS)
def test_preprocessor_config_mean_std_and_size_are_used(tmp_path, kind):
    model, proc = _make(kind)
    model.save_pretrained(tmp_path)
    proc.save_pretrained(tmp_path)
    teacher = load_teacher(str(tmp_path))
    imgs = _images(3, 44, 52, seed=5)  # non-square, larger than every input size
    pil = [Image.fromarray(im.numpy()) for im in imgs]
    hf = proc(pil, return_tensors="pt")
    ours = teacher.preprocess(imgs)
    if kind == "siglip2":  # NaFlex: patches (B, N, p*p*C) row-major, each (row, col, channel)
        b, n, p = ours.shape[0], SIZES[kind] // 8, 8
        assert hf["spatial_shapes"].tolist() == [[n, n]] * b and bool(hf["pixel_attention_mask"].all())
        ours = ours.reshape(b, 3, n, p, n, p).permute(0, 2, 4, 3, 5, 1).reshape(b, n * n, -1)
    ref = hf["pixel_values"]
    assert ours.shape == ref.shape
    assert (ours - ref).abs().max().item() <= ONE_LEVEL / min(STD) + 1e-5

    emb = teacher(imgs)["embedding"]
    want = _hf_embedding(kind, model, hf)
    assert emb.shape == want.shape
    assert torch.nn.functional.cosine_similarity(emb, want, dim=-1).min().item() > 0.999
    assert (emb - want).abs().max().item() <= 0.02 * want.abs().max().item()
    # and the run fingerprint records what was used
    assert teacher.spec.mean == pytest.approx(tuple(MEAN)) and teacher.spec.std == pytest.approx(tuple(STD))
    assert teacher.spec.image_size == SIZES[kind]


def test_do_normalize_false_means_rescale_only(tmp_path):
    """do_normalize=False in the config: pixels in [0, 1], no mean/std, as the HF processor does."""
    model, _ = _make("siglip")
    proc = tf.SiglipImageProcessorPil(size={"height": 32, "width": 32}, resample=3, do_normalize=False,
                                      image_mean=MEAN, image_std=STD)
    model.save_pretrained(tmp_path)
    proc.save_pretrained(tmp_path)
    teacher = load_teacher(str(tmp_path))
    imgs = _images(2, 40, 40, seed=6)
    ref = proc([Image.fromarray(im.numpy()) for im in imgs], return_tensors="pt")["pixel_values"]
    assert 0.0 <= ref.min().item() and ref.max().item() <= 1.0
    assert (teacher.preprocess(imgs) - ref).abs().max().item() <= ONE_LEVEL + 1e-6
