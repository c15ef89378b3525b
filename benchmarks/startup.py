"""Fixed start and stop cost of `wintok tokenize`: where each second of a small run goes.

`python -m benchmarks.startup` runs the CLI end to end (a fresh interpreter, its own local Ray)
on a small corpus (default 4 shards x 50 images, wintok-tiny, CPU) and reports a timeline:

* from the driver's DEBUG lines `timeline PHASE T` (`pipeline.cluster.mark`, T = time.monotonic(),
  one clock for every process of the machine): run_job (imports done), fingerprint, plan, lease,
  ray_init_start, ray_init, actors_created, worker_ready:N, workers_shut_down, ray_shutdown,
  lease_released;
* from outside: spawn (just before the child starts), first shard started and last shard
  committed (`_manifest/*.json`: finished_at - seconds, finished_at), exit (the child's exit).

`--code DIR` (repeatable) runs the same measurement on other checkouts of this repository
(PYTHONPATH=DIR), rounds alternating between them; the best round (lowest wall) of each is kept.
Also printed once per checkout: the CLI's import time by top-level package (`python -X
importtime`) and, in a fresh interpreter, what a worker pays before its first shard: `import
ray`, `import pipeline.worker`, and the model's load (`pipeline.shard.encode.Runner`).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

from benchmarks import log
from benchmarks.corpus import corpus

REPO = Path(__file__).resolve().parent.parent
# the `wintok` console script's own entry point (`entry` where the checkout has it), timeline on
_CHILD = ("import logging, sys\n"
          "logging.getLogger('wintok.timeline').setLevel(logging.DEBUG)\n"
          "import pipeline.cli as cli\n"
          "sys.argv = ['wintok', *sys.argv[1:]]\n"
          "getattr(cli, 'entry', None) and cli.entry() or sys.exit(cli.main())\n")
_MARK = re.compile(r"timeline (\S+) ([0-9.]+)")
_WORKER_PROBE = """
import json, sys, time, tempfile
t0 = time.monotonic()
import ray  # noqa: F401
t1 = time.monotonic()
import pipeline.worker  # noqa: F401
t2 = time.monotonic()
from pipeline.shard.encode import ModelSpec, Runner
Runner(ModelSpec(model=sys.argv[1], device="cpu"))
t3 = time.monotonic()
print(json.dumps({"import ray": t1 - t0, "import pipeline.worker": t2 - t1, "model load (Runner)": t3 - t2}))
"""


def _env(code: Path) -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=str(code))
    env.pop("RAY_ADDRESS", None)
    return env


def one_run(code: Path, glob: str, out: Path, preset: str) -> dict[str, Any]:
    """One `wintok tokenize` in a child process -> {phase: seconds since spawn}, wall, stderr noise."""
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-c", _CHILD, "tokenize", glob, str(out), "--model", preset, "--device", "cpu",
           "--no-progress", "--json"]
    offset = time.time() - time.monotonic()
    spawn = time.monotonic()
    p = subprocess.run(cmd, env=_env(code), capture_output=True, text=True, cwd=code)
    end = time.monotonic()
    if p.returncode != 0:
        raise RuntimeError(f"wintok tokenize failed ({p.returncode}):\n{p.stderr[-3000:]}")
    marks: dict[str, float] = {}
    noise = []
    for line in p.stderr.splitlines():
        m = _MARK.search(line)
        if m:
            marks[m.group(1)] = float(m.group(2)) - spawn
        elif line.strip() and "RANDOM weights" not in line:
            noise.append(line.strip()[:200])
    starts, ends = [], []
    for f in (out / "_manifest").glob("*.json"):
        rec = json.loads(f.read_text())
        done = dt.datetime.fromisoformat(rec["finished_at"]).timestamp() - offset - spawn
        ends.append(done)
        starts.append(done - rec["seconds"])
    marks["first_shard_started"] = min(starts)
    marks["last_shard_committed"] = max(ends)
    marks["exit"] = end - spawn
    summary = json.loads(p.stdout)
    return {"marks": marks, "wall": end - spawn, "noise": noise, "images": summary["images"],
            "other_raylets": _other_raylets()}


def _other_raylets() -> int:
    """Raylets of other users of the machine running now (a shared machine: they take CPU and ports)."""
    try:
        out = subprocess.run(["pgrep", "-c", "-x", "raylet"], capture_output=True, text=True).stdout
        return int(out.strip() or 0)
    except (OSError, ValueError):
        return -1


def timeline(run: dict[str, Any]) -> list[tuple[str, float, float]]:
    """(phase, t since spawn, seconds since the previous phase), in time order; spawn at 0."""
    rows, prev = [], 0.0
    for name, t in sorted(run["marks"].items(), key=lambda kv: kv[1]):
        rows.append((name, t, t - prev))
        prev = t
    return rows


def import_offenders(code: Path, top: int = 8) -> list[tuple[str, float]]:
    """Self import time by top-level package of what `wintok tokenize` imports before run_job."""
    p = subprocess.run([sys.executable, "-X", "importtime", "-c", "import pipeline.cli, pipeline.driver"],
                       env=_env(code), capture_output=True, text=True, cwd=code)
    by_pkg: dict[str, float] = defaultdict(float)
    for line in p.stderr.splitlines():
        parts = line.split("|")
        if len(parts) != 3 or not parts[0].strip().startswith("import time:"):
            continue
        try:
            self_us = int(parts[0].split(":")[1])
        except ValueError:
            continue
        by_pkg[parts[2].strip().split(".")[0]] += self_us / 1e6
    return sorted(by_pkg.items(), key=lambda kv: -kv[1])[:top]


def worker_probe(code: Path, preset: str) -> dict[str, float]:
    p = subprocess.run([sys.executable, "-c", _WORKER_PROBE, preset], env=_env(code), capture_output=True,
                       text=True, cwd=code)
    if p.returncode != 0:
        raise RuntimeError(p.stderr[-2000:])
    return json.loads(p.stdout.strip().splitlines()[-1])


def render(code: Path, best: dict[str, Any], walls: list[float], imports: list[tuple[str, float]],
           probe: dict[str, float]) -> str:
    wall = best["wall"]
    m = best["marks"]
    work = m["last_shard_committed"] - m["first_shard_started"]
    lines = [f"### {code} (best of {len(walls)}: wall {', '.join(f'{w:.2f}' for w in walls)} s; "
             f"{best['images']} images; other raylets on the machine: {best['other_raylets']})", "",
             "| phase (ends at) | t (s) | seconds | share of wall |", "|---|---|---|---|"]
    for name, t, d in timeline(best):
        lines.append(f"| {name} | {t:.2f} | {d:.2f} | {100 * d / wall:.1f} % |")
    fixed = wall - work
    lines += ["", f"wall {wall:.2f} s = start {m['first_shard_started']:.2f} s + shards {work:.2f} s + "
              f"stop {wall - m['last_shard_committed']:.2f} s; fixed cost {fixed:.2f} s; at 12,000 images with "
              f"14 s of steady work: wall/steady = {(14 + fixed) / 14:.2f} (steady/wall {14 / (14 + fixed):.2f})",
              "", "CLI imports (self time by package): "
              + ", ".join(f"{k} {v:.2f} s" for k, v in imports),
              "worker, fresh interpreter: " + ", ".join(f"{k} {v:.2f} s" for k, v in probe.items())]
    if best["noise"]:
        lines += ["", "stderr besides the timeline: " + " / ".join(best["noise"][:6])]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.startup", description=__doc__.splitlines()[0])
    ap.add_argument("--code", action="append", type=Path, help="checkout to measure (repeatable; default: this one)")
    ap.add_argument("--shards", type=int, default=4)
    ap.add_argument("--per-shard", type=int, default=50)
    ap.add_argument("--preset", default="wintok-tiny")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--work", type=Path, default=REPO / "benchmarks" / "_work")
    ap.add_argument("--json", type=Path, help="also write the runs as JSON here")
    a = ap.parse_args(argv)
    codes = [c.resolve() for c in (a.code or [REPO])]
    info = corpus(a.work, a.shards * a.per_shard, a.per_shard, min(400, a.shards * a.per_shard), 0, 2)
    glob = str(Path(info["folder"]).resolve() / "*.tar")  # the children run in their checkout
    runs: dict[Path, list[dict[str, Any]]] = {c: [] for c in codes}
    for r in range(a.repeat):
        for i, code in enumerate(codes):  # alternating: one round of every checkout, then the next
            run = one_run(code, glob, a.work.resolve() / f"startup-out-{i}", a.preset)
            log(f"startup: {code} round {r + 1}: wall {run['wall']:.2f} s")
            runs[code].append(run)
    reports = []
    for code in codes:
        best = min(runs[code], key=lambda x: x["wall"])
        reports.append(render(code, best, [x["wall"] for x in runs[code]], import_offenders(code),
                              worker_probe(code, a.preset)))
    print("\n\n".join(reports))
    if a.json:
        a.json.write_text(json.dumps({str(c): v for c, v in runs.items()}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
