"""WinTok configuration: one frozen dataclass, named presets, and readers for official configs.

Official WinTok checkpoints store the trainer's `args` (image size, quantiser and decoder
sizes) but not the SigLIP encoder's config (heads, eps): that comes from the SigLIP(2)
`config.json` the model was trained from, or from a preset.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, fields
from typing import Any


class ConfigError(ValueError):
    """A WinTok config is invalid or names an unknown key."""


@dataclass(frozen=True)
class WinTokConfig:
    """Every size that defines a WinTok model. Defaults are the released so400m-256 model."""

    # SigLIP(2) encoder
    image_size: int = 256
    patch_size: int = 16
    num_channels: int = 3
    hidden_size: int = 1152
    num_hidden_layers: int = 27
    num_attention_heads: int = 16
    intermediate_size: int = 4304
    layer_norm_eps: float = 1e-6
    hidden_act: str = "gelu_pytorch_tanh"
    # semantic (query) tokens
    num_latent_tokens: int = 32
    # multi-codebook VQ
    vocab_size: int = 16384
    vocab_width: int = 32
    num_codebooks: int = 4
    # pixel decoder (Siglip2-style transformer)
    decoder_depth: int = 27
    decoder_num_heads: int = 16
    decoder_hidden_size: int = 1152
    decoder_intermediate_size: int = 4304
    decoder_layer_norm_eps: float = 1e-6
    # a trained semantic quantiser (`semantic_quantizer.*`): multi-codebook over the semantic
    # tokens, cosine argmax like the pixel one; 0 = none (ids then come from a fitted codebook)
    semantic_vocab_size: int = 0
    semantic_num_codebooks: int = 1

    def __post_init__(self) -> None:
        problems = []
        if self.image_size % self.patch_size:
            problems.append(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        if self.hidden_size % self.num_attention_heads:
            problems.append(f"hidden_size {self.hidden_size} not divisible by {self.num_attention_heads} heads")
        if self.decoder_hidden_size % self.decoder_num_heads:
            problems.append("decoder_hidden_size not divisible by decoder_num_heads")
        if self.vocab_size % self.num_codebooks or self.vocab_width % self.num_codebooks:
            problems.append("vocab_size and vocab_width must both divide by num_codebooks")
        if self.semantic_vocab_size and (self.semantic_vocab_size % self.semantic_num_codebooks
                                         or self.hidden_size % self.semantic_num_codebooks):
            problems.append("semantic_vocab_size and hidden_size must both divide by semantic_num_codebooks")
        if self.vocab_size // self.num_codebooks > 65536:
            problems.append("codebook size above 65536 does not fit the uint16 id column")
        small, big = sorted((self.hidden_size, self.vocab_width))
        if big % small:
            problems.append("hidden_size and vocab_width must divide one another (AttnProjection)")
        if self.hidden_act not in ("gelu_pytorch_tanh", "gelu"):
            problems.append(f"hidden_act {self.hidden_act!r} is not supported (gelu_pytorch_tanh, gelu)")
        if problems:
            raise ConfigError("; ".join(problems))

    @property
    def grid_size(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid_size**2

    @property
    def codebook_size(self) -> int:
        return self.vocab_size // self.num_codebooks

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        if not self.semantic_vocab_size:  # models without one keep the dict (and run fingerprint) they had
            del d["semantic_vocab_size"], d["semantic_num_codebooks"]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> WinTokConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known - {"architecture", "format_version", "preset"})
        if unknown:
            raise ConfigError(f"unknown WinTok config keys: {unknown}")
        return cls(**{k: v for k, v in d.items() if k in known})

    def replace(self, **kw: Any) -> WinTokConfig:
        return dataclasses.replace(self, **kw)


PRESETS: dict[str, WinTokConfig] = {
    # Sizes of the released model: SigLIP2 so400m-patch16-256 encoder, 32 semantic tokens,
    # 16384 codes in 4 codebooks of width 8, a so400m-sized decoder.
    "wintok-so400m-256": WinTokConfig(),
    # A few-MB model for tests and the demo.
    "wintok-tiny": WinTokConfig(
        image_size=64, patch_size=8, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=128, num_latent_tokens=8, vocab_size=1024, vocab_width=16, num_codebooks=4,
        decoder_depth=2, decoder_num_heads=4, decoder_hidden_size=64, decoder_intermediate_size=128,
    ),
    # The shipped trained model's shape (wintok_model/weights/wintok-mini): 64 px, patch 8,
    # 4 codebooks of 1024, 8 semantic tokens; ~5 MB in fp32.
    "wintok-mini": WinTokConfig(
        image_size=64, patch_size=8, hidden_size=128, num_hidden_layers=4, num_attention_heads=4,
        intermediate_size=512, num_latent_tokens=8, vocab_size=4096, vocab_width=16, num_codebooks=4,
        decoder_depth=4, decoder_num_heads=4, decoder_hidden_size=128, decoder_intermediate_size=512,
    ),
    # Model-bound on a CPU (for benchmarks), still small to hold.
    "wintok-small": WinTokConfig(
        image_size=128, patch_size=16, hidden_size=384, num_hidden_layers=6, num_attention_heads=6,
        intermediate_size=1536, num_latent_tokens=16, vocab_size=4096, vocab_width=32, num_codebooks=4,
        decoder_depth=2, decoder_num_heads=6, decoder_hidden_size=384, decoder_intermediate_size=1536,
    ),
}


def get_preset(name: str) -> WinTokConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise ConfigError(f"unknown preset {name!r}; known presets: {', '.join(PRESETS)}") from None


# SiglipVisionConfig's defaults: HF config.json files omit keys equal to them.
_SIGLIP_VISION_DEFAULTS = {
    "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
    "num_channels": 3, "image_size": 224, "patch_size": 16, "hidden_act": "gelu_pytorch_tanh",
    "layer_norm_eps": 1e-6,
}


def read_siglip_vision_config(path: str) -> dict[str, Any]:
    """Encoder fields from a SigLIP/SigLIP2 `config.json` (a file, or a folder holding one)."""
    if os.path.isdir(path):
        path = os.path.join(path, "config.json")
    try:
        with open(path, encoding="utf-8") as f:
            raw = json.load(f)
    except FileNotFoundError:
        raise ConfigError(f"encoder config not found: {path} (give a SigLIP config.json or its folder)") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"encoder config {path} is not valid JSON: {e}") from None
    vision = raw.get("vision_config", raw)
    if not isinstance(vision, dict):
        raise ConfigError(f"encoder config {path} has no vision_config object")
    out = dict(_SIGLIP_VISION_DEFAULTS)
    out.update({k: vision[k] for k in _SIGLIP_VISION_DEFAULTS if k in vision})
    return out


# Official trainer `args` name -> our field.
_OFFICIAL_ARGS = {
    "img_size": "image_size",
    "vocab_size": "vocab_size",
    "vocab_width": "vocab_width",
    "num_codebooks": "num_codebooks",
    "num_latent_tokens": "num_latent_tokens",
    "decoder_rec_depth": "decoder_depth",
    "decoder_rec_num_heads": "decoder_num_heads",
    "decoder_rec_hidden_size": "decoder_hidden_size",
    "decoder_rec_intermediate_size": "decoder_intermediate_size",
}


def config_from_official_args(
    args: dict[str, Any], encoder: dict[str, Any] | None, base: WinTokConfig | None = None
) -> WinTokConfig:
    """Build a config from an official checkpoint's `args` plus the SigLIP encoder fields."""
    kw = (base or PRESETS["wintok-so400m-256"]).to_dict()
    for src, dst in _OFFICIAL_ARGS.items():
        if src in args and args[src] is not None:
            kw[dst] = args[src]
    if encoder:
        kw.update(encoder)
    return WinTokConfig.from_dict(kw)
