"""What the driver reports: the run's `Summary` (returned, printed or as JSON) and the live
`Progress` on stderr while shards finish."""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any


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


class Progress:
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
                f"{self.images} images tokenized, {self.errors} sample errors; {rate:.1f} img/s over the "
                f"{elapsed:.0f} s since the workers started (the summary's figure is over the whole wall)")

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
