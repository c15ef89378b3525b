"""Plan, skip committed shards, schedule on actors, retry, progress, summary.

The driver holds no data: it lists `_manifest/` once (before any input is read), sends one
shard per actor call, retries failed shards with exponential backoff, re-dispatches the
shards of actors that died, records shards that exhausted their retries in `_failed/`, and
returns a summary. Exit status 0 only when every planned shard is committed.
"""

from __future__ import annotations

import datetime as dt
import itertools
import json
import logging
import os
import random
import re
import signal
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any

from schemas import SCHEMA_VERSION, FailureRecord, Manifest, fingerprint_digest

from .config import JobConfig
from .io import Storage, StorageOptions, expand_inputs, s3_options
from .layout import FAILED_DIR, MANIFEST_DIR, RUN_FILE, failed_rel
from .lease import Lease, LeaseLost
from .protocol import PERMANENT, WORKER_LOST, Reason, ShardResult, ShardTask
from .shard.encode import ModelSpec
from .shard.processor import WorkerConfig
from .signals import RunStopped, trap_sigterm
from .urls import StemError, normalize_stem, redact_text, redact_url, shard_stems
from .watchdog import Watchdog
from .worker import make_actor_class

log = logging.getLogger("wintok")


class RunRefused(RuntimeError):
    """The run must not start (fingerprint mismatch, bad model...). One line for the user."""


@dataclass
class Summary:
    planned: int = 0
    skipped: int = 0
    done: int = 0
    failed: int = 0
    images: int = 0
    errors: int = 0
    errors_by_reason: Counter = field(default_factory=Counter)
    failures: dict[str, str] = field(default_factory=dict)
    wall_seconds: float = 0.0
    workers: int = 0
    worker_start_deaths: int = 0  # worker processes that died while loading the model, started again

    @property
    def ok(self) -> bool:
        return self.failed == 0 and self.done + self.skipped == self.planned

    def to_dict(self) -> dict[str, Any]:
        return {
            "shards_planned": self.planned, "shards_done": self.done, "shards_skipped": self.skipped,
            "shards_failed": self.failed, "images": self.images, "sample_errors": self.errors,
            "errors_by_reason": dict(self.errors_by_reason), "failed_shards": self.failures,
            "wall_seconds": round(self.wall_seconds, 2), "workers": self.workers,
            "worker_start_deaths": self.worker_start_deaths,
            # images tokenized (rows written) per second of wall time; sample errors are not images
            "images_per_second": round(self.images / self.wall_seconds, 2) if self.wall_seconds > 0 else 0.0,
            "samples_per_second": round((self.images + self.errors) / self.wall_seconds, 2)
            if self.wall_seconds > 0 else 0.0,
        }

    def render(self) -> str:
        d = self.to_dict()
        lines = [
            f"shards: {self.done} done, {self.skipped} skipped (already committed), {self.failed} failed, "
            f"of {self.planned}",
            f"images: {self.images} tokenized, {self.errors} sample errors"
            + (f" ({', '.join(f'{k}: {v}' for k, v in sorted(self.errors_by_reason.items()))})" if self.errors else ""),
            f"throughput: {d['images_per_second']} img/s (images tokenized per second of wall time) over "
            f"{d['wall_seconds']} s with {self.workers} worker(s)"
            if self.done or self.failed else "nothing to do: every shard was already committed",
        ]
        if self.worker_start_deaths:
            lines.append(f"workers: {self.worker_start_deaths} died while starting (killed for memory or "
                         "node lost) and were started again")
        for stem, why in sorted(self.failures.items()):
            lines.append(f"FAILED {stem}: {why}")
        return "\n".join(lines)


def storage_options(cfg: JobConfig) -> StorageOptions:
    return s3_options(cfg.s3_endpoint_url, cfg.s3_profile, cfg.s3_anon, cfg.s3_key, cfg.s3_secret)


def model_spec(cfg: JobConfig) -> ModelSpec:
    return ModelSpec(model=cfg.model, encoder_config=cfg.encoder_config, allow_pickle=cfg.allow_pickle,
                     dtype=cfg.dtype, device=cfg.device, semantic_tokens=cfg.semantic_tokens,
                     teacher=cfg.teacher, teacher_dtype=cfg.teacher_dtype,
                     teacher_patch_tokens=cfg.teacher_patch_tokens, compile=cfg.compile)


