"""Official checkpoints load into WinTok exactly; bad or unsafe files fail with one clear error.

The "official" files here are written by tests/reference_official.py: a model with the
official module tree (transformers' real SigLIP/SigLIP2 classes + an independent
implementation of the projections, quantiser and pixel head), saved in the official
`torch.save({'args', 'trainer': {'unitok': ...}, 'epoch'})` format.
"""

from __future__ import annotations

import argparse
import os
import warnings

import pytest
import torch

from tests.reference_official import ODD, POOLED, TINY, OfficialWinTok, RefSizes, image_like
from wintok_model import CheckpointError, ConfigError, WinTok, convert_checkpoint
from wintok_model.checkpoint import CONFIG_NAME, WEIGHTS_NAME

SIZES = {"tiny": TINY, "pooled": POOLED, "odd": ODD}


@pytest.fixture(scope="module")
def official(tmp_path_factory):
    """name -> (reference model, official .pth path, SigLIP vision config folder); built once."""
    cache: dict[str, tuple[OfficialWinTok, str, str]] = {}

    def get(name: str) -> tuple[OfficialWinTok, str, str]:
        if name not in cache:
            d = tmp_path_factory.mktemp(f"official_{name}")
            ref = OfficialWinTok(SIZES[name], seed=1)
            path = ref.save_official(str(d / "wintok.pth"))
            enc = ref.save_encoder_config(str(d / "siglip"))
            cache[name] = (ref, path, enc)
        return cache[name]

    return get


def _images(s: RefSizes, n: int = 6, seed: int = 3) -> torch.Tensor:
    x = image_like(n - 1, s.img_size, seed)
    noise = torch.rand(1, 3, s.img_size, s.img_size, generator=torch.Generator().manual_seed(seed)) * 2 - 1
    return torch.cat([x, noise])


def _load(path: str, **kw) -> WinTok:
    return WinTok.from_checkpoint(path, **kw)


def _assert_matches_reference(model: WinTok, ref: OfficialWinTok, s: RefSizes) -> None:
    x = _images(s)
    with torch.no_grad():
        want = ref.encode(x)
        got = model.encode(x)
        assert want["indices"].unique().numel() > 20, "reference ids are degenerate: the test proves nothing"
        assert got["indices"].dtype == torch.int64
        assert torch.equal(got["indices"], want["indices"])
        for k in ("quant", "query_tokens", "pooler_out"):
            assert got[k].shape == want[k].shape, k
            torch.testing.assert_close(got[k], want[k], rtol=0, atol=1e-4, msg=k)
        torch.testing.assert_close(model.img_to_idx(x), want["indices"], rtol=0, atol=0)
        recon_ref = ref.idx_to_img(want["indices"])
        recon = model.idx_to_img(want["indices"])
        assert recon.shape == (x.shape[0], 3, s.img_size, s.img_size)
        torch.testing.assert_close(recon, recon_ref, rtol=0, atol=1e-4)


# ------------------------------------------------------------------- official files load exactly


@pytest.mark.parametrize("name", ["tiny", "pooled", "odd"])
def test_official_checkpoint_matches_reference(official, name):
    ref, path, enc = official(name)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # with an encoder config nothing is guessed: no warning
        model = _load(path, encoder_config=enc)
    assert not model.training
    _assert_matches_reference(model, ref, SIZES[name])


def test_config_comes_from_args_and_encoder_config(official):
    ref, path, enc = official("tiny")
    c = _load(path, encoder_config=enc).config
    s = ref.sizes
    assert (c.image_size, c.patch_size, c.hidden_size, c.num_hidden_layers) == (
        s.img_size, s.patch_size, s.hidden_size, s.num_hidden_layers)
    assert (c.num_attention_heads, c.intermediate_size, c.layer_norm_eps) == (
        s.num_attention_heads, s.intermediate_size, s.layer_norm_eps)
    assert (c.vocab_size, c.vocab_width, c.num_codebooks, c.num_latent_tokens) == (
        s.vocab_size, s.vocab_width, s.num_codebooks, s.num_latent_tokens)
    assert (c.decoder_depth, c.decoder_num_heads, c.decoder_hidden_size, c.decoder_intermediate_size) == (
        s.decoder_rec_depth, s.decoder_rec_num_heads, s.decoder_rec_hidden_size, s.decoder_rec_intermediate_size)


