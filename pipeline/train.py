"""`wintok train CONFIG.yaml`: train or fine-tune WinTok on webdataset shards, distilled from
cached teacher embeddings (an OUTPUT of `tokenize`/`embed`) or from a teacher run online.

One process (CPU, or one GPU in bf16). The data stream is deterministic in (seed, epoch):
shard order shuffled per epoch, samples through a bounded shuffle buffer, each sample's
augmentation drawn from (seed, epoch, position). A checkpoint holds the model (our directory
format), the optimizer and the data position; resuming replays the epoch's raw stream up to
that position without decoding it and continues with the same next batch.

Augmentation: random resized crops (area `min_scale`..1, aspect 3/4..4/3) and horizontal
flips of the student's input. The teacher's embedding always belongs to the image as the
pipeline preprocesses it (centre crop), which is also what a cache holds.
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import math
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

log = logging.getLogger("wintok")


class TrainConfigError(ValueError):
    """A training config the user must fix (one line)."""


@dataclass(frozen=True)
class TrainConfig:
    inputs: tuple[str, ...]                # webdataset shards (fsspec URLs, brace ranges, globs)
    output: str                            # checkpoints/, loss_log.jsonl, loss.png, final/
    model: str = "wintok-tiny"             # preset (random init) or a model directory to fine-tune
    from_scratch: bool = False             # `model` names a preset: start from its random init even
                                           # where a trained model of that name ships (wintok-mini)
    cache: str | None = None               # OUTPUT holding teacher_embedding for these shards
    teacher: str | None = None             # local HF teacher folder, run online when no cache
    steps: int = 1000
    batch_size: int = 16
    grad_accum: int = 1
    lr: float = 3e-4
    min_lr_ratio: float = 0.1              # cosine decays to lr * min_lr_ratio
    warmup: int = 100
    weight_decay: float = 0.05
    checkpoint_every: int = 500
    log_every: int = 10
    seed: int = 0
    device: str = "auto"
    dtype: str = "auto"                    # auto: bf16 autocast on CUDA, fp32 on CPU
    augment: bool = True
    min_scale: float = 0.35
    shuffle_buffer: int = 256
    threads: int = 0                       # torch intra-op threads (0: torch's default)
    losses: dict[str, float] = dataclasses.field(default_factory=dict)  # LossWeights overrides

    def __post_init__(self) -> None:
        if not self.inputs:
            raise TrainConfigError("inputs: give at least one shard URL")
        if self.cache and self.teacher:
            raise TrainConfigError("give either cache (cached teacher embeddings) or teacher (online), not both")
        for name in ("steps", "batch_size", "grad_accum", "checkpoint_every", "log_every", "shuffle_buffer"):
            if getattr(self, name) <= 0:
                raise TrainConfigError(f"{name} must be positive, got {getattr(self, name)}")

    @classmethod
    def from_yaml(cls, path: str, **overrides: Any) -> TrainConfig:
        import yaml

        try:
            with open(path, encoding="utf-8") as f:
                data = yaml.safe_load(f) or {}
        except OSError as e:
            raise TrainConfigError(f"cannot read {path}: {e.strerror}") from None
        if not isinstance(data, dict):
            raise TrainConfigError(f"{path}: expected a mapping of training options")
        data.update({k: v for k, v in overrides.items() if v is not None})
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise TrainConfigError(f"{path}: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        if isinstance(data.get("inputs"), str):
            data["inputs"] = [data["inputs"]]
        data["inputs"] = tuple(data.get("inputs") or ())
        return cls(**data)


# --------------------------------------------------------------------------- data
def augment(data: bytes, size: int, rng: np.random.Generator, min_scale: float) -> np.ndarray:
    """Random resized crop + flip -> (size, size, 3) uint8 (EXIF orientation applied)."""
    from PIL import Image

    from .preprocess import _TRANSPOSE, _orientation

    with Image.open(io.BytesIO(data)) as im:
        w, h = im.size  # crop drawn on the stored size, EXIF rotation applied after (a crop of a
        for _ in range(10):  # rotated image is a rotated crop: same distribution)
            area = w * h * rng.uniform(min_scale, 1.0)
            ratio = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
            cw, ch = int(round(math.sqrt(area * ratio))), int(round(math.sqrt(area / ratio)))
            if 0 < cw <= w and 0 < ch <= h:
                break
        else:
            cw = ch = min(w, h)
        x0, y0 = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        # JPEG: decode at the smallest DCT scale that keeps the crop at >= 2x the output size
        # (measured: the full decode of the large sample photos dominated a training step)
        im.draft("RGB", (max(1, w * 2 * size // cw), max(1, h * 2 * size // ch)))
        fx, fy = im.size[0] / w, im.size[1] / h
        box = (x0 * fx, y0 * fy, (x0 + cw) * fx, (y0 + ch) * fy)
        turn = _orientation(im)
        out = im.convert("RGB").resize((size, size), Image.BICUBIC, box=box, reducing_gap=3.0)
        if turn > 1:
            out = out.transpose(_TRANSPOSE[turn])
        if rng.random() < 0.5:
            out = out.transpose(Image.FLIP_LEFT_RIGHT)
        return np.asarray(out, dtype=np.uint8).copy()


@dataclass
class Example:
    student: np.ndarray                 # (S, S, 3) uint8, augmented
    plain: np.ndarray                   # (S, S, 3) uint8, the pipeline's preprocessing
    embedding: np.ndarray | None        # cached teacher embedding (float32) or None


class TrainData:
    """The deterministic training stream; `missing` / `bad` count what it had to leave out."""

    def __init__(self, cfg: TrainConfig, image_size: int) -> None:
        from .io import expand_inputs

        self.cfg, self.size = cfg, image_size
        self.urls = expand_inputs(cfg.inputs)
        self.missing = 0   # samples without a cached embedding (cache mode)
        self.bad = 0       # samples whose image could not be decoded
        self.bad_shards = 0  # shards that stopped with a read error (their earlier samples were used)
        self._cache_files: dict[str, Any] = {}
        if cfg.cache:
            from .output import Output

            self._cache = Output(cfg.cache)
            self._cache_files = {f.input_url: f for f in self._cache.shards()}

    def _embeddings(self, url: str) -> dict[str, np.ndarray] | None:
        if not self.cfg.cache:
            return None
        shard = self._cache_files.get(url)
        if shard is None:
            return {}
        from schemas import tensor_to_numpy

        t = self._cache.read(shard, ["key", "teacher_embedding"])
        emb = tensor_to_numpy(t.column("teacher_embedding")).astype(np.float32)
        return dict(zip(t.column("key").to_pylist(), emb, strict=True))

    def _raw(self, epoch: int) -> Iterator[tuple[str, bytes, np.ndarray | None]]:
        from .io import open_input
        from .shard.errors import ShardReadError
        from .shard.samples import iter_samples

        rng = np.random.default_rng([self.cfg.seed, epoch])
        buffer: list[tuple[str, bytes, np.ndarray | None]] = []
        for i in rng.permutation(len(self.urls)):
            url = self.urls[int(i)]
            cache = self._embeddings(url)
            try:
                with open_input(url) as stream:
                    for s in iter_samples(stream, url):
                        if s.image is None:
                            continue
                        emb = None
                        if cache is not None:
                            emb = cache.get(s.key)
                            if emb is None:
                                self.missing += 1
                                continue
                        buffer.append((s.key, s.image, emb))
                        if len(buffer) >= self.cfg.shuffle_buffer:
                            yield buffer.pop(int(rng.integers(len(buffer))))
            except ShardReadError as e:  # the samples read before the damage stay in the stream
                self.bad_shards += 1
                log.warning("train: %s", e)
        while buffer:
            yield buffer.pop(int(rng.integers(len(buffer))))

    def stream(self, epoch: int, skip: int = 0) -> Iterator[tuple[int, Example]]:
        """(position in the epoch, example) from position `skip` on."""
        from .preprocess import PreprocessConfig, decode_image
        from .shard.errors import SampleError

        pre = PreprocessConfig(image_size=self.size)
        for pos, (key, data, emb) in enumerate(self._raw(epoch)):
            if pos < skip:
                continue
            try:
                plain = decode_image(data, pre).pixels
                rng = np.random.default_rng([self.cfg.seed, epoch, pos])
                student = augment(data, self.size, rng, self.cfg.min_scale) if self.cfg.augment else plain
            except (SampleError, OSError, ValueError) as e:
                self.bad += 1
                log.warning("train: skipping %s: %s", key, e)
                continue
            yield pos, Example(student, plain, emb)


# --------------------------------------------------------------------------- the loop
def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup over `warmup` steps, then cosine to lr * min_lr_ratio at `steps`."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    t = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0))))


def _latest(output: str) -> str | None:
    path = os.path.join(output, "checkpoints", "latest")
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as f:
        return os.path.join(output, "checkpoints", f.read().strip())


class Trainer:
    def __init__(self, cfg: TrainConfig) -> None:
        import torch

        from wintok_model.checkpoint import load_model
        from wintok_model.training import LossWeights

        from .shard.encode import pick_device, pick_dtype

        self.cfg = cfg
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.device = pick_device(cfg.device)
        self.dtype = pick_dtype(cfg.dtype, self.device)
        try:
            self.weights = LossWeights(**cfg.losses)
        except TypeError as e:
            raise TrainConfigError(f"losses: {e}") from None
        self.step, self.epoch, self.position = 0, 0, 0
        resume = _latest(cfg.output)
        torch.manual_seed(cfg.seed)
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a preset here is a random init on purpose
            if resume:
                self.model = load_model(os.path.join(resume, "model"))
            elif cfg.from_scratch:
                from wintok_model import WinTok
                from wintok_model.config import get_preset

                self.model = WinTok(get_preset(cfg.model))
            else:
                self.model = load_model(cfg.model)
            self.model = self.model.to(self.device)
        self.model.train()
        decay = [p for n, p in self.model.named_parameters() if p.requires_grad and p.ndim >= 2]
        rest = [p for n, p in self.model.named_parameters() if p.requires_grad and p.ndim < 2]
        self.opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                      {"params": rest, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.95))
        if resume:
            self.opt.load_state_dict(torch.load(os.path.join(resume, "optimizer.pt"), weights_only=True))
            with open(os.path.join(resume, "state.json"), encoding="utf-8") as f:
                state = json.load(f)
            self.step, self.epoch, self.position = state["step"], state["epoch"], state["position"]
            log.info("train: resumed from %s (step %d)", resume, self.step)
        self.teacher = None
        if cfg.teacher:
            from wintok_model.teachers import load_teacher

            self.teacher = load_teacher(cfg.teacher, device=self.device, dtype=torch.float32)
        self.data = TrainData(cfg, self.model.config.image_size)
        self._stream: Iterator[tuple[int, Example]] | None = None

    def _next(self) -> Example:
        while True:
            if self._stream is None:
                self._stream = self.data.stream(self.epoch, self.position)
            for pos, ex in self._stream:
                self.position = pos + 1
                return ex
            if self.position == 0:
                raise TrainConfigError("the inputs hold no usable image" +
                                       (" with a cached embedding" if self.cfg.cache else ""))
            self.epoch, self.position, self._stream = self.epoch + 1, 0, None

    def batch(self) -> tuple[Any, Any]:
        import torch

        from .shard.encode import to_model_input

        exs = [self._next() for _ in range(self.cfg.batch_size)]
        x = to_model_input(torch.from_numpy(np.stack([e.student for e in exs])).to(self.device))
        if self.cfg.cache:
            emb = torch.from_numpy(np.stack([e.embedding for e in exs])).to(self.device)
        elif self.teacher is not None:
            with torch.no_grad():
                plain = torch.from_numpy(np.stack([e.plain for e in exs])).to(self.device)
                emb = self.teacher(plain)["embedding"].float()
        else:
            emb = None
        return x, emb

    def train_step(self) -> dict[str, float]:
        import torch

        from wintok_model.training import training_forward

        for group in self.opt.param_groups:
            group["lr"] = lr_at(self.step, self.cfg)
        self.opt.zero_grad(set_to_none=True)
        totals: dict[str, float] = {}
        for _ in range(self.cfg.grad_accum):
            x, emb = self.batch()
            with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32):
                out = training_forward(self.model, x, emb, self.weights)
            (out["loss"] / self.cfg.grad_accum).backward()
            for k, v in out.items():
                if v.ndim == 0:
                    totals[k] = totals.get(k, 0.0) + float(v.detach()) / self.cfg.grad_accum
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.opt.step()
        self.step += 1
        totals["lr"] = self.opt.param_groups[0]["lr"]
        return totals

    def save(self) -> str:
        import torch

        name = f"step-{self.step:07d}"
        final = os.path.join(self.cfg.output, "checkpoints", name)
        tmp = final + ".tmp"
        os.makedirs(tmp, exist_ok=True)
        self.model.save_pretrained(os.path.join(tmp, "model"))
        torch.save(self.opt.state_dict(), os.path.join(tmp, "optimizer.pt"))
        with open(os.path.join(tmp, "state.json"), "w", encoding="utf-8") as f:
            json.dump({"step": self.step, "epoch": self.epoch, "position": self.position,
                       "config": dataclasses.asdict(self.cfg)}, f, indent=1, default=str)
        if os.path.exists(final):
            import shutil

            shutil.rmtree(final)
        os.replace(tmp, final)
        latest = os.path.join(self.cfg.output, "checkpoints", "latest")
        with open(latest + ".tmp", "w", encoding="utf-8") as f:
            f.write(name)
        os.replace(latest + ".tmp", latest)  # the pointer moves only once the checkpoint is whole
        return final

    def run(self) -> dict[str, Any]:
        cfg = self.cfg
        os.makedirs(cfg.output, exist_ok=True)
        log_path = os.path.join(cfg.output, "loss_log.jsonl")
        t0 = time.perf_counter()
        last: dict[str, float] = {}
        with open(log_path, "a", encoding="utf-8") as logf:
            while self.step < cfg.steps:
                last = self.train_step()
                if self.step % cfg.log_every == 0 or self.step == cfg.steps:
                    logf.write(json.dumps({"step": self.step, **{k: round(v, 6) for k, v in last.items()},
                                           "seconds": round(time.perf_counter() - t0, 2)}) + "\n")
                    logf.flush()
                    log.info("train: step %d loss %.4f", self.step, last["loss"])
                if self.step % cfg.checkpoint_every == 0 or self.step == cfg.steps:
                    self.save()
        self.model.eval()
        self.model.save_pretrained(os.path.join(cfg.output, "final"))
        plot = loss_plot(log_path, os.path.join(cfg.output, "loss.png"))
        return {"steps": self.step, "seconds": round(time.perf_counter() - t0, 2), "last": last,
                "missing_from_cache": self.data.missing, "undecodable": self.data.bad,
                "final": os.path.join(cfg.output, "final"), "plot": plot}


def loss_plot(log_path: str, png: str) -> str | None:
    try:
        import matplotlib
    except ImportError:
        log.warning("train: no matplotlib, no loss plot (pip install 'wintok-pipeline[plot]')")
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(log_path, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    keys = [k for k in ("loss", "l1", "l2", "vq", "entropy", "distill") if any(k in r for r in rows)]
    fig, ax = plt.subplots(figsize=(7, 4))
    for k in keys:
        ax.plot([r["step"] for r in rows if k in r], [r[k] for r in rows if k in r], label=k)
    ax.set(xlabel="step", ylabel="loss", yscale="symlog", title="wintok train")
    ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)
    return png
