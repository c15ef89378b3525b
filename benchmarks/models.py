"""FLOPs per image of the models (for MFU) and the random-weight SigLIP teacher the GPU run uses."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from benchmarks import log


def _vit_flops(dim: int, mlp: int, layers: int, tokens: int) -> float:
    """Transformer blocks: 2*T*(4D^2 + 2*D*F) matmul FLOPs + 4*T^2*D for QK^T and AV, per layer."""
    return layers * (2.0 * tokens * (4 * dim * dim + 2 * dim * mlp) + 4.0 * tokens * tokens * dim)


def wintok_encode_flops(c: Any) -> dict[str, float]:
    """FLOPs of one image through `WinTok.encode(with_quant=False)` (the pipeline's call)."""
    P, N, D = c.num_patches, c.num_latent_tokens, c.hidden_size
    blocks = _vit_flops(D, c.intermediate_size, c.num_hidden_layers, P + N)
    embed = 2.0 * P * (c.num_channels * c.patch_size**2 * D)
    wide, W = max(D, c.vocab_width), c.vocab_width
    quant_proj = (2.0 * P * D * 3 * wide + 4.0 * P * P * wide + 2.0 * P * D * W + 2.0 * P * W * W
                  + 3 * 2.0 * P * W * (2 * W))  # qkv, attention, shortcut, out proj, GeGLU MLP
    vq = 2.0 * P * c.vocab_size * (W // c.num_codebooks)  # cosine scores against every code
    semantic = 2.0 * N * D * D
    total = blocks + embed + quant_proj + vq + semantic
    return {"total": total, "blocks": blocks, "params_term": 2.0 * (P + N) * c.num_hidden_layers
            * (4 * D * D + 2 * D * c.intermediate_size), "attention_term": blocks - 2.0 * (P + N)
            * c.num_hidden_layers * (4 * D * D + 2 * D * c.intermediate_size), "other": embed + quant_proj + vq + semantic}


def teacher_flops(path: str | None) -> float:
    """FLOPs of one image through a SigLIP-style teacher read from its config.json (0 if none)."""
    if not path:
        return 0.0
    try:
        cfg = json.loads((Path(path) / "config.json").read_text())
    except (OSError, ValueError):
        return 0.0
    v = cfg.get("vision_config", cfg)
    D, F, L = v.get("hidden_size", 768), v.get("intermediate_size", 3072), v.get("num_hidden_layers", 12)
    S, p = v.get("image_size", 224), v.get("patch_size", 16)
    P = (S // p) ** 2
    head = (2.0 * 2 * P * D * D + 2.0 * 2 * D * D + 4.0 * P * D + 2.0 * 2 * D * F) if v.get("vision_use_head", True) else 0.0
    return _vit_flops(D, F, L, P) + 2.0 * P * 3 * p * p * D + head


def model_flops(preset: str, teacher: str | None) -> dict[str, float]:
    from wintok_model.checkpoint import check_model

    f = wintok_encode_flops(check_model(preset))
    t = teacher_flops(teacher)
    return {"encoder": f["total"], "teacher": t, "total": f["total"] + t, "encoder_detail": f}


TEACHER_ARCHS = {
    # SigLIP so400m-patch16 sizes at 256 px: the teacher of the released WinTok
    "so400m-256": dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
                       image_size=256, patch_size=16),
    # a few-MB SigLIP for trying the teacher path on a CPU with wintok-tiny (64 px)
    "tiny-64": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                    image_size=64, patch_size=8),
    "small-128": dict(hidden_size=384, intermediate_size=1536, num_hidden_layers=6, num_attention_heads=6,
                      image_size=128, patch_size=16),
}


def make_teacher(folder: str, arch: str, dtype: str = "bf16") -> None:
    """A random-weight SiglipVisionModel of `arch` sizes, saved with save_pretrained (the teacher format)."""
    import torch
    from transformers import SiglipVisionConfig, SiglipVisionModel

    if (Path(folder) / "config.json").exists():
        log(f"teacher: {folder} exists, kept")
        return
    torch.manual_seed(0)
    t0 = time.monotonic()
    model = SiglipVisionModel(SiglipVisionConfig(**TEACHER_ARCHS[arch]))
    model = model.to(torch.bfloat16 if dtype == "bf16" else torch.float32)
    model.save_pretrained(folder)
    n = sum(p.numel() for p in model.parameters())
    log(f"teacher: random SigLIP {arch} ({n / 1e6:.0f} M params, {dtype}) saved to {folder} "
        f"in {time.monotonic() - t0:.1f} s")