def run_fingerprint(cfg: JobConfig) -> dict[str, Any]:
    """What determines the output bytes: model + teacher identity, preprocessing, precision, layout."""
    from importlib.metadata import PackageNotFoundError, version

    from wintok_model.checkpoint import CheckpointError, check_model, weights_sha256

    from .models import localize

    try:
        model = localize(cfg.model, storage_options(cfg))
        teacher = localize(cfg.teacher, storage_options(cfg))
    except FileNotFoundError as e:
        raise RunRefused(str(e)) from None
    fp: dict[str, Any] = {"schema_version": SCHEMA_VERSION}
    try:
        fp["package_version"] = version("wintok-pipeline")
    except PackageNotFoundError:
        fp["package_version"] = "dev"
    if model:
        try:
            config = check_model(model, cfg.encoder_config, cfg.allow_pickle)
        except CheckpointError as e:
            raise RunRefused(str(e)) from None
        fp["model"] = {"config": config.to_dict(), "sha256": weights_sha256(model),
                       "name": os.path.basename(model.rstrip("/"))}
    if teacher:
        fp["teacher"] = _teacher_identity(teacher)
        fp["teacher_dtype"] = cfg.teacher_dtype
        fp["teacher_patch_tokens"] = cfg.teacher_patch_tokens
    fp["preprocess"] = {"resize": cfg.resize, "max_image_pixels": cfg.max_image_pixels}
    fp["dtype"] = cfg.dtype
    fp["semantic_tokens"] = cfg.semantic_tokens
    return fp


def _teacher_identity(spec: str) -> dict[str, Any]:
    from wintok_model import teachers

    try:
        return teachers.teacher_identity(spec)
    except teachers.TeacherError as e:
        raise RunRefused(str(e)) from None


# --------------------------------------------------------------------------- planning
def plan(cfg: JobConfig, storage: Storage, opts: StorageOptions) -> list[tuple[str, str]]:
    urls = expand_inputs(cfg.inputs, opts)
    try:
        names = shard_stems(urls)
    except StemError as e:
        raise RunRefused(str(e)) from None
    stems: dict[str, str] = {}
    for url, stem in zip(urls, names, strict=True):
        if stem in stems:
            raise RunRefused(f"inputs {redact_url(stems[stem])} and {redact_url(url)} would write the same "
                             f"output {stem}")
        stems[stem] = url
    return [(url, stem) for stem, url in stems.items()]


def check_run_file(storage: Storage, fp: dict[str, Any], cfg: JobConfig) -> None:
    """Refuse to mix outputs of different models/configs in one OUTPUT, unless overwriting."""
    digest = fingerprint_digest(fp)
    exists = storage.exists(RUN_FILE)
    if exists and not cfg.overwrite:
        try:
            old = json.loads(storage.read_text(RUN_FILE))
        except (ValueError, OSError):
            old = {}
        if old.get("fingerprint_sha256") != digest:
            diff = sorted(k for k in set(fp) | set(old.get("fingerprint", {}))
                          if fp.get(k) != old.get("fingerprint", {}).get(k))
            raise RunRefused(
                f"{storage.url} holds output of a different run (differs in: {', '.join(diff) or 'unknown'}); "
                "use another OUTPUT, or --overwrite to redo every shard with this configuration"
            )
        return  # same run: resume without rewriting anything
    if cfg.overwrite:
        for name in storage.list(MANIFEST_DIR):
            storage.delete(f"{MANIFEST_DIR}/{name}")
    run = {"fingerprint_sha256": digest, "fingerprint": fp, "job": cfg.public_dict(),
           "storage": storage_options(cfg).redacted(),
           "started_at": dt.datetime.now(dt.timezone.utc).isoformat()}
    storage.put_bytes(json.dumps(run, indent=1, sort_keys=True).encode(), RUN_FILE)


def committed_stems(storage: Storage) -> set[str]:
    """Stems of `_manifest/` as listed, through the same normalisation as the plan's stems."""
    return {normalize_stem(n[: -len(".json")]) for n in storage.list(MANIFEST_DIR) if n.endswith(".json")}


def failed_stems(storage: Storage) -> set[str]:
    return {normalize_stem(n[: -len(".json")]) for n in storage.list(FAILED_DIR) if n.endswith(".json")}