def test_encoder_config_as_full_siglip_config_or_file(official, tmp_path):
    ref, path, enc = official("tiny")
    full = ref.save_encoder_config(str(tmp_path / "siglip_full"), full_siglip=True)  # {'vision_config': {...}}
    for spec in (full, os.path.join(full, "config.json"), os.path.join(enc, "config.json")):
        model = _load(path, encoder_config=spec)
        assert model.config.num_attention_heads == ref.sizes.num_attention_heads
        x = _images(ref.sizes, n=3)
        with torch.no_grad():
            assert torch.equal(model.img_to_idx(x), ref.img_to_idx(x))


def test_missing_encoder_config_file_is_a_clear_error(official, tmp_path):
    _, path, _ = official("tiny")
    with pytest.raises((ConfigError, CheckpointError), match="encoder config not found"):
        _load(path, encoder_config=str(tmp_path / "nowhere"))


# ------------------------------------------------------------------- without an encoder config
# Documented: sizes are read from the weights; heads and eps come from the so400m preset
# (16 heads, eps 1e-6), with a warning. So: exact when the real encoder has 16 heads; silently
# different (warned) when it has not; refused when the width does not divide by 16.


def test_no_encoder_config_exact_when_heads_match_preset(official):
    ref, path, _ = official("pooled")  # 16 heads, eps 1e-6, like the so400m preset
    with pytest.warns(UserWarning, match="so400m preset"):
        model = _load(path)
    assert model.config.hidden_size == ref.sizes.hidden_size
    assert model.config.num_hidden_layers == ref.sizes.num_hidden_layers
    assert model.config.intermediate_size == ref.sizes.intermediate_size
    assert model.config.image_size == ref.sizes.img_size and model.config.patch_size == ref.sizes.patch_size
    _assert_matches_reference(model, ref, ref.sizes)


def test_no_encoder_config_uses_preset_heads_and_warns(official):
    ref, path, _ = official("tiny")  # 4 heads: the weights cannot say so
    with pytest.warns(UserWarning, match=r"heads \(16\)"):
        model = _load(path)
    assert model.config.num_attention_heads == 16
    x = _images(ref.sizes)
    with torch.no_grad():  # loads, but it is not the same model: why encoder_config matters
        assert not torch.allclose(model.encode(x)["pooler_out"], ref.encode(x)["pooler_out"], atol=1e-3)


def test_no_encoder_config_refused_when_width_does_not_fit_preset_heads(official):
    _, path, enc = official("odd")  # width 72 is not a multiple of 16 heads
    with pytest.raises(CheckpointError, match="encoder_config"):
        _load(path)
    _load(path, encoder_config=enc)  # and the fix the message names works


# ------------------------------------------------------------------- key mismatches


def _save_variant(ref: OfficialWinTok, path: str, edit) -> str:
    sd = ref.official_state_dict()
    edit(sd)
    return ref.save_official(path, state_dict=sd)


def test_missing_key_is_one_error_naming_it(official, tmp_path):
    ref, _, enc = official("tiny")
    p = _save_variant(ref, str(tmp_path / "m.pth"),
                      lambda sd: sd.pop("encoder.vision_model.encoder.layers.1.mlp.fc2.bias"))
    with pytest.raises(CheckpointError, match="missing") as e:
        _load(p, encoder_config=enc)
    assert "encoder.layers.1.mlp.fc2.bias" in str(e.value)


def test_extra_key_is_one_error_naming_it(official, tmp_path):
    ref, _, enc = official("tiny")

    def add(sd):
        sd["bogus_head.weight"] = torch.zeros(3)

    p = _save_variant(ref, str(tmp_path / "x.pth"), add)
    with pytest.raises(CheckpointError, match="unexpected") as e:
        _load(p, encoder_config=enc)
    assert "bogus_head.weight" in str(e.value)


