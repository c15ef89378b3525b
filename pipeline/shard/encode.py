"""Batches of decoded uint8 images -> model(s) -> numpy outputs.

:func:`encode` is the stage (batches in, ``(items, outputs)`` out, buffers given back);
:class:`Runner` loads the model(s) once and runs one batch; :func:`to_model_input` is the one
definition of the model's input (x / 127.5 - 1). One decoded batch feeds both WinTok and the teacher. Device, precision and memory are
handled here: uint8 copied once (pinned, non-blocking on CUDA), normalised on the device,
bf16 autocast on GPUs (the quantiser stays fp32 inside the model), fp32 on CPUs by default.
Semantic ids (a fitted codebook, or the checkpoint's trained quantiser) are assigned in fp32 on
the device from the same encoder pass.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from schemas import TokenLayout

from ..config import TINY_PRESET
from .batch import Batch, BufferPool
from .decode import DecodedSample

log = logging.getLogger("wintok")

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}


@dataclass(frozen=True)
class ModelSpec:
    """What to run. Config only: it travels to Ray workers, weights load there."""

    model: str | None = TINY_PRESET         # preset, our dir, official .pth; None = teacher only
    encoder_config: str | None = None
    allow_pickle: bool = False
    dtype: str = "auto"                     # auto = bf16 on CUDA, fp32 on CPU
    device: str = "auto"                    # auto | cpu | cuda
    semantic_tokens: bool = False           # also store the (N, D) semantic tokens
    semantic_codebook: str | None = None    # as JobConfig.semantic_codebook (None: the model dir's, if any)
    teacher: str | None = None
    teacher_dtype: str = "auto"
    teacher_patch_tokens: bool = False
    compile: bool = False


def pick_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError("device cuda was asked for but no CUDA device is visible to this worker")
    return torch.device(device)


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    try:
        return DTYPES[name]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}: use auto, bf16 or fp32") from None


def load_wintok(spec: ModelSpec) -> Any:
    from wintok_model.checkpoint import load_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore" if spec.model and spec.model.startswith("wintok-") else "default")
        return load_model(spec.model, encoder_config=spec.encoder_config, allow_pickle=spec.allow_pickle)


class Runner:
    """Holds the model(s) on one device and turns uint8 batches into output columns."""

    def __init__(self, spec: ModelSpec, storage: Any = None) -> None:
        from ..models import localize

        spec = replace(spec, model=localize(spec.model, storage), teacher=localize(spec.teacher, storage))
        self.spec = spec
        self.device = pick_device(spec.device)
        self.dtype = pick_dtype(spec.dtype, self.device)
        self.model = None
        self.teacher = None
        if spec.model:
            self.model = load_wintok(spec).to(self.device).eval()
            self.model.requires_grad_(False)
            self._attach_codebook(spec)
            self._encode = torch.compile(self.model.encode, dynamic=False) if spec.compile else self.model.encode
        if spec.teacher:
            from wintok_model.teachers import load_teacher

            tdtype = pick_dtype(spec.teacher_dtype, self.device)
            self.teacher = load_teacher(spec.teacher, device=self.device, dtype=tdtype)
        if self.model is None and self.teacher is None:
            raise ValueError("nothing to run: give a WinTok model, a teacher, or both")
        self.image_size = self.model.config.image_size if self.model else self.teacher.spec.image_size
        self.layout = self._probe_layout()

    def _attach_codebook(self, spec: ModelSpec) -> None:
        """The run's semantic codebook (if any) onto the device: ids are assigned right after the
        encoder. Without one, a checkpoint's trained quantiser (if any) makes the ids."""
        from wintok_model.semantic import load_codebook

        from ..models import semantic_codebook_path

        path = semantic_codebook_path(spec.model, spec.semantic_codebook)
        if path is not None:
            self.model.attach_semantic_codebook(load_codebook(path).to(self.device))
        elif (spec.semantic_codebook or "").lower() == "none":  # not the checkpoint's trained quantiser either
            self.model.attach_semantic_codebook(None, use_trained=False)

    def _probe_layout(self) -> TokenLayout:
        kw: dict[str, Any] = {}
        if self.model is not None:
            c = self.model.config
            kw["pixel_ids"] = (c.num_codebooks, c.grid_size, c.grid_size)
            kw["semantic_dim"] = c.hidden_size
            if self.spec.semantic_tokens:
                kw["semantic_tokens"] = (c.num_latent_tokens, c.hidden_size)
            if self.model.semantic_codebook is not None:
                info = self.model.semantic_codebook.info
                kw["semantic_ids"], kw["semantic_codes"] = (c.num_latent_tokens, info.levels), info.k
        if self.teacher is not None:
            probe = torch.zeros(1, self.image_size, self.image_size, 3, dtype=torch.uint8, device=self.device)
            out = self.teacher(probe, patch_tokens=self.spec.teacher_patch_tokens)
            kw["teacher_dim"] = int(out["embedding"].shape[-1])
            if self.spec.teacher_patch_tokens:
                kw["teacher_patch_tokens"] = tuple(int(s) for s in out["patch_tokens"].shape[1:])
        return TokenLayout(**kw)

    def to_device(self, batch: np.ndarray) -> torch.Tensor:
        """uint8 batch onto the device: on CUDA through one reused pinned buffer, non-blocking."""
        t = torch.from_numpy(batch)
        if self.device.type != "cuda":
            return t
        buf = getattr(self, "_pinned", None)
        if buf is None or buf.shape[0] < t.shape[0] or buf.shape[1:] != t.shape[1:]:
            buf = self._pinned = torch.empty(t.shape, dtype=torch.uint8).pin_memory()
        view = buf[: t.shape[0]]
        view.copy_(t)  # the previous batch's copy finished: run() synchronised on its outputs
        return view.to(self.device, non_blocking=True)

    @torch.inference_mode()
    def run(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        """(B, S, S, 3) uint8 -> output columns as numpy arrays (fp32 / int64)."""
        n = batch.shape[0]
        if self.spec.compile and self.device.type == "cuda" and getattr(self, "_static_b", n) > n:
            # keep shapes static for the compiled graph: pad the last, short batch
            batch = np.concatenate([batch, np.zeros((self._static_b - n, *batch.shape[1:]), batch.dtype)])
        self._static_b = max(getattr(self, "_static_b", 0), batch.shape[0])
        images = self.to_device(batch)
        out: dict[str, np.ndarray] = {}
        if self.model is not None:
            x = to_model_input(images, torch.channels_last)  # the layout a permuted view has
            autocast = torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32)
            with autocast:
                enc = self._encode(x, with_quant=False)
            c = self.model.config
            ids = enc["indices"].view(-1, c.num_codebooks, c.grid_size, c.grid_size)
            out["pixel_ids"] = ids.to(torch.int32).cpu().numpy()
            out["semantic_pooled"] = F.normalize(enc["pooler_out"].float(), dim=-1).cpu().numpy()
            if self.spec.semantic_tokens:
                out["semantic_tokens"] = enc["query_tokens"].float().cpu().numpy()
            codebook = self.model.semantic_codebook
            if codebook is not None:  # fp32, on the device, from the same pass
                sem_ids = codebook.assign(enc["query_tokens"])
                out["semantic_ids"] = sem_ids.to(torch.int64 if codebook.info.k > 1 << 31
                                                 else torch.int32).cpu().numpy()
        if self.teacher is not None:
            t = self.teacher(images, patch_tokens=self.spec.teacher_patch_tokens)
            out["teacher_embedding"] = t["embedding"].float().cpu().numpy()
            if self.spec.teacher_patch_tokens:
                out["teacher_patch_tokens"] = t["patch_tokens"].float().cpu().numpy()
        return {k: v[:n] for k, v in out.items()}