# --------------------------------------------------------------------------- running
def _pending(cfg: JobConfig, storage: Storage, shards: list[tuple[str, str]]) -> tuple[list, int]:
    done = committed_stems(storage)
    todo = [(u, s) for u, s in shards if s not in done]
    if cfg.retry_failed:
        failed = failed_stems(storage)
        todo = [(u, s) for u, s in todo if s in failed]
    return todo, sum(1 for _, s in shards if s in done)


def run_job(cfg: JobConfig) -> Summary:
    """Plan, resume, run; the summary says what happened (`.ok` iff every planned shard is committed)."""
    t0 = time.monotonic()
    opts = storage_options(cfg)
    storage = Storage(cfg.output, opts)
    fp = run_fingerprint(cfg)
    shards = plan(cfg, storage, opts)
    if storage.exists(RUN_FILE) and not cfg.overwrite:
        check_run_file(storage, fp, cfg)  # refuses a different run; writes nothing for the same one
        todo, skipped = _pending(cfg, storage, shards)
        if not todo:  # nothing to do: no lease, no write
            return Summary(planned=skipped, skipped=skipped, wall_seconds=time.monotonic() - t0)
    with Lease(storage, ttl=cfg.lease_ttl, break_lease=cfg.break_lease) as lease:
        check_run_file(storage, fp, cfg)
        todo, skipped = _pending(cfg, storage, shards)  # listed once, under the lease
        summary = Summary(planned=skipped + len(todo) if cfg.retry_failed else len(shards), skipped=skipped)
        if todo:
            _Scheduler(cfg, storage, opts, fp, todo, summary, lease).run()
    summary.wall_seconds = time.monotonic() - t0
    return summary


