"""The `ingest` extra resolves with the rest: every requirement of the package, its `test` and `ingest`
extras is met by what is installed, and `pip check` finds the whole set (img2dataset pins
webdataset<0.3 and pandas<3; transitive requirements included) consistent."""

from __future__ import annotations

import importlib.metadata as md
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parents[2]
tomllib = pytest.importorskip("tomllib")  # Python 3.11+


def _declared(*extras: str) -> list[Requirement]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    reqs = list(project["dependencies"])
    for extra in extras:
        reqs += project["optional-dependencies"][extra]
    return [Requirement(r) for r in reqs]


def test_declared_requirements_are_met_by_the_installed_set():
    pytest.importorskip("img2dataset")
    unmet = []
    for req in _declared("test", "ingest"):
        try:
            installed = md.version(req.name)
        except md.PackageNotFoundError:
            unmet.append(f"{req} (not installed)")
            continue
        if not req.specifier.contains(installed, prereleases=True):
            unmet.append(f"{req} (installed {installed})")
    assert not unmet, "unmet: " + "; ".join(unmet)


def test_pip_check_passes():
    """The whole installed set (transitive requirements included) is consistent."""
    proc = subprocess.run([sys.executable, "-m", "pip", "check"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
