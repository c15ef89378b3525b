"""The worker actors of a run, by slot: start, readiness, restart after a death while
starting, replacement, shutdown; and how a failed remote call is named (`actor_failure`).

Work goes only to actors that finished loading their models (`ready_slots`); the scheduler
(pipeline/driver.py) decides what runs where.
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .cluster import WorkerShape, mark
from .plan import RunRefused
from .protocol import Reason, ShardResult, ShardTask
from .retry import RetryPolicy
from .shard.processor import WorkerConfig

log = logging.getLogger("wintok")


@dataclass(frozen=True)
class Workers:
    """How the pool makes and ends its actors: `actor_class(shape)` gives a class whose
    ``.options(name=...).remote(WorkerConfig)`` is a worker (methods ``process``, ``progress``,
    ``pid``, ``close``), `kill(actor)` ends one. The default (`ray_workers`) is the Ray actor of
    pipeline/worker.py; benchmarks/scale substitutes simulated ones that share a few processes."""

    actor_class: Callable[[WorkerShape], Any]
    kill: Callable[[Any], None]


def ray_workers() -> Workers:
    from .worker import make_actor_class

    def kill(actor: Any) -> None:
        import ray

        ray.kill(actor, no_restart=True)

    return Workers(lambda s: make_actor_class(s.num_gpus, s.num_cpus, cpu_model=not s.num_gpus), kill)


class ActorPool:
    """Worker actors by slot. Work goes only to actors that finished loading their models; a
    dead actor is replaced, and a replacement that cannot be placed (its node is gone and no
    resources are free) simply never becomes ready while the others carry on.

    A worker whose process dies while it starts (killed for memory, node lost) is started again
    after a backoff (`restart`), up to ``restart.tries`` times in a row for its slot; after that the slot
    is given up. An exception raised while loading the model (bad checkpoint, wrong config) is
    the user's to fix and refuses the run at once, as does losing every slot."""

    def __init__(self, actor_cls: Any, wcfg: WorkerConfig, n: int, restart: RetryPolicy,
                 kill: Callable[[Any], None] | None = None) -> None:
        self.actor_cls, self.wcfg, self.restart = actor_cls, wcfg, restart
        self.kill = kill or ray_workers().kill
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
            mark(f"worker_ready:{slot}")
            self.start_failures.pop(slot, None)

    def _start_died(self, slot: int, e: Exception) -> None:
        self.start_deaths += 1
        deaths = self.start_failures[slot] = self.start_failures.get(slot, 0) + 1
        cause = _start_death_cause(e)
        self.kill(self.actors[slot])
        if deaths <= self.restart.retries:
            delay = self.restart.delay(deaths)
            log.warning("worker %d died while starting (%s); starting it again in %.1f s", slot, cause, delay)
            self.respawn_at[slot] = time.monotonic() + delay
            return
        self.given_up.add(slot)
        log.error("worker %d died %d times while starting (last: %s); carrying on without it", slot, deaths, cause)
        if len(self.given_up) == len(self.actors):
            raise RunRefused(
                f"workers could not start: each died {self.restart.tries} times while loading the model "
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
        self.kill(self.actors[slot])
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
            self.kill(a)
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


def actor_failure(task: ShardTask, e: Exception) -> ShardResult:
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