class _Scheduler:
    def __init__(self, cfg: JobConfig, storage: Storage, opts: StorageOptions, fp: dict[str, Any],
                 todo: list[tuple[str, str]], summary: Summary, lease: Lease | None = None) -> None:
        self.cfg, self.storage, self.opts, self.fp, self.summary = cfg, storage, opts, fp, summary
        self.lease = lease  # checked every loop: a run that lost it stops at once (LeaseLost)
        self.digest = fingerprint_digest(fp)
        self.todo = deque(ShardTask(u, s, 1) for u, s in todo)
        self.delayed: list[tuple[float, ShardTask]] = []
        self.history: dict[str, list[str]] = {}
        self.seq: dict[ShardTask, int] = {}
        self.counter = itertools.count()
        self.inflight: dict[Any, tuple[int, ShardTask]] = {}  # insertion order = submission order
        self.watchdog = Watchdog(cfg.shard_timeout)
        self.probes: dict[int, Any] = {}  # slot -> its outstanding progress probe
        self.stop_signal = 0              # the signal that asked the run to stop (0: none)
        self.stop_at = 0.0

    def run(self) -> None:
        """Start Ray (stopped again after if it was started here) and run every shard of `todo`.

        On SIGTERM no new shard starts; in-flight ones get `stop_grace` seconds to finish, then
        the workers are killed and `RunStopped` is raised (the lease is released on the way out)."""
        import ray

        from .cluster import start_ray

        started = not ray.is_initialized()
        with trap_sigterm(None):  # ray.init installs its own SIGTERM handler: put back ours after
            start_ray(self.cfg)
            try:
                with trap_sigterm(self._on_sigterm):
                    self._run()
            finally:
                if started:
                    ray.shutdown()

    def _on_sigterm(self, signum: int, frame: Any) -> None:
        if self.stop_signal:  # asked twice: stop waiting for the in-flight shards
            raise RunStopped(signum)
        self.stop_signal, self.stop_at = signum, time.monotonic() + self.cfg.stop_grace
        log.warning("%s: starting no new shard; the %d in flight get %g s to finish",
                    signal.Signals(signum).name, len(self.inflight), self.cfg.stop_grace)

    def _run(self) -> None:
        import ray

        from .cluster import worker_shape

        shape = worker_shape(self.cfg, len(self.todo))
        n_workers = shape.actors
        self.summary.workers = n_workers
        actor_cls = make_actor_class(shape.num_gpus, shape.num_cpus, cpu_model=not shape.num_gpus)
        wcfg = WorkerConfig(
            output=self.cfg.output, model=model_spec(self.cfg), resize=self.cfg.resize,
            max_image_pixels=self.cfg.max_image_pixels, batch_size=self.cfg.batch_size,
            decode_threads=shape.decode_threads, decode_mode=shape.decode_mode, prefetch=self.cfg.prefetch,
            row_group_rows=self.cfg.row_group_rows, storage=self.opts, torch_threads=shape.torch_threads,
            lease_token=self.lease.token if self.lease else None, fingerprint=self.fp,
        )
        self.pool = _ActorPool(actor_cls, wcfg, n_workers, self.cfg.max_retries + 1, self.cfg.retry_backoff,
                                self.cfg.retry_backoff_max)
        inflight = self.inflight
        bars = _Progress(len(self.todo), self.cfg.progress)
        try:
            while inflight or (not self.stop_signal and (self.todo or self.delayed)):
                if self.lease:
                    self.lease.check()
                if self.stop_signal and time.monotonic() >= self.stop_at:
                    break  # the in-flight shards are abandoned: their workers are killed below
                self._release_delayed()
                self.pool.poll_ready()
                if not self.stop_signal:
                    self._dispatch()
                self._watch(bars)
                waitable = list(inflight) + self.pool.pending_refs()
                if not waitable:
                    time.sleep(0.05)
                    continue
                done, _ = ray.wait(waitable, num_returns=1, timeout=0.5)
                for ref in done:
                    if ref not in inflight:
                        continue  # an actor became ready (dispatched next round) or a re-queued shard
                    slot, task = inflight.pop(ref)
                    try:
                        result = ray.get(ref)
                    except Exception as e:  # noqa: BLE001 - actor death, OOM kill
                        result = _actor_failure(task, e)
                        if self.pool.replace_if_dead(slot):
                            task = self._drop_slot(slot, task)
                    self.watchdog.started(slot, time.monotonic())  # the next one queued there starts
                    if result.reason is Reason.LEASE_LOST:
                        raise LeaseLost(result.error or "lost the lease")
                    if self.lease:
                        self.lease.check(fresh=True)  # _handle writes to OUTPUT: only while we hold it
                    self._handle(task, result, bars)
        finally:
            bars.close()
            self.summary.worker_start_deaths = self.pool.start_deaths
            busy = {s for s, _ in inflight.values()}
            self.pool.shutdown(busy)
        if self.stop_signal and (inflight or self.todo or self.delayed):
            raise RunStopped(self.stop_signal, self._stopped_message())

    def _dispatch(self) -> None:
        """Up to two shards in flight per ready worker (one running, one queued behind it)."""
        for slot in self.pool.ready_slots():
            n = sum(1 for s, _ in self.inflight.values() if s == slot)
            if n == 0 and self.todo:
                self.watchdog.started(slot, time.monotonic())
            while self.todo and n < 2:
                task = self.todo.popleft()
                self.seq[task] = next(self.counter)
                self.inflight[self.pool.actors[slot].process.remote(task)] = (slot, task)
                n += 1

    def _drop_slot(self, slot: int, task: ShardTask | None = None) -> ShardTask:
        """The worker of `slot` is gone: take its shards out of flight. The one it was running
        (the first submitted) is returned, to be charged; those queued behind it go back to the
        front of the queue, uncharged."""
        queued = [r for r, (s, _) in self.inflight.items() if s == slot]
        order = ([task] if task else []) + [self.inflight.pop(r)[1] for r in queued]
        order.sort(key=lambda t: self.seq[t])
        self.todo.extendleft(reversed(order[1:]))
        self.watchdog.forget(slot)
        self.probes.pop(slot, None)
        return order[0]

    def _watch(self, bars: _Progress) -> None:
        """Probe the busy workers' progress counters (at the watchdog's interval); a shard whose
        worker made no progress for `shard_timeout` s fails (timeout) and the worker is replaced."""
        import ray

        now = time.monotonic()
        if not self.watchdog.probe_due(now):
            return
        busy = {s for s, _ in self.inflight.values()}
        for slot in busy:
            ref = self.probes.get(slot)
            if ref is not None:
                if not ray.wait([ref], timeout=0)[0]:
                    continue  # no answer yet: counts as no progress
                del self.probes[slot]
                try:
                    self.watchdog.seen(slot, ray.get(ref), now)
                except Exception:  # noqa: BLE001 - a dead worker: its shard's own call reports it
                    continue
            self.probes[slot] = self.pool.actors[slot].progress.remote()
        for slot, idle in self.watchdog.stalled(busy, now).items():
            task = self._drop_slot(slot)
            log.warning("shard %s made no progress for %.0f s: killing its worker", task.stem, idle)
            self.pool.replace(slot)
            error = (f"no progress for {idle:.0f} s (shard timeout {self.cfg.shard_timeout:g} s); "
                     "its worker was killed and replaced")
            self._handle(task, ShardResult.failed(task.stem, Reason.TIMEOUT, error), bars)

    def _stopped_message(self) -> str:
        name = signal.Signals(self.stop_signal).name
        abandoned = (f", {len(self.inflight)} abandoned in flight after {self.cfg.stop_grace:g} s"
                     if self.inflight else "")
        return (f"stopped by {name}: {self.summary.done} shard(s) committed in this run, "
                f"{len(self.todo) + len(self.delayed)} not started{abandoned}; the lease is released: "
                "rerun the same command to resume")

    def _release_delayed(self) -> None:
        now = time.monotonic()
        ready = [t for when, t in self.delayed if when <= now]
        self.delayed = [(w, t) for w, t in self.delayed if w > now]
        self.todo.extend(ready)

    def _handle(self, task: ShardTask, result: ShardResult, bars: _Progress) -> None:
        if result.ok:
            m = Manifest.from_json(result.manifest)
            self.summary.done += 1
            self.summary.images += m.rows
            self.summary.errors += m.errors
            self.summary.errors_by_reason.update(m.errors_by_reason)
            try:
                self.storage.delete(failed_rel(task.stem))
            except OSError as e:
                log.warning("could not remove the stale failure record of %s: %s", task.stem, e)
            bars.shard_done(m.rows, m.errors)
            return
        reason, error = result.reason or Reason.WORKER_ERROR, redact_text(result.error)
        self.history.setdefault(task.stem, []).append(f"attempt {task.attempt}: {reason}: {error[:300]}")
        if reason not in PERMANENT and task.attempt <= self.cfg.max_retries:  # only transient ones back off
            delay = min(self.cfg.retry_backoff * 2 ** (task.attempt - 1), self.cfg.retry_backoff_max)
            delay *= 0.5 + random.random()
            self.delayed.append((time.monotonic() + delay, task.retry(safe_mode=reason in WORKER_LOST)))
            return
        self.summary.failed += 1
        self.summary.failures[task.stem] = f"{reason}: {error[:500]}"
        rec = FailureRecord(task.stem, redact_url(task.url), reason, error, task.attempt,
                            dt.datetime.now(dt.timezone.utc).isoformat(), self.history.get(task.stem, []))
        try:
            self.storage.put_bytes(rec.to_json().encode(), failed_rel(task.stem))
        except OSError as e:  # the summary and exit status still report the failure
            log.error("could not write the failure record of %s: %s", task.stem, e)
        bars.shard_failed()


