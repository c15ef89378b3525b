"""SIGTERM (what Kubernetes and Slurm send on preemption) handled like SIGINT.

`trap_sigterm` installs a handler for the time of a `with` block and puts the previous one
back after (signal handlers can only be set from the main thread; elsewhere it does nothing).
`RunStopped` is what a stopped run raises: a KeyboardInterrupt, so no `except Exception` on
the way stops it, and every `finally` (workers killed, lease released, Ray stopped) runs.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

Handler = Callable[[int, Any], Any]


class RunStopped(KeyboardInterrupt):
    """The run was stopped by a signal; the message says what was kept and what to do."""

    def __init__(self, signum: int, message: str = "") -> None:
        self.signum = signum
        name = signal.Signals(signum).name
        super().__init__(message or f"stopped by {name}; rerun the same command to resume")

    @property
    def exit_status(self) -> int:
        return 128 + self.signum


def raise_stopped(signum: int, frame: Any) -> None:
    """A handler that stops whatever runs in the main thread at once."""
    raise RunStopped(signum)


@contextmanager
def trap_sigterm(handler: Handler | None) -> Iterator[None]:
    """Within the block SIGTERM goes to `handler` (None: keep the current one); after it, the
    handler that was installed before the block is back, whoever replaced it in between."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    before = signal.getsignal(signal.SIGTERM)
    if handler is not None:
        signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL if before is None else before)
