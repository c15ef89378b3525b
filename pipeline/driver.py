"""Plan, skip committed shards, schedule on actors, retry, progress, summary.

The driver holds no data: it lists `_manifest/` once (before any input is read), sends one
shard per actor call, retries failed shards with exponential backoff, re-dispatches the
shards of actors that died, records shards that exhausted their retries in `_failed/`, and
returns a summary. Exit status 0 only when every planned shard is committed.

Read top to bottom: `run_job` (fingerprint -> plan -> resume under the lease, from
pipeline/plan.py), then `_Scheduler` (one loop: dispatch, watch, collect, handle) over the
worker actors of pipeline/pool.py; the summary and progress display are pipeline/summary.py.
"""

from __future__ import annotations

import datetime as dt
import itertools
import logging
import signal
import time
from collections import deque
from typing import Any

from schemas import FailureRecord, Manifest

from .cluster import mark
from .config import JobConfig
from .io import Storage, StorageOptions
from .layout import RUN_FILE, failed_rel
from .lease import Lease, LeaseLost
from .plan import (
    RunRefused,
    check_run_file,
    failed_stems,
    input_fingerprint,
    model_spec,
    pending,
    plan,
    run_fingerprint,
    storage_options,
)
from .pool import ActorPool, Workers, actor_failure, ray_workers
from .protocol import PERMANENT, WORKER_LOST, Reason, ShardResult, ShardTask
from .retry import RetryPolicy
from .shard.processor import WorkerConfig
from .shard.sources import ParquetColumns
from .signals import RunStopped, trap_sigterm
from .summary import Progress, Summary
from .urls import redact_text, redact_url
from .watchdog import Watchdog

# the driver's API: run_job and what it returns or raises (the rest lives in plan, pool, summary)
__all__ = ["RunRefused", "Summary", "model_spec", "run_fingerprint", "run_job", "storage_options"]
log = logging.getLogger("wintok")


def run_job(cfg: JobConfig, workers: Workers | None = None) -> Summary:
    """Plan, resume, run; the summary says what happened (`.ok` iff every planned shard is committed).

    `workers`: how worker actors are made (default: pipeline/worker.py's Ray actor; the scale
    harness, benchmarks/scale, passes simulated ones)."""
    t0 = time.monotonic()
    mark("run_job")
    opts = storage_options(cfg)
    storage = Storage(cfg.output, opts)
    fp = run_fingerprint(cfg)
    mark("fingerprint")
    shards = plan(cfg, opts)
    fp.update(input_fingerprint(cfg, shards))
    mark("plan")
    if storage.exists(RUN_FILE) and not cfg.overwrite:
        check_run_file(storage, fp, cfg)  # refuses a different run; writes nothing for the same one
        todo, skipped = pending(cfg, storage, shards)
        if not todo:  # nothing to do: no lease, no write
            return Summary(planned=skipped, skipped=skipped, wall_seconds=time.monotonic() - t0)
    with Lease(storage, ttl=cfg.lease_ttl, break_lease=cfg.break_lease) as lease:
        mark("lease")
        check_run_file(storage, fp, cfg)
        todo, skipped = pending(cfg, storage, shards)  # listed once, under the lease
        summary = Summary(planned=skipped + len(todo) if cfg.retry_failed else len(shards), skipped=skipped)
        if todo:
            sched = _Scheduler(cfg, storage, opts, fp, todo, summary, lease, workers)
            sched.failed_records = failed_stems(storage)  # listed once: which commits have a record to remove
            sched.run()
    mark("lease_released")
    summary.wall_seconds = time.monotonic() - t0
    return summary