class _ActorPool:
    """Worker actors by slot. Work goes only to actors that finished loading their models; a
    dead actor is replaced, and a replacement that cannot be placed (its node is gone and no
    resources are free) simply never becomes ready while the others carry on.

    A worker whose process dies while it starts (killed for memory, node lost) is started again
    after a backoff, up to ``start_attempts`` times in a row for its slot; after that the slot
    is given up. An exception raised while loading the model (bad checkpoint, wrong config) is
    the user's to fix and refuses the run at once, as does losing every slot."""

    def __init__(self, actor_cls: Any, wcfg: WorkerConfig, n: int, start_attempts: int = 4,
                 backoff: float = 2.0, backoff_max: float = 120.0) -> None:
        self.actor_cls, self.wcfg = actor_cls, wcfg
        self.start_attempts, self.backoff, self.backoff_max = max(1, start_attempts), backoff, backoff_max
        self.prefix = f"wintok-worker-{os.getpid()}-{int(time.time())}"
        self.spawned = 0
        self.actors: list[Any] = []
        self.ready: list[bool] = []
        self.ready_ref: dict[int, Any] = {}
        self.start_failures: dict[int, int] = {}  # slot -> consecutive deaths while starting
        self.respawn_at: dict[int, float] = {}
        self.given_up: set[int] = set()
        self.start_deaths = 0
        for _ in range(n):
            self.actors.append(None)
            self.ready.append(False)
            self._spawn(len(self.actors) - 1)

    def _spawn(self, slot: int) -> None:
        self.spawned += 1
        actor = self.actor_cls.options(name=f"{self.prefix}-{self.spawned}").remote(self.wcfg)
        self.actors[slot], self.ready[slot] = actor, False
        self.ready_ref[slot] = actor.pid.remote()

    def pending_refs(self) -> list[Any]:
        return list(self.ready_ref.values())

    def ready_slots(self) -> list[int]:
        return [i for i, r in enumerate(self.ready) if r]

    def poll_ready(self) -> None:
        import ray
        import ray.exceptions as rex

        now = time.monotonic()
        for slot, when in list(self.respawn_at.items()):
            if when <= now:
                del self.respawn_at[slot]
                self._spawn(slot)
        if not self.ready_ref:
            return
        done, _ = ray.wait(list(self.ready_ref.values()), num_returns=len(self.ready_ref), timeout=0)
        for slot, ref in list(self.ready_ref.items()):
            if ref not in done:
                continue
            del self.ready_ref[slot]
            try:
                ray.get(ref)
            except (rex.RayActorError, rex.OutOfMemoryError) as e:
                if getattr(e, "actor_init_failed", False):  # the model could not load
                    raise RunRefused(f"workers could not start: {_cause_line(str(e))}") from None
                self._start_died(slot, e)  # its process died: killed for memory, node lost
                continue
            except Exception as e:  # noqa: BLE001 - anything else from the worker's start
                raise RunRefused(f"workers could not start: {_cause_line(str(e))}") from None
            self.ready[slot] = True
            self.start_failures.pop(slot, None)

    def _start_died(self, slot: int, e: Exception) -> None:
        import ray

        self.start_deaths += 1
        deaths = self.start_failures[slot] = self.start_failures.get(slot, 0) + 1
        cause = _start_death_cause(e)
        ray.kill(self.actors[slot], no_restart=True)
        if deaths < self.start_attempts:
            delay = min(self.backoff * 2 ** (deaths - 1), self.backoff_max) * (0.5 + random.random())
            log.warning("worker %d died while starting (%s); starting it again in %.1f s", slot, cause, delay)
            self.respawn_at[slot] = time.monotonic() + delay
            return
        self.given_up.add(slot)
        log.error("worker %d died %d times while starting (last: %s); carrying on without it", slot, deaths, cause)
        if len(self.given_up) == len(self.actors):
            raise RunRefused(
                f"workers could not start: each died {self.start_attempts} times while loading the model "
                f"(last: {cause}); give the nodes more memory or run fewer workers per node")

    def replace_if_dead(self, slot: int) -> bool:
        import ray

        try:
            ray.get(self.actors[slot].pid.remote(), timeout=30)
            return False
        except Exception:  # noqa: BLE001 - dead or unreachable: replace it
            pass
        self.replace(slot)
        return True

    def replace(self, slot: int) -> None:
        """Kill the worker of `slot` (stuck, or dead already) and start another in its place."""
        import ray

        ray.kill(self.actors[slot], no_restart=True)
        self._spawn(slot)

    def shutdown(self, busy: set[int] | None = None) -> None:
        """Close the idle workers, kill all; with `busy` slots (shards abandoned on them), wait
        (bounded) until those are dead, so that none of them commits after the driver is gone."""
        import ray

        # let each worker stop its decoding children first (they and their queues' semaphores go
        # cleanly); a worker that does not answer in time is killed anyway
        # (only idle ones that started: one still waiting for a node or resources, or busy with
        # a shard, would not answer, and the run would end 10 s late)
        busy = busy or set()
        closing = [a.close.remote() for i, (a, ready) in enumerate(zip(self.actors, self.ready, strict=True))
                   if ready and i not in busy]
        try:
            if closing:
                ray.wait(closing, num_returns=len(closing), timeout=10)
        except Exception:  # noqa: BLE001 - dead actors: nothing to close
            pass
        for a in self.actors:
            ray.kill(a, no_restart=True)
        deadline = time.monotonic() + 10
        for slot in busy:
            _await_dead(self.actors[slot], deadline)


