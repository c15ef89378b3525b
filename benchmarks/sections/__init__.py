"""The sections, one module each, every one with `run(spec: dict) -> dict`.

limit, decode, inproc, pipeline, naive and raydata run inside a child process started by
`benchmarks.harness` (their result: images, seconds, img/s and what they measured besides);
scaling runs in the parent, since it starts two pipeline children itself. A section module
may also define `child_env(spec) -> dict`: environment its child process starts with.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any

CHILD_SECTIONS = ("limit", "decode", "inproc", "pipeline", "naive", "raydata")


def section_module(name: str) -> ModuleType:
    if name not in CHILD_SECTIONS and name != "scaling":
        raise KeyError(f"unknown section {name!r}")
    return importlib.import_module(f"benchmarks.sections.{name}")


def run_section(spec: dict[str, Any]) -> dict[str, Any]:
    """Run the section `spec["section"]` in this process."""
    return section_module(spec["section"]).run(spec)


def section_env(spec: dict[str, Any]) -> dict[str, str]:
    """The environment the section's child process starts with (beyond the harness's own)."""
    hook = getattr(section_module(spec["section"]), "child_env", None)
    return hook(spec) if hook else {}
