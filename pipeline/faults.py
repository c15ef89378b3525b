"""Failpoints for fault-injection tests: inert unless WINTOK_FAILPOINTS is set.

Format: `point[@match]=action` separated by `;`. Points: `decode` (match: sample key),
`before_manifest` and `shard_start` (match: shard stem), `worker_start` (after the model
loaded, in the actor's constructor). Actions: `exit` (the process dies
with status 137 at once, like SIGKILL), `raise`, `sleep:SECONDS`, `alloc:MB` (hold memory,
then sleep). `once-ACTION` (e.g. `once-exit`, `once-alloc:MB`) runs ACTION only if the marker
file named by WINTOK_FAILPOINT_MARK is absent, creating it: the fault hits the first attempt only.
"""

from __future__ import annotations

import os
import time

ENV = "WINTOK_FAILPOINTS"
_held: list[bytearray] = []


class InjectedFault(RuntimeError):
    pass


def _rules() -> list[tuple[str, str | None, str]]:
    spec = os.environ.get(ENV, "")
    out = []
    for part in filter(None, (p.strip() for p in spec.split(";"))):
        target, _, action = part.partition("=")
        point, _, match = target.partition("@")
        out.append((point, match or None, action))
    return out


def failpoint(point: str, subject: str = "") -> None:
    """Run the action configured for `point` (and `subject`), if any."""
    if ENV not in os.environ:
        return
    for p, match, action in _rules():
        if p != point or (match is not None and match != subject):
            continue
        if action.startswith("once-"):
            mark = os.environ.get("WINTOK_FAILPOINT_MARK", "")
            if not mark or os.path.exists(mark):
                continue
            open(mark, "w").close()
            action = action[len("once-"):]
        if action == "exit":
            os._exit(137)
        elif action == "raise":
            raise InjectedFault(f"injected fault at {point} {subject}")
        elif action.startswith("sleep:"):
            time.sleep(float(action.split(":", 1)[1]))
        elif action.startswith("alloc:"):
            block = bytearray(int(float(action.split(":", 1)[1]) * (1 << 20)))
            for i in range(0, len(block), 4096):
                block[i] = 1  # touch every page so it counts as resident
            _held.append(block)
            time.sleep(30)