def _await_dead(actor: Any, deadline: float) -> None:
    """Return once `actor` (killed) is dead, or at `deadline`."""
    import ray

    while time.monotonic() < deadline:
        try:
            ray.get(actor.pid.remote(), timeout=max(0.1, deadline - time.monotonic()))
        except ray.exceptions.GetTimeoutError:
            log.warning("a killed worker did not die within the bound; carrying on")
            return
        except Exception:  # noqa: BLE001 - RayActorError: it is dead
            return
        time.sleep(0.1)  # it still answered: the kill has not landed yet


def _actor_failure(task: ShardTask, e: Exception) -> ShardResult:
    import ray.exceptions as rex

    text = str(e)
    low = text.lower()
    if isinstance(e, rex.OutOfMemoryError) or "outofmemoryerror" in low or "memory pressure" in low \
            or "memory monitor" in low or "(oom)" in low:
        reason = Reason.OOM
    elif isinstance(e, rex.RayActorError | rex.ActorUnavailableError):
        reason = Reason.WORKER_DIED
    else:
        reason = Reason.WORKER_ERROR
    first = _cause_line(text)
    return ShardResult.failed(task.stem, reason, first)


def _cause_line(text: str) -> str:
    """One line that says why a remote call failed, out of Ray's multi-line error text."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if lines and "running low on memory" in lines[0]:  # Ray's memory monitor: what, and by how much
        why = next((ln for ln in lines if ln.startswith("OOM kill reason")), "")
        return f"{lines[0]} {why}".strip()[:1000]
    for ln in lines:
        if ln.startswith("The actor is dead because"):
            return ln[:1000]
    for ln in reversed(lines):
        if "Error" in ln or "error" in ln:
            return ln[:1000]
    return (lines[-1] if lines else "unknown")[:1000]


def _start_death_cause(e: Exception) -> str:
    import ray.exceptions as rex

    text = str(e)
    if isinstance(e, rex.OutOfMemoryError) or "running low on memory" in text:
        return "killed by Ray's memory monitor"
    m = re.search(r"The actor is dead because ([^.]*)", text)
    return m.group(1) if m else _cause_line(text)


class _Progress:
    """Progress on stderr: tqdm bars over shards and images (img/s counts tokenized images only)
    when stderr is a terminal; otherwise (a log file, a pipe, a batch system) one plain line
    every `interval` seconds and one at the end, never carriage returns or escape codes."""

    def __init__(self, shards: int, enabled: bool, interval: float = 30.0, stream: Any = None) -> None:
        import sys

        self.total, self.enabled, self.interval = shards, enabled, interval
        self.stream = stream if stream is not None else sys.stderr
        self.done = self.failed = self.images = self.errors = 0
        self.t0 = self.last = time.monotonic()
        isatty = getattr(self.stream, "isatty", None)
        self.tty = bool(enabled and isatty and isatty())
        if self.tty:
            from tqdm import tqdm

            self.shards = tqdm(total=shards, desc="shards", unit="shard", position=0, file=self.stream)
            self.bar = tqdm(desc="images", unit="img", position=1, file=self.stream)

    def shard_done(self, images: int, errors: int = 0) -> None:
        self.done, self.images, self.errors = self.done + 1, self.images + images, self.errors + errors
        if self.tty:
            self.shards.update(1)
            self.bar.update(images)
        self._maybe_line()

    def shard_failed(self) -> None:
        self.failed += 1
        if self.tty:
            self.shards.update(1)
        self._maybe_line()

    def line(self) -> str:
        elapsed = time.monotonic() - self.t0
        rate = self.images / elapsed if elapsed > 0 else 0.0
        return (f"progress: {self.done + self.failed}/{self.total} shards ({self.failed} failed), "
                f"{self.images} images tokenized, {self.errors} sample errors, {rate:.1f} img/s, "
                f"{elapsed:.0f} s")

    def _maybe_line(self) -> None:
        if self.enabled and not self.tty and time.monotonic() - self.last >= self.interval:
            self._print()

    def _print(self) -> None:
        self.last = time.monotonic()
        print(self.line(), file=self.stream, flush=True)

    def close(self) -> None:
        if self.tty:
            self.bar.close()
            self.shards.close()
        elif self.enabled and self.done + self.failed:
            self._print()
