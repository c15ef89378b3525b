"""`wintok train CONFIG.yaml`: train or fine-tune WinTok on webdataset shards, distilled from
cached teacher embeddings (an OUTPUT of `tokenize`/`embed`) or from a teacher run online.

One process (CPU, or one GPU in bf16), or `workers: N` processes under Ray Train
(`TorchTrainer`, DDP: gloo on CPUs, nccl on GPUs) running the same `Trainer` loop. The data
stream is deterministic in (seed, epoch): shard order shuffled per epoch, samples through a
bounded shuffle buffer, each sample's augmentation drawn from (seed, epoch, position). A
checkpoint holds the model (our directory format), the optimizer and the data position;
resuming replays the epoch's raw stream up to that position without decoding it and continues
with the same next batch.

Several workers: rank r decodes the positions p of the epoch's stream with p % world == r
(every rank reads all the raw bytes, world x the reading; the decode and augmentation, the
larger part of a CPU step here, are split), takes
`batch_size` of them per micro-batch, and DDP averages the gradients: one step sees
batch_size x world samples, the same set as one process with batch_size x world when no
sample is undecodable and an epoch's length divides by world. Striding rather than splitting
shards keeps resume exact and simple: each rank's (epoch, position) in the one stream is its
whole data state, and the checkpoint's state.json lists them (`ranks`); a checkpoint resumes
only with the number of workers that wrote it. Only rank 0 writes the log, the checkpoints
and final/; logged losses are the mean over ranks.

Augmentation: random resized crops (area `min_scale`..1, aspect 3/4..4/3) and horizontal
flips of the student's input. The teacher's embedding always belongs to the image as the
pipeline preprocesses it (centre crop), which is also what a cache holds.
"""

from __future__ import annotations

import contextlib
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
    workers: int = 1                       # > 1: that many DDP processes under Ray Train
    use_gpu: bool | None = None            # workers > 1: one GPU each (None: when the cluster has them)
    address: str | None = None             # workers > 1: Ray cluster to join (else RAY_ADDRESS, else local)

    def __post_init__(self) -> None:
        if not self.inputs:
            raise TrainConfigError("inputs: give at least one shard URL")
        if self.cache and self.teacher:
            raise TrainConfigError("give either cache (cached teacher embeddings) or teacher (online), not both")
        for name in ("steps", "batch_size", "grad_accum", "checkpoint_every", "log_every", "shuffle_buffer",
                     "workers"):
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

    def stream(self, epoch: int, skip: int = 0, rank: int = 0, world: int = 1) -> Iterator[tuple[int, Example]]:
        """(position in the epoch, example) from position `skip` on, the positions of `rank` of `world`."""
        from .preprocess import PreprocessConfig, decode_image
        from .shard.errors import SampleError

        pre = PreprocessConfig(image_size=self.size)
        for pos, (key, data, emb) in enumerate(self._raw(epoch)):
            if pos < skip or pos % world != rank:
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


def _resume_state(output: str, world: int) -> tuple[str | None, dict[str, Any]]:
    """The checkpoint to resume from and its state.json, refused if another number of workers wrote it."""
    resume = _latest(output)
    if not resume:
        return None, {}
    with open(os.path.join(resume, "state.json"), encoding="utf-8") as f:
        state = json.load(f)
    wrote = len(state.get("ranks") or [None])
    if wrote != world:
        raise TrainConfigError(f"{resume} was written by {wrote} worker(s): resume it with workers: {wrote} "
                               "(each worker's data position is its own)")
    return resume, state


def _step_module(model: Any, weights: Any) -> Any:
    """The training forward as a module's forward: DDP syncs gradients only for what runs
    through its own forward, so it wraps this module whole (the scalar losses are its output)."""
    import torch

    from wintok_model.training import training_forward

    class Step(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, x: Any, emb: Any) -> dict[str, Any]:
            out = training_forward(self.model, x, emb, weights)
            return {k: v for k, v in out.items() if v.ndim == 0}

    return Step()