class _Scheduler:
    def __init__(self, cfg: JobConfig, storage: Storage, opts: StorageOptions, fp: dict[str, Any],
                 todo: list[ShardTask], summary: Summary, lease: Lease | None = None,
                 workers: Workers | None = None) -> None:
        self.workers = workers or ray_workers()
        self.cfg, self.storage, self.opts, self.fp, self.summary = cfg, storage, opts, fp, summary
        self.lease = lease  # checked every loop: a run that lost it stops at once (LeaseLost)
        # one policy for shard retries and for workers that die while starting
        self.retry = RetryPolicy(cfg.max_retries, cfg.retry_backoff, cfg.retry_backoff_max)
        self.todo = deque(todo)
        self.delayed: list[tuple[float, ShardTask]] = []
        self.history: dict[str, list[str]] = {}
        self.seq: dict[ShardTask, int] = {}  # the tasks in flight: their submission order
        self.counter = itertools.count()
        self.inflight: dict[Any, tuple[int, ShardTask]] = {}  # insertion order = submission order
        self.per_slot: dict[int, int] = {}  # slot -> shards in flight there
        # stems with a `_failed/` record (None: not listed, every commit removes one that may be there)
        self.failed_records: set[str] | None = None
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
                    mark("ray_shutdown")

    def _on_sigterm(self, signum: int, frame: Any) -> None:
        if self.stop_signal:  # asked twice: stop waiting for the in-flight shards
            raise RunStopped(signum)
        self.stop_signal, self.stop_at = signum, time.monotonic() + self.cfg.stop_grace
        log.warning("%s: starting no new shard; the %d in flight get %g s to finish",
                    signal.Signals(signum).name, len(self.inflight), self.cfg.stop_grace)

    def _run(self) -> None:
        """The loop, until every shard is committed or failed (or the stop grace ran out); the
        workers are shut down on the way out, whatever ends it."""
        self.pool = self._start_pool()
        self.bars = Progress(len(self.todo), self.cfg.progress)
        try:
            while self.inflight or (not self.stop_signal and (self.todo or self.delayed)):
                if not self._round():
                    break  # the in-flight shards are abandoned: their workers are killed below
        finally:
            self.bars.close()
            self.summary.worker_start_deaths = self.pool.start_deaths
            self.pool.shutdown({s for s, _ in self.inflight.values()})
            mark("workers_shut_down")
        if self.stop_signal and (self.inflight or self.todo or self.delayed):
            raise RunStopped(self.stop_signal, self._stopped_message())

    def _start_pool(self) -> ActorPool:
        from .cluster import worker_shape

        shape = worker_shape(self.cfg, len(self.todo))
        self.summary.workers = shape.actors
        actor_cls = self.workers.actor_class(shape)
        wcfg = WorkerConfig(
            output=self.cfg.output, model=model_spec(self.cfg), resize=self.cfg.resize,
            max_image_pixels=self.cfg.max_image_pixels, batch_size=self.cfg.batch_size,
            decode_threads=shape.decode_threads, decode_mode=shape.decode_mode, prefetch=self.cfg.prefetch,
            row_group_rows=self.cfg.row_group_rows, storage=self.opts, torch_threads=shape.torch_threads,
            parquet=ParquetColumns(self.cfg.image_column, self.cfg.key_column, self.cfg.text_column,
                                   self.cfg.meta_column),
            lease_token=self.lease.token if self.lease else None, fingerprint=self.fp,
        )
        pool = ActorPool(actor_cls, wcfg, shape.actors, self.retry, self.workers.kill)
        mark("actors_created")
        return pool

    def _round(self) -> bool:
        """One round: release due retries, dispatch to ready workers, watch for stalls, collect
        what finished (waiting up to 0.5 s). False once the stop grace has run out."""
        import ray

        if self.lease:
            self.lease.check()
        if self.stop_signal and time.monotonic() >= self.stop_at:
            return False
        self._release_delayed()
        self.pool.poll_ready()
        if not self.stop_signal:
            self._dispatch()
        self._watch()
        waitable = list(self.inflight) + self.pool.pending_refs()
        if not waitable:
            time.sleep(0.05)
            return True
        done, rest = ray.wait(waitable, num_returns=1, timeout=0.5)
        if done and rest:  # collect every call that has finished, not one per round
            done += ray.wait(rest, num_returns=len(rest), timeout=0)[0]
        for ref in done:
            if ref in self.inflight:  # else: an actor became ready (dispatched next round) or a re-queued shard
                self._collect(ref)
        return True

    def _collect(self, ref: Any) -> None:
        """The result of one finished shard call (an actor's death or OOM kill becomes a failed one)."""
        import ray

        slot, task = self._leave(ref)
        try:
            result = ray.get(ref)
        except Exception as e:  # noqa: BLE001 - actor death, OOM kill
            result = actor_failure(task, e)
            if self.pool.replace_if_dead(slot):
                task = self._drop_slot(slot, task)
        self.watchdog.started(slot, time.monotonic())  # the next one queued there starts
        self.seq.pop(task, None)
        if result.reason is Reason.LEASE_LOST:
            raise LeaseLost(result.error or "lost the lease")
        self._handle(task, result)

    def _leave(self, ref: Any) -> tuple[int, ShardTask]:
        slot, task = self.inflight.pop(ref)
        self.per_slot[slot] -= 1
        return slot, task

    def _fresh_lease(self) -> None:
        """Before the driver writes to OUTPUT (a failure record, its removal): only while it holds
        the lease (the workers fence their own commits)."""
        if self.lease:
            self.lease.check(fresh=True)

    def _dispatch(self) -> None:
        """Up to two shards in flight per ready worker (one running, one queued behind it)."""
        if not self.todo:
            return
        for slot in self.pool.ready_slots():
            n = self.per_slot.get(slot, 0)
            if n == 0 and self.todo:
                self.watchdog.started(slot, time.monotonic())
            while self.todo and n < 2:
                task = self.todo.popleft()
                self.seq[task] = next(self.counter)
                self.inflight[self.pool.actors[slot].process.remote(task)] = (slot, task)
                n += 1
            self.per_slot[slot] = n

    def _drop_slot(self, slot: int, task: ShardTask | None = None) -> ShardTask:
        """The worker of `slot` is gone: take its shards out of flight. The one it was running
        (the first submitted) is returned, to be charged; those queued behind it go back to the
        front of the queue, uncharged."""
        queued = [r for r, (s, _) in self.inflight.items() if s == slot]
        order = ([task] if task else []) + [self._leave(r)[1] for r in queued]
        order.sort(key=lambda t: self.seq[t])
        for t in order:
            self.seq.pop(t, None)
        self.todo.extendleft(reversed(order[1:]))
        self.watchdog.forget(slot)
        self.probes.pop(slot, None)
        return order[0]

    def _watch(self) -> None:
        """Probe the busy workers' progress counters (at the watchdog's interval); a shard whose
        worker made no progress for `shard_timeout` s fails (timeout) and the worker is replaced."""
        now = time.monotonic()
        if not self.watchdog.probe_due(now):
            return
        busy = {s for s, _ in self.inflight.values()}
        for slot in busy:
            self._probe(slot, now)
        for slot, idle in self.watchdog.stalled(busy, now).items():
            task = self._drop_slot(slot)
            log.warning("shard %s made no progress for %.0f s: killing its worker", task.stem, idle)
            self.pool.replace(slot)
            error = (f"no progress for {idle:.0f} s (shard timeout {self.cfg.shard_timeout:g} s); "
                     "its worker was killed and replaced")
            self._handle(task, ShardResult.failed(task.stem, Reason.TIMEOUT, error))

    def _probe(self, slot: int, now: float) -> None:
        """Read the answer of `slot`'s last progress probe, if any came, and send the next one."""
        import ray

        ref = self.probes.get(slot)
        if ref is not None:
            if not ray.wait([ref], timeout=0)[0]:
                return  # no answer yet: counts as no progress
            del self.probes[slot]
            try:
                self.watchdog.seen(slot, ray.get(ref), now)
            except Exception:  # noqa: BLE001 - a dead worker: its shard's own call reports it
                return
        self.probes[slot] = self.pool.actors[slot].progress.remote()

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

    def _handle(self, task: ShardTask, result: ShardResult) -> None:
        """A shard's outcome: count a commit; retry a transient failure after a backoff; record
        one that is permanent or out of retries in `_failed/`."""
        if result.ok:
            self._committed(task, Manifest.from_json(result.manifest))
            return
        reason, error = result.reason or Reason.WORKER_ERROR, redact_text(result.error)
        self.history.setdefault(task.stem, []).append(f"attempt {task.attempt}: {reason}: {error[:300]}")
        if reason not in PERMANENT and task.attempt <= self.retry.retries:  # only transient ones back off
            retry = task.retry(safe_mode=reason in WORKER_LOST)
            self.delayed.append((time.monotonic() + self.retry.delay(task.attempt), retry))
            return
        self.summary.failed += 1
        self.summary.failures[task.stem] = f"{reason}: {error[:500]}"
        rec = FailureRecord(task.stem, redact_url(task.url), reason, error, task.attempt,
                            dt.datetime.now(dt.timezone.utc).isoformat(), self.history.pop(task.stem, []))
        self._fresh_lease()
        if self.failed_records is not None:
            self.failed_records.add(task.stem)
        try:
            self.storage.put_bytes(rec.to_json().encode(), failed_rel(task.stem))
        except OSError as e:  # the summary and exit status still report the failure
            log.error("could not write the failure record of %s: %s", task.stem, e)
        self.bars.shard_failed()

    def _committed(self, task: ShardTask, m: Manifest) -> None:
        self.summary.done += 1
        self.summary.images += m.rows
        self.summary.errors += m.errors
        self.summary.errors_by_reason.update(m.errors_by_reason)
        self.history.pop(task.stem, None)
        if self.failed_records is None or task.stem in self.failed_records:
            self._fresh_lease()
            try:
                self.storage.delete(failed_rel(task.stem))
                if self.failed_records is not None:
                    self.failed_records.discard(task.stem)
            except OSError as e:
                log.warning("could not remove the stale failure record of %s: %s", task.stem, e)
        self.bars.shard_done(m.rows, m.errors)
