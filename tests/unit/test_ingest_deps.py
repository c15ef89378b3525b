"""The `ingest` extra resolves with the rest: every requirement of the package with its `test` and
`ingest` extras, and transitively of everything they pull in, is met by what is installed
(img2dataset pins webdataset<0.3 and pandas<3). What `pip check` checks, for this package's
closure only (and in well under a second: pip check took ~6-10 s here)."""

from __future__ import annotations

import importlib.metadata as md
import importlib.util
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[2]
tomllib = pytest.importorskip("tomllib")  # Python 3.11+


def _declared(*extras: str) -> list[Requirement]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    reqs = list(project["dependencies"])
    for extra in extras:
        reqs += project["optional-dependencies"][extra]
    return [Requirement(r) for r in reqs]


def unmet_requirements(roots: list[Requirement]) -> list[str]:
    """Walk the requirement closure of `roots` (markers evaluated, extras followed); what is missing
    or installed at a version outside its specifier."""
    unmet: list[str] = []
    todo = [(r, "") for r in roots]
    seen: set[tuple[str, str]] = set()
    while todo:
        req, extra = todo.pop()
        if req.marker is not None and not req.marker.evaluate({"extra": extra}):
            continue
        name = canonicalize_name(req.name)
        try:
            dist = md.distribution(req.name)
        except md.PackageNotFoundError:
            unmet.append(f"{req} (not installed)")
            continue
        if not req.specifier.contains(dist.version, prereleases=True):
            unmet.append(f"{req} (installed {dist.version})")
        for ex in [""] + sorted(req.extras):
            if (name, ex) in seen:
                continue
            seen.add((name, ex))
            todo += [(Requirement(r), ex) for r in dist.requires or []]
    return unmet


def test_the_package_with_test_and_ingest_extras_resolves_in_the_installed_set():
    if importlib.util.find_spec("img2dataset") is None:  # found, not imported (albumentations goes online)
        pytest.skip("needs the ingest extra (img2dataset)")
    assert not unmet_requirements(_declared("test", "ingest")), "unmet: " + "; ".join(
        unmet_requirements(_declared("test", "ingest")))


def test_the_check_sees_a_conflict():
    """A pin the installed set cannot meet (the package itself needs pyarrow>=15) is reported."""
    assert unmet_requirements([Requirement("pyarrow<1")]) == [f"pyarrow<1 (installed {md.version('pyarrow')})"]
    assert unmet_requirements([Requirement("no-such-package-wintok")]) == ["no-such-package-wintok (not installed)"]