class Trainer:
    """The training loop. `rank`/`world` > 1: one of `world` DDP processes (a Ray Train worker,
    torch.distributed already set up); rank 0 alone writes the output."""

    def __init__(self, cfg: TrainConfig, rank: int = 0, world: int = 1, device: Any = None) -> None:
        import torch

        from wintok_model.checkpoint import load_model
        from wintok_model.training import LossWeights

        from .shard.encode import pick_device, pick_dtype

        self.cfg, self.rank, self.world = cfg, rank, world
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.device = device if device is not None else pick_device(cfg.device)
        self.dtype = pick_dtype(cfg.dtype, self.device)
        try:
            self.weights = LossWeights(**cfg.losses)
        except TypeError as e:
            raise TrainConfigError(f"losses: {e}") from None
        self.step, self.epoch, self.position = 0, 0, 0
        resume, state = _resume_state(cfg.output, world)
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
        self.net = _step_module(self.model, self.weights)
        if world > 1:  # DDP; prepare_model picks gloo / nccl's device as Ray Train set it up
            from ray.train.torch import prepare_model

            self.net = prepare_model(self.net, move_to_device=False,
                                     parallel_strategy_kwargs={"find_unused_parameters": True})
        decay = [p for n, p in self.model.named_parameters() if p.requires_grad and p.ndim >= 2]
        rest = [p for n, p in self.model.named_parameters() if p.requires_grad and p.ndim < 2]
        self.opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                      {"params": rest, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.95))
        if resume:
            self.opt.load_state_dict(torch.load(os.path.join(resume, "optimizer.pt"), weights_only=True,
                                                map_location=self.device))
            self.step = state["step"]
            self.epoch, self.position = state["ranks"][rank] if world > 1 else (state["epoch"], state["position"])
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
                self._stream = self.data.stream(self.epoch, self.position, self.rank, self.world)
            for pos, ex in self._stream:
                self.position = pos + 1
                return ex
            if self.position == 0:
                raise TrainConfigError("the inputs hold no usable image" +
                                       (" with a cached embedding" if self.cfg.cache else "") +
                                       (f" for worker {self.rank} of {self.world}" if self.world > 1 else ""))
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

    def _mean_over_ranks(self, values: dict[str, float]) -> dict[str, float]:
        if self.world == 1:
            return values
        import torch
        import torch.distributed as dist

        keys = sorted(values)
        t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return {k: float(v) / self.world for k, v in zip(keys, t.tolist(), strict=True)}

    def train_step(self) -> dict[str, float]:
        import torch

        for group in self.opt.param_groups:
            group["lr"] = lr_at(self.step, self.cfg)
        self.opt.zero_grad(set_to_none=True)
        totals: dict[str, float] = {}
        for i in range(self.cfg.grad_accum):
            x, emb = self.batch()
            last = i == self.cfg.grad_accum - 1  # DDP: gradients are averaged once, on the last micro-batch
            sync = contextlib.nullcontext() if self.world == 1 or last else self.net.no_sync()
            with sync:
                with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32):
                    out = self.net(x, emb)
                (out["loss"] / self.cfg.grad_accum).backward()
            for k, v in out.items():
                totals[k] = totals.get(k, 0.0) + float(v.detach()) / self.cfg.grad_accum
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.opt.step()
        self.step += 1
        totals = self._mean_over_ranks(totals)
        totals["lr"] = self.opt.param_groups[0]["lr"]
        return totals

    def _positions(self) -> list[tuple[int, int]]:
        """Every rank's (epoch, position), on every rank."""
        if self.world == 1:
            return [(self.epoch, self.position)]
        import torch.distributed as dist

        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, (self.epoch, self.position))
        return [tuple(p) for p in out]

    def save(self, positions: list[tuple[int, int]] | None = None) -> str:
        import torch

        positions = positions or [(self.epoch, self.position)]
        name = f"step-{self.step:07d}"
        final = os.path.join(self.cfg.output, "checkpoints", name)
        tmp = final + ".tmp"
        os.makedirs(tmp, exist_ok=True)
        self.model.save_pretrained(os.path.join(tmp, "model"))
        torch.save(self.opt.state_dict(), os.path.join(tmp, "optimizer.pt"))
        state: dict[str, Any] = {"step": self.step, "epoch": positions[0][0], "position": positions[0][1]}
        if len(positions) > 1:
            state["ranks"] = [list(p) for p in positions]
        with open(os.path.join(tmp, "state.json"), "w", encoding="utf-8") as f:
            json.dump({**state, "config": dataclasses.asdict(self.cfg)}, f, indent=1, default=str)
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
        cfg, main = self.cfg, self.rank == 0
        os.makedirs(cfg.output, exist_ok=True)
        log_path = os.path.join(cfg.output, "loss_log.jsonl")
        t0 = time.perf_counter()
        last: dict[str, float] = {}
        with open(log_path, "a", encoding="utf-8") if main else contextlib.nullcontext() as logf:
            while self.step < cfg.steps:
                last = self.train_step()
                if main and (self.step % cfg.log_every == 0 or self.step == cfg.steps):
                    logf.write(json.dumps({"step": self.step, **{k: round(v, 6) for k, v in last.items()},
                                           "seconds": round(time.perf_counter() - t0, 2)}) + "\n")
                    logf.flush()
                    log.info("train: step %d loss %.4f", self.step, last["loss"])
                if self.step % cfg.checkpoint_every == 0 or self.step == cfg.steps:
                    positions = self._positions()  # every rank takes part; rank 0 writes
                    if main:
                        self.save(positions)
                    self._barrier()  # no rank runs ahead of a checkpoint it might resume from
        self.model.eval()
        plot = None
        if main:
            self.model.save_pretrained(os.path.join(cfg.output, "final"))
            plot = loss_plot(log_path, os.path.join(cfg.output, "loss.png"))
        counts = self._sum_over_ranks({"bad": self.data.bad})  # each rank decodes its own samples;
        # every rank reads the whole raw stream, so rank 0's missing count is the stream's
        return {"steps": self.step, "seconds": round(time.perf_counter() - t0, 2), "last": last,
                "missing_from_cache": self.data.missing, "undecodable": int(counts["bad"]),
                "final": os.path.join(cfg.output, "final"), "plot": plot}

    def _sum_over_ranks(self, values: dict[str, float]) -> dict[str, float]:
        return {k: v * self.world for k, v in self._mean_over_ranks(values).items()}

    def _barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()


