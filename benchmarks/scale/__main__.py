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


def main() -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.scale")
    ap.add_argument("--shards", type=int, nargs="+", default=[1000, 10000])
    ap.add_argument("--store", nargs="+", default=["local", "s3"], choices=("local", "s3"))
    ap.add_argument("--code", action="append", default=[], help="another checkout to compare (repeatable)")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--json", help="append every case's JSON line to this file")
    ap.add_argument("case_args", nargs=argparse.REMAINDER, help="after --: options of benchmarks.scale.case")
    args = ap.parse_args()
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