def test_wrong_shape_is_one_error_naming_it(official, tmp_path):
    ref, _, enc = official("tiny")

    def grow(sd):
        sd["quant_proj.proj.bias"] = torch.zeros(17)

    p = _save_variant(ref, str(tmp_path / "s.pth"), grow)
    with pytest.raises(CheckpointError, match="wrong shape") as e:
        _load(p, encoder_config=enc)
    assert "quant_proj.proj.bias" in str(e.value) and "(17,)" in str(e.value)


def test_all_mismatches_reported_together(official, tmp_path):
    ref, _, enc = official("tiny")

    def edit(sd):
        sd.pop("conv_out.bias")
        sd["extra.thing"] = torch.zeros(1)
        sd["projection.bias"] = torch.zeros(5)

    p = _save_variant(ref, str(tmp_path / "all.pth"), edit)
    with pytest.raises(CheckpointError) as e:
        _load(p, encoder_config=enc)
    msg = str(e.value)
    for part in ("missing", "conv_out.bias", "unexpected", "extra.thing", "wrong shape", "projection.bias"):
        assert part in msg, part


def test_transformers4_position_ids_buffer_is_tolerated(official, tmp_path):
    """Older transformers-4 versions saved `embeddings.position_ids`; it is derived, so dropped."""
    ref, _, enc = official("tiny")

    def add(sd):
        sd["encoder.vision_model.embeddings.position_ids"] = torch.arange(ref.sizes.num_patches)[None]

    p = _save_variant(ref, str(tmp_path / "pid.pth"), add)
    _assert_matches_reference(_load(p, encoder_config=enc), ref, ref.sizes)


@pytest.mark.parametrize("prefix", ["module.", "_orig_mod.", "module._orig_mod."])
def test_wrapper_prefixed_keys_load(official, tmp_path, prefix):
    """DDP (`module.`) and torch.compile (`_orig_mod.`) prefixes are stripped."""
    ref, _, enc = official("tiny")
    sd = {prefix + k: v for k, v in ref.official_state_dict().items()}
    p = ref.save_official(str(tmp_path / "prefixed.pth"), state_dict=sd)
    _assert_matches_reference(_load(p, encoder_config=enc), ref, ref.sizes)


# ------------------------------------------------------------------- our format, conversion


def test_save_pretrained_round_trip_is_bit_exact(official, tmp_path):
    ref, path, enc = official("pooled")
    model = _load(path, encoder_config=enc)
    out = tmp_path / "ours"
    model.save_pretrained(str(out))
    assert (out / CONFIG_NAME).is_file() and (out / WEIGHTS_NAME).is_file()
    for spec in (str(out), str(out / WEIGHTS_NAME)):
        again = WinTok.from_checkpoint(spec)
        assert again.config == model.config
        a, b = model.state_dict(), again.state_dict()
        assert a.keys() == b.keys()
        for k in a:
            assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
        x = _images(ref.sizes)
        with torch.no_grad():
            assert torch.equal(again.img_to_idx(x), model.img_to_idx(x))
            assert torch.equal(again.encode(x)["pooler_out"], model.encode(x)["pooler_out"])


def test_convert_checkpoint(official, tmp_path):
    ref, path, enc = official("tiny")
    out = tmp_path / "converted"
    returned = convert_checkpoint(path, str(out), encoder_config=enc)
    assert isinstance(returned, WinTok)
    assert (out / CONFIG_NAME).is_file() and (out / WEIGHTS_NAME).is_file()
    loaded = WinTok.from_checkpoint(str(out))  # no encoder config needed any more
    assert loaded.config == returned.config
    _assert_matches_reference(loaded, ref, ref.sizes)


def test_bad_config_in_model_directory(tmp_path, official):
    ref, path, enc = official("tiny")
    out = tmp_path / "d"
    _load(path, encoder_config=enc).save_pretrained(str(out))
    cfg = (out / CONFIG_NAME).read_text().replace('"vocab_size"', '"bogus_key": 1, "vocab_size"')
    (out / CONFIG_NAME).write_text(cfg)
    with pytest.raises(CheckpointError, match="bogus_key"):
        WinTok.from_checkpoint(str(out))