# --------------------------------------------------------------------------- several workers
def train(cfg: TrainConfig) -> dict[str, Any]:
    """`wintok train`: one process, or `cfg.workers` Ray Train workers; the same result either way."""
    if cfg.workers == 1:
        return Trainer(cfg).run()
    return _train_on_ray(cfg)


def _train_on_ray(cfg: TrainConfig) -> dict[str, Any]:
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from .cluster import start_ray

    _resume_state(cfg.output, cfg.workers)  # refused here, before any worker starts
    start_ray(cfg)  # type: ignore[arg-type]  # it reads only .address, as a job's config has it
    use_gpu = cfg.use_gpu
    if use_gpu is None:
        use_gpu = cfg.device != "cpu" and ray.cluster_resources().get("GPU", 0) >= cfg.workers
    out = os.path.abspath(cfg.output)  # every worker resolves it alike (a shared filesystem on a cluster)
    trainer = TorchTrainer(
        _worker, train_loop_config={"cfg": dataclasses.asdict(dataclasses.replace(cfg, output=out))},
        scaling_config=ScalingConfig(num_workers=cfg.workers, use_gpu=use_gpu),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        run_config=RunConfig(name="wintok-train", storage_path=os.path.join(out, "ray_train")))
    try:
        result = trainer.fit()
    except Exception as e:  # a worker's user error comes back wrapped: keep it one line
        cause = _user_error_in(e)
        if cause is not None:
            raise TrainConfigError(str(cause)) from None
        raise
    res = json.loads(result.metrics["result"])
    res["final"] = os.path.join(cfg.output, "final")  # as given, as one process prints them
    if res["plot"]:
        res["plot"] = os.path.join(cfg.output, "loss.png")
    return res


def _user_error_in(e: BaseException | None) -> BaseException | None:
    """The TrainConfigError a worker raised, inside Ray Train's WorkerGroupError, if any."""
    while e is not None:
        if isinstance(e, TrainConfigError):
            return e
        for inner in getattr(e, "worker_failures", {}).values():  # ray.train.WorkerGroupError: rank -> error
            found = _user_error_in(inner)
            if found is not None:
                return found
        e = e.__cause__
    return None


def _worker(loop_config: dict[str, Any]) -> None:
    """One Ray Train worker: the same Trainer as one process, at this worker's rank."""
    import ray.train
    from ray.train.torch import get_device

    fields = dict(loop_config["cfg"])
    fields["inputs"] = tuple(fields["inputs"])
    cfg = TrainConfig(**fields)
    ctx = ray.train.get_context()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    trainer = Trainer(cfg, rank=ctx.get_world_rank(), world=ctx.get_world_size(), device=get_device())
    result = trainer.run()
    # the result reaches the driver with a (tiny) Ray checkpoint: Ray Train keeps a report's
    # metrics only with one; the model's own checkpoints are the ones under output/checkpoints
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        metrics = {"result": json.dumps(result, default=str)}
        if trainer.rank == 0:
            with open(os.path.join(d, "result.json"), "w", encoding="utf-8") as f:
                f.write(metrics["result"])
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))
        else:
            ray.train.report(metrics)


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
