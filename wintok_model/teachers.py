"""Frozen teacher registry: SigLIP / SigLIP2 (NaFlex), DINOv2 and CLIP vision towers from local HF folders.

The pipeline decodes an image once to a uint8 (B, H, W, 3) tensor and hands the same tensor to WinTok
and to the teacher; `Teacher.preprocess` reproduces the teacher's Hugging Face image processor on the
device (resize, optional center crop, rescale, mean/std). Nothing is ever downloaded: `load_teacher`
takes a save_pretrained folder or a model id already in the local Hugging Face cache.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

__all__ = ["Teacher", "TeacherError", "TeacherSpec", "load_teacher"]

# config.json model_type -> (kind, transformers vision class name)
_MODEL_TYPES: dict[str, tuple[str, str]] = {
    "siglip": ("siglip", "SiglipVisionModel"),
    "siglip_vision_model": ("siglip", "SiglipVisionModel"),
    "siglip2": ("siglip2", "Siglip2VisionModel"),
    "siglip2_vision_model": ("siglip2", "Siglip2VisionModel"),
    "dinov2": ("dinov2", "Dinov2Model"),
    "dinov2_with_registers": ("dinov2", "Dinov2WithRegistersModel"),
    "clip": ("clip", "CLIPVisionModelWithProjection"),
    "clip_vision_model": ("clip", "CLIPVisionModelWithProjection"),
}
# kind -> accepted poolings, the first is the default
_POOLINGS: dict[str, tuple[str, ...]] = {
    "siglip": ("pooler_output", "mean"),
    "siglip2": ("pooler_output", "mean"),
    "dinov2": ("cls", "mean", "cls+mean"),
    "clip": ("image_embeds", "pooler_output"),
}
_IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
_CLIP = ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))
_RESAMPLE = {2: "bilinear", 3: "bicubic"}  # PIL codes used by HF image processors
_VOLATILE_CONFIG_KEYS = {"transformers_version", "_name_or_path", "_commit_hash"}
_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


class TeacherError(RuntimeError):
    """A teacher cannot be found, loaded or used as asked."""


@dataclass(frozen=True)
class TeacherSpec:
    """What the teacher is, for the run fingerprint.

    `resize` is the interpolation used to bring the uint8 input to `image_size`: "bilinear" or
    "bicubic" for a direct resize to image_size x image_size, or "<mode>+center_crop(N)" for a
    shortest-edge resize to N followed by an image_size center crop (the HF CLIP/DINOv2 recipe).
    `weights_sha256` is the sha256 of the single weights file, or for sharded weights the sha256 of
    the lines "<file name>  <file sha256>\\n" sorted by file name.
    """

    name: str
    kind: str
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    resize: str
    embed_dim: int
    pooling: str
    config_sha256: str
    weights_sha256: str


class Teacher(torch.nn.Module):
    """A frozen vision tower plus its on-device preprocessing; see `load_teacher`."""

    def __init__(self, model: torch.nn.Module, spec: TeacherSpec, *, short_edge: int | None,
                 mode: str, patch_size: int, skip_tokens: int, interpolate_pos: bool) -> None:
        super().__init__()
        self.model = model
        self.spec = spec
        self._short_edge = short_edge
        self._mode = mode
        self._patch = patch_size
        self._skip = skip_tokens
        self._interpolate_pos = interpolate_pos
        self.register_buffer("mean", torch.tensor(spec.mean, dtype=torch.float32), persistent=False)
        self.register_buffer("std", torch.tensor(spec.std, dtype=torch.float32), persistent=False)

    @property
    def dtype(self) -> torch.dtype:
        """Dtype of the model weights (and of `preprocess` output)."""
        return next(self.model.parameters()).dtype

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (B, H, W, 3) on any device -> normalised (B, 3, S, S) on the model's device and dtype.

        Resizing is separable (width pass, then height pass) with antialiased kernels and rounding
        to uint8 levels after each pass, as PIL does; it matches the HF image processors within
        one uint8 level per pixel.
        """
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"teacher input must be uint8 (B, H, W, 3), got {images.dtype} {tuple(images.shape)}")
        x = images.to(self.mean.device, non_blocking=True).permute(0, 3, 1, 2).float()
        size = self.spec.image_size
        h, w = x.shape[-2:]
        if self._short_edge is None:
            th, tw = size, size
        elif h <= w:
            th, tw = self._short_edge, int(self._short_edge * w / h)
        else:
            th, tw = int(self._short_edge * h / w), self._short_edge
        if tw != w:
            x = F.interpolate(x, size=(h, tw), mode=self._mode, align_corners=False, antialias=True)
            x = x.clamp_(0, 255).round_()
        if th != h:
            x = F.interpolate(x, size=(th, tw), mode=self._mode, align_corners=False, antialias=True)
            x = x.clamp_(0, 255).round_()
        if (th, tw) != (size, size):
            top, left = (th - size) // 2, (tw - size) // 2
            x = x[..., top:top + size, left:left + size]
        x = (x * (1.0 / 255.0) - self.mean[:, None, None]) / self.std[:, None, None]
        return x.to(self.dtype).contiguous()

    @torch.inference_mode()
    def forward(self, images: torch.Tensor, patch_tokens: bool = False) -> dict[str, torch.Tensor]:
        """uint8 images -> {"embedding": (B, Dt) float32[, "patch_tokens": (B, N, Dp) float32]}.

        The embedding is the raw (un-normalised) pooled output named by `spec.pooling`; patch tokens
        are the last hidden state without CLS/register tokens (CLIP: before its post-layernorm).
        """
        x = self.preprocess(images)
        kind, pooling = self.spec.kind, self.spec.pooling
        if kind == "siglip2":
            b, c, s, p = x.shape[0], x.shape[1], x.shape[-1], self._patch
            n = s // p
            # (B, C, n, p, n, p) -> (B, n*n, p*p*C): row-major patches, each flattened (row, col, channel)
            pixels = x.reshape(b, c, n, p, n, p).permute(0, 2, 4, 3, 5, 1).reshape(b, n * n, p * p * c)
            mask = torch.ones(b, n * n, dtype=torch.int32, device=x.device)
            shapes = torch.tensor([[n, n]], dtype=torch.long, device=x.device).expand(b, 2)
            out = self.model(pixel_values=pixels, pixel_attention_mask=mask, spatial_shapes=shapes)
        elif kind == "clip":
            out = self.model.vision_model(pixel_values=x, interpolate_pos_encoding=self._interpolate_pos)
        elif kind == "siglip":
            out = self.model(pixel_values=x, interpolate_pos_encoding=self._interpolate_pos)
        else:
            out = self.model(pixel_values=x)
        tokens = out.last_hidden_state[:, self._skip:]
        if pooling == "pooler_output":
            emb = out.pooler_output
        elif pooling == "image_embeds":
            emb = self.model.visual_projection(out.pooler_output)
        elif pooling == "cls":
            emb = out.last_hidden_state[:, 0]
        elif pooling == "mean":
            emb = tokens.mean(dim=1)
        else:  # cls+mean, as in Dinov2ForImageClassification
            emb = torch.cat([out.last_hidden_state[:, 0], tokens.mean(dim=1)], dim=-1)
        result = {"embedding": emb.float()}
        if patch_tokens:
            result["patch_tokens"] = tokens.float()
        return result

    def fingerprint(self) -> dict[str, Any]:
        """JSON-able dict of the spec (tuples as lists)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self.spec).items()}


def load_teacher(spec: str, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                 pooling: str | None = None) -> Teacher:
    """Load a frozen teacher from a save_pretrained folder or a model id in the local HF cache.

    Only the vision tower is loaded (full SigLIP/CLIP checkpoints keep their text tower on disk).
    `pooling` defaults to pooler_output (SigLIP/SigLIP2), cls (DINOv2) or image_embeds (CLIP).
    Raises TeacherError, without any network access, when the teacher is missing or unusable.
    """
    folder, cfg, kind, class_name, pooling = _identify(spec, pooling)
    weights_sha = _weights_sha256(folder, spec)
    model = _load_vision_model(folder, spec, cfg, kind, class_name, pooling, dtype)
    model.to(torch.device(device)).eval().requires_grad_(False)
    vcfg = model.config
    size, short_edge, mode, mean, std = _geometry(folder, spec, kind, vcfg)
    hidden = vcfg.hidden_size
    embed_dim = {"image_embeds": getattr(vcfg, "projection_dim", hidden), "cls+mean": 2 * hidden}.get(pooling, hidden)
    tspec = TeacherSpec(
        name=spec, kind=kind, image_size=size, mean=mean, std=std,
        resize=mode if short_edge is None else f"{mode}+center_crop({short_edge})",
        embed_dim=embed_dim, pooling=pooling, config_sha256=_config_sha256(cfg), weights_sha256=weights_sha,
    )
    skip = {"dinov2": 1 + getattr(vcfg, "num_register_tokens", 0), "clip": 1}.get(kind, 0)
    interpolate = kind in ("siglip", "clip") and size != vcfg.image_size
    return Teacher(model, tspec, short_edge=short_edge, mode=mode, patch_size=vcfg.patch_size,
                   skip_tokens=skip, interpolate_pos=interpolate)


def _identify(spec: str, pooling: str | None) -> tuple[Path, dict[str, Any], str, str, str]:
    """(folder, config, kind, transformers class name, pooling) of a teacher, checked."""
    folder = _resolve(spec)
    cfg = _read_json(folder / "config.json", spec)
    model_type = cfg.get("model_type")
    if model_type not in _MODEL_TYPES:
        raise TeacherError(f"teacher {spec!r}: unsupported model_type {model_type!r} in config.json; "
                           f"supported: {', '.join(sorted(_MODEL_TYPES))}")
    kind, class_name = _MODEL_TYPES[model_type]
    pooling = pooling or _POOLINGS[kind][0]
    if pooling not in _POOLINGS[kind]:
        raise TeacherError(f"teacher {spec!r}: pooling {pooling!r} is not available for {kind}; "
                           f"choose one of {', '.join(_POOLINGS[kind])}")
    return folder, cfg, kind, class_name, pooling


def _resolve(spec: str) -> Path:
    """A local folder as given, else the snapshot folder of a model id in the local HF cache."""
    path = Path(spec).expanduser()
    if path.is_dir():
        return path
    found = None
    if not path.exists():
        try:
            from huggingface_hub import try_to_load_from_cache

            found = try_to_load_from_cache(spec, "config.json")  # filesystem only, never the network
        except Exception:  # invalid repo id, unreadable cache: same answer as "not cached"
            found = None
    if isinstance(found, str):
        return Path(found).parent
    from huggingface_hub import constants

    raise TeacherError(
        f"teacher {spec!r} not found: it is neither a local directory nor a model id in the local Hugging Face "
        f"cache ({constants.HF_HUB_CACHE}); nothing is downloaded at load time. Pass a directory in "
        f"save_pretrained layout (config.json + model.safetensors [+ preprocessor_config.json]), or fetch the "
        f"model first on a machine with network access (e.g. `hf download {spec}`) and point HF_HUB_CACHE at it."
    )


def _read_json(path: Path, spec: str) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise TeacherError(f"teacher {spec!r}: {path} is missing; expected a save_pretrained folder") from None
    except (OSError, ValueError) as e:
        raise TeacherError(f"teacher {spec!r}: cannot read {path}: {e}") from e
    if not isinstance(data, dict):
        raise TeacherError(f"teacher {spec!r}: {path} is not a JSON object")
    return data


def _config_sha256(cfg: dict[str, Any]) -> str:
    """sha256 of config.json as canonical JSON (sorted keys, no spaces), minus volatile keys."""
    canon = {k: v for k, v in cfg.items() if k not in _VOLATILE_CONFIG_KEYS}
    text = json.dumps(canon, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode()).hexdigest()


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 23):
            h.update(chunk)
    return h.hexdigest()


def _weights_sha256(folder: Path, spec: str) -> str:
    """Hash the weight files transformers will load (safetensors first, then .bin; sharded or not)."""
    files: list[str] = []
    for name in _WEIGHT_FILES:
        if (folder / name).is_file():
            files = [name]
            break
        index = folder / f"{name}.index.json"
        if index.is_file():
            files = sorted(set(_read_json(index, spec).get("weight_map", {}).values()))
            break
    if not files:
        raise TeacherError(f"teacher {spec!r}: no weights in {folder} (expected model.safetensors, "
                           "pytorch_model.bin or a sharded *.index.json)")
    missing = [n for n in files if not (folder / n).is_file()]
    if missing:
        raise TeacherError(f"teacher {spec!r}: weight shards missing in {folder}: {', '.join(missing)}")
    if len(files) == 1:
        return _file_sha256(folder / files[0])
    lines = "".join(f"{n}  {_file_sha256(folder / n)}\n" for n in files)
    return hashlib.sha256(lines.encode()).hexdigest()


def _load_vision_model(folder: Path, spec: str, cfg: dict[str, Any], kind: str, class_name: str,
                       pooling: str, dtype: torch.dtype) -> torch.nn.Module:
    """Load only the vision tower; refuse silently re-initialised weights."""
    import transformers
    from transformers.utils import logging as hf_logging

    cls = getattr(transformers, class_name)
    verbosity, bar = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()  # full checkpoints report their text tower as "unexpected" keys
    hf_logging.disable_progress_bar()
    try:
        vcfg = cls.config_class.from_pretrained(folder, local_files_only=True)
        if kind == "clip" and "projection_dim" in cfg:  # full CLIPModel: the projection size lives at top level
            vcfg.projection_dim = cfg["projection_dim"]
        if kind.startswith("siglip") and pooling == "pooler_output" and not vcfg.vision_use_head:
            raise TeacherError(f"teacher {spec!r} has no attention-pooling head (vision_use_head=False), so "
                               "pooler_output is unavailable; pass pooling='mean' or a checkpoint with a head")
        model, info = cls.from_pretrained(folder, config=vcfg, dtype=dtype, local_files_only=True,
                                          output_loading_info=True)
    except TeacherError:
        raise
    except Exception as e:
        raise TeacherError(f"teacher {spec!r}: cannot load {class_name} from {folder}: {e}") from e
    finally:
        hf_logging.set_verbosity(verbosity)
        if bar:
            hf_logging.enable_progress_bar()
    missing = sorted(info.get("missing_keys", ()))
    head = [k for k in missing if re.search(r"(^|\.)head\.", k)]
    if head and kind.startswith("siglip") and pooling == "pooler_output":
        raise TeacherError(f"teacher {spec!r}: checkpoint has no attention-pooling head weights ({head[0]}, ...), "
                           "so pooler_output would be random; pass pooling='mean' or a checkpoint with a head")
    missing = [k for k in missing if k not in head or not kind.startswith("siglip")]
    if missing or info.get("mismatched_keys"):
        raise TeacherError(f"teacher {spec!r}: weights do not match {class_name}: missing {missing[:5]}, "
                           f"mismatched {sorted(info.get('mismatched_keys', ()))[:5]}")
    return model


def _preprocessor(folder: Path, spec: str) -> dict[str, Any]:
    """preprocessor_config.json (or processor_config.json's image_processor), else {}."""
    if (folder / "preprocessor_config.json").is_file():
        return _read_json(folder / "preprocessor_config.json", spec)
    if (folder / "processor_config.json").is_file():
        nested = _read_json(folder / "processor_config.json", spec).get("image_processor")
        return nested if isinstance(nested, dict) else {}
    return {}


def _edge(value: Any) -> int | None:
    """An HF size/crop_size value (int or dict) -> one edge length; None when absent."""
    if value is None or isinstance(value, int):
        return value
    if "shortest_edge" in value:
        return int(value["shortest_edge"])
    if value.get("height") != value.get("width"):
        raise TeacherError(f"non-square teacher input size {value} is not supported")
    return int(value["height"])


def _geometry(folder: Path, spec: str, kind: str, vcfg: Any
              ) -> tuple[int, int | None, str, tuple[float, float, float], tuple[float, float, float]]:
    """(image_size, shortest-edge size before center crop or None, resize mode, mean, std)."""
    pre = _preprocessor(folder, spec)
    mean, std = {"dinov2": _IMAGENET, "clip": _CLIP}.get(kind, ((0.5,) * 3, (0.5,) * 3))
    if pre.get("do_normalize", True):
        mean = tuple(float(v) for v in _triple(pre.get("image_mean", mean)))
        std = tuple(float(v) for v in _triple(pre.get("image_std", std)))
    else:
        mean, std = (0.0,) * 3, (1.0,) * 3
    default_mode = "bilinear" if kind == "siglip2" else "bicubic"
    code = pre.get("resample")
    if code is not None and code not in _RESAMPLE:
        raise TeacherError(f"teacher {spec!r}: unsupported resample {code} in the preprocessor config")
    mode = _RESAMPLE.get(code, default_mode)
    short_edge: int | None = None
    if kind == "siglip2":  # NaFlex: a square image gets isqrt(max_num_patches) patches per side
        n = int(pre.get("max_num_patches", vcfg.num_patches))
        size = math.isqrt(n) * int(pre.get("patch_size", vcfg.patch_size))
    elif kind == "siglip":
        size = _edge(pre.get("size")) or vcfg.image_size
    else:
        default = (256, 224) if kind == "dinov2" else (vcfg.image_size, vcfg.image_size)
        short_edge = _edge(pre.get("size")) or default[0]
        crop = pre.get("do_center_crop", True)
        size = (_edge(pre.get("crop_size")) or default[1]) if crop else short_edge
    return size, short_edge, mode, mean, std  # type: ignore[return-value]


def _triple(value: Any) -> list[float]:
    return [float(value)] * 3 if isinstance(value, (int, float)) else [float(v) for v in value]


def teacher_identity(spec: str, pooling: str | None = None) -> dict[str, Any]:
    """What identifies a teacher in a run fingerprint, without loading it: kind, pooling, hashes.

    Raises TeacherError (no network) when the teacher is missing or unsupported, so a bad
    `--teacher` stops a run before any work starts.
    """
    folder, cfg, kind, _, pooling = _identify(spec, pooling)
    preproc = folder / "preprocessor_config.json"
    return {"name": os.path.basename(str(spec).rstrip("/")), "kind": kind, "pooling": pooling,
            "config_sha256": _config_sha256(cfg), "weights_sha256": _weights_sha256(folder, spec),
            "preprocessor_sha256": _file_sha256(preproc) if preproc.is_file() else None}