# ------------------------------------------------------------------- unsafe / broken files


class _Payload:
    """Unpickling this runs `code`: what a malicious checkpoint does."""

    def __init__(self, code: str) -> None:
        self.code = code

    def __reduce__(self):
        return (exec, (self.code,))


def _malicious_checkpoint(ref: OfficialWinTok, path: str, marker: str) -> str:
    args = ref.official_args(note=_Payload(f"open({marker!r}, 'w').close()"))
    return ref.save_official(path, args=args)


def test_malicious_pickle_is_refused_and_never_runs(official, tmp_path):
    ref, _, enc = official("tiny")
    marker = tmp_path / "PWNED"
    p = _malicious_checkpoint(ref, str(tmp_path / "evil.pth"), str(marker))
    with pytest.raises(CheckpointError, match="pickled code"):
        _load(p, encoder_config=enc)
    with pytest.raises(CheckpointError, match="pickled code"):
        convert_checkpoint(p, str(tmp_path / "out"), encoder_config=enc)
    assert not marker.exists()
    assert not (tmp_path / "out" / WEIGHTS_NAME).exists()
    # The payload is live: a plain pickle load of the same file does run it.
    torch.load(p, weights_only=False)
    assert marker.exists()


def test_pickle_needing_checkpoint_refused_then_loads_with_allow_pickle(official, tmp_path):
    """A legitimate file whose `args` is an argparse.Namespace (older trainers saved that)."""
    ref, _, enc = official("tiny")
    p = ref.save_official(str(tmp_path / "ns.pth"), args=argparse.Namespace(**ref.official_args()))
    with pytest.raises(CheckpointError, match="pickled code") as e:
        _load(p, encoder_config=enc)
    assert "Namespace" in str(e.value) and "allow_pickle" in str(e.value)
    # TRUSTED-SOURCE PATH: allow_pickle=True really unpickles the file (runs its code). Only for
    # files you trust; here it is ours. Args come from the Namespace.
    with pytest.warns(UserWarning, match="pickle enabled"):
        model = _load(p, encoder_config=enc, allow_pickle=True)
    assert model.config.decoder_depth == ref.sizes.decoder_rec_depth
    _assert_matches_reference(model, ref, ref.sizes)
    # ... and converting it once gives a directory that loads without pickle.
    with pytest.warns(UserWarning, match="pickle enabled"):
        convert_checkpoint(p, str(tmp_path / "conv"), encoder_config=enc, allow_pickle=True)
    _assert_matches_reference(WinTok.from_checkpoint(str(tmp_path / "conv")), ref, ref.sizes)


@pytest.mark.parametrize("kind", ["random", "text", "empty", "truncated"])
@pytest.mark.parametrize("allow_pickle", [False, True])
def test_unreadable_file_is_a_checkpoint_error(official, tmp_path, kind, allow_pickle):
    ref, path, enc = official("tiny")
    p = tmp_path / f"{kind}.pth"
    if kind == "random":
        p.write_bytes(torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0),
                                    dtype=torch.uint8).numpy().tobytes())
    elif kind == "text":
        p.write_text("this is not a checkpoint\n")
    elif kind == "empty":
        p.write_bytes(b"")
    else:
        data = open(path, "rb").read()
        p.write_bytes(data[: len(data) // 2])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(CheckpointError) as e:
            _load(str(p), encoder_config=enc, allow_pickle=allow_pickle)
    assert str(p) in str(e.value)
    assert "pickled code" not in str(e.value)  # garbage is not reported as "needs pickle"


def test_missing_file_is_a_checkpoint_error(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        WinTok.from_checkpoint(str(tmp_path / "nope.pth"))
    with pytest.raises(CheckpointError, match="not found"):
        WinTok.from_checkpoint("wintok-no-such-preset")


def test_not_an_official_structure(tmp_path):
    p = str(tmp_path / "other.pth")
    torch.save({"model": {"w": torch.zeros(1)}, "epoch": 1}, p)
    with pytest.raises(CheckpointError, match="not an official WinTok checkpoint"):
        WinTok.from_checkpoint(p)
