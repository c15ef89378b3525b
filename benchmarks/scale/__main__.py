"""`python -m benchmarks.scale --shards 1000 10000 --store local s3`: the scale harness.

Each case (shards x store x code) runs in a fresh process (benchmarks/scale/case.py: its own
Ray with `--gpus` declared GPUs, its own moto behind a counting proxy) and prints one JSON
line; `--code DIR` (repeatable) runs the same cases on other checkouts' pipeline/ (PYTHONPATH
DIR first, this harness after), rounds alternating between them; `--json PATH` keeps them all.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent.parent


def progress_cost(n: int = 100_000) -> dict[str, float]:
    """The driver's progress display per shard (pipeline/summary.py): tqdm bars on a terminal,
    a line every 30 s otherwise; microseconds of CPU per `shard_done`."""
    import io

    from pipeline.summary import Progress

    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    out = {}
    for name, stream in (("tty_us", Tty()), ("log_us", io.StringIO())):
        p = Progress(n, True, stream=stream)
        t = time.process_time()
        for _ in range(n):
            p.shard_done(10_000, 1)
        out[name] = round(1e6 * (time.process_time() - t) / n, 2)
        p.close()
    return out


def table(path: str) -> str:
    """The cases of a --json file as one markdown table (a row per case, in run order)."""
    rows = [json.loads(ln) for ln in open(path) if ln.strip()]
    head = ("| shards | store | code | shards/s | driver CPU ms/shard | driver RSS MiB start/peak | slot wait ms "
            "p50/p90/p99 | worker ms sink/fences/uploads | requests per committed shard | plan s | resume "
            "listing s (peak MiB) | load |")
    out = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        run, w = r.get("run"), r.get("worker_fixed_ms", {})
        req = " ".join(f"{k} {v:g}" for k, v in r.get("requests_per_committed_shard", {}).items() if v >= 0.01)
        out.append("| " + " | ".join(str(x) for x in (
            r["shards"], r["store"], Path(r["code"]).name,
            run["shards_per_s"] if run else "-", run["driver_cpu_ms_per_shard"] if run else "-",
            f"{run['driver_rss_mib_start']:.0f}/{run['driver_rss_mib_peak']:.0f}" if run else "-",
            f"{run['slot_wait_ms_p50']}/{run['slot_wait_ms_p90']}/{run['slot_wait_ms_p99']}" if run else "-",
            "/".join(str(w.get(k, "-")) for k in ("sink_rows", "fences", "uploads_manifest")) if w else "-",
            req or "-", r["plan_s"], f"{r['resume_listing_s']} ({r['resume_listing_peak_mib']})", r["load_1m"],
        )) + " |")
    return "\n".join(out)


def main() -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.scale")
    ap.add_argument("--shards", type=int, nargs="+", default=[1000, 10000])
    ap.add_argument("--store", nargs="+", default=["local", "s3"], choices=("local", "s3"))
    ap.add_argument("--code", action="append", default=[], help="another checkout to compare (repeatable)")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--json", help="append every case's JSON line to this file")
    ap.add_argument("--table", help="print the cases of this --json file as a markdown table, and stop")
    ap.add_argument("case_args", nargs=argparse.REMAINDER, help="after --: options of benchmarks.scale.case")
    args = ap.parse_args()
    if args.table:
        print(table(args.table))
        return 0
    print(json.dumps({"progress_cost_per_shard": progress_cost()}), flush=True)
    codes = [str(REPO)] + [str(Path(c).resolve()) for c in args.code]
    extra = [a for a in args.case_args if a != "--"]
    for n in args.shards:
        for store in args.store:
            for rnd in range(args.rounds):
                for code in codes if rnd % 2 == 0 else codes[::-1]:  # alternate who goes first
                    env = {**os.environ, "PYTHONPATH": os.pathsep.join(dict.fromkeys([code, str(REPO)]))}
                    t = time.monotonic()
                    p = subprocess.run([sys.executable, "-m", "benchmarks.scale.case", "--shards", str(n),
                                        "--store", store, *extra], env=env, cwd=code,  # -m: cwd first
                                       capture_output=True, text=True)
                    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
                    if p.returncode or not lines:
                        print(f"case {n} {store} {code}: failed (exit {p.returncode})\n{p.stderr[-3000:]}",
                              file=sys.stderr)
                        return 1
                    res = {**json.loads(lines[-1]), "code": code, "round": rnd,
                           "case_wall_s": round(time.monotonic() - t, 1),
                           "load_1m": round(os.getloadavg()[0], 2)}
                    print(json.dumps(res), flush=True)
                    if args.json:
                        with open(args.json, "a") as f:
                            f.write(json.dumps(res) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