def to_model_input(batch_uint8: torch.Tensor,
                   memory_format: torch.memory_format = torch.contiguous_format) -> torch.Tensor:
    """(B, H, W, 3) uint8 -> (B, 3, H, W) float32 in [-1, 1] (x / 127.5 - 1), on the same device.

    `memory_format`: the result's layout (the values are the same). The runner asks for
    ``channels_last``, the strides of the permuted uint8 batch, which it has always fed the model.
    """
    if batch_uint8.dtype != torch.uint8 or batch_uint8.dim() != 4 or batch_uint8.shape[-1] != 3:
        raise ValueError(
            f"expected a (B, H, W, 3) uint8 tensor, got {tuple(batch_uint8.shape)} {batch_uint8.dtype}"
        )
    b, h, w, _ = batch_uint8.shape
    out = torch.empty((b, 3, h, w), dtype=torch.float32, device=batch_uint8.device, memory_format=memory_format)
    out.copy_(batch_uint8.permute(0, 3, 1, 2))
    return out.div_(127.5).sub_(1.0)


Encoded = tuple[list[DecodedSample], dict[str, np.ndarray]]


def encode(batches: Iterable[Batch], run: Callable[[np.ndarray], dict[str, np.ndarray]],
           pool: BufferPool) -> Iterator[Encoded]:
    """(items, outputs) per batch: `run` (``Runner.run``) on its decoded rows; the buffer goes back to `pool`."""
    for batch in batches:
        try:
            outputs = run(batch.pixels[: batch.n]) if batch.n and batch.pixels is not None else {}
        finally:
            pool.give(batch.pixels)
        yield batch.items, outputs
