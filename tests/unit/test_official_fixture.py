"""A checkpoint written by the official WinTok code loads unchanged and reproduces its outputs.

tests/fixtures/official_tiny/ was produced once by running the official WeChatCV/WinTok model
code (see the README there): `wintok_official_tiny.pth` is its checkpoint, `config.json` the
SigLIP config its encoder came from, and `expected.safetensors` the official fp32 outputs on a
fixed batch. Pixel ids must be identical; float outputs agree within 1e-4.
"""

from __future__ import annotations

import os
import warnings

import pytest
import torch
from safetensors.torch import load_file

from wintok_model import WinTok
from wintok_model.checkpoint import check_model

FIXTURE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "fixtures", "official_tiny")
CKPT = os.path.join(FIXTURE, "wintok_official_tiny.pth")
ATOL = 1e-4
FLOAT_OUTPUTS = ("quant", "query_tokens", "pooler_out", "encode_image", "idx_to_img", "recon")


@pytest.fixture(scope="module")
def expected() -> dict[str, torch.Tensor]:
    return load_file(os.path.join(FIXTURE, "expected.safetensors"))


@pytest.fixture(scope="module")
def model() -> WinTok:
    with warnings.catch_warnings():
        # no pickle fallback and no "sizes guessed from the weights": it must load as it is
        warnings.simplefilter("error")
        return WinTok.from_checkpoint(CKPT, encoder_config=FIXTURE)


@pytest.fixture(scope="module")
def outputs(model: WinTok, expected: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    x = expected["input"]
    with torch.inference_mode():
        enc = model.encode(x)
        return {
            "ids": model.img_to_idx(x),
            "indices": enc["indices"],
            "quant": enc["quant"],
            "query_tokens": enc["query_tokens"],
            "pooler_out": enc["pooler_out"],
            "encode_image": model.encode_image(x),
            "idx_to_img": model.idx_to_img(expected["ids"]),
            "recon": model.img_to_reconstructed_img(x),
        }


def test_checkpoint_is_tensors_only():
    ckpt = torch.load(CKPT, map_location="cpu", weights_only=True)
    assert set(ckpt) >= {"args", "trainer", "epoch"}
    assert ckpt["args"]["dtype"] == torch.float32
    assert all(isinstance(v, torch.Tensor) for v in ckpt["trainer"]["unitok"].values())
    assert "encoder.vision_model.encoder.layers.1.mlp.fc1.weight" in ckpt["trainer"]["unitok"]


def test_config_comes_from_args_and_encoder_config(model: WinTok):
    c = model.config
    assert (c.image_size, c.patch_size, c.hidden_size, c.num_hidden_layers, c.num_attention_heads) == (32, 8, 128, 2, 16)
    assert (c.vocab_size, c.vocab_width, c.num_codebooks, c.num_latent_tokens) == (1024, 16, 4, 8)
    assert (c.decoder_depth, c.decoder_num_heads, c.decoder_hidden_size, c.decoder_intermediate_size) == (2, 4, 64, 128)
    assert check_model(CKPT, encoder_config=FIXTURE) == c
    assert not model.training


def test_fixture_is_not_degenerate(expected: dict[str, torch.Tensor]):
    ids = expected["ids"]
    assert ids.dtype == torch.int64 and tuple(ids.shape) == (4, 4, 16)
    assert ids.unique().numel() > 32
    assert expected["recon"].std() > 0.1


def test_pixel_ids_identical(outputs: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]):
    assert outputs["ids"].dtype == torch.int64
    assert torch.equal(outputs["ids"], expected["ids"])
    assert torch.equal(outputs["indices"], expected["ids"])


@pytest.mark.parametrize("name", FLOAT_OUTPUTS)
def test_float_outputs_match(name: str, outputs: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]):
    got, want = outputs[name], expected[name]
    assert got.dtype == torch.float32 and got.shape == want.shape
    diff = (got - want).abs().max().item()
    assert diff <= ATOL, f"{name}: max abs diff {diff:.3g} > {ATOL}"


def test_save_pretrained_roundtrip(tmp_path, model: WinTok, expected: dict[str, torch.Tensor]):
    out = str(tmp_path / "converted")
    model.save_pretrained(out)
    again = WinTok.from_pretrained(out)
    assert again.config == model.config
    mine, theirs = model.state_dict(), again.state_dict()
    assert mine.keys() == theirs.keys()
    assert all(torch.equal(mine[k], theirs[k]) for k in mine)
    with torch.inference_mode():
        assert torch.equal(again.img_to_idx(expected["input"]), expected["ids"])
