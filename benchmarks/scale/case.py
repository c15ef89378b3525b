"""One measured case of the scale harness, in a fresh process (its own Ray, its own moto):
`python -m benchmarks.scale.case --shards N --store s3|local ...` prints one JSON line.

Steps: seed (a share of the shards committed by a first run), the measured run (the real
run_job over all N shards on `gpus` declared GPUs served by simulated workers; a share fails
on every attempt, a share kills its slot once), then planning and the resume listing alone
(plan() and pending() as run_job calls them, timed and with tracemalloc's peak).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
import tracemalloc
from typing import Any

FAKE_AWS = {"AWS_ACCESS_KEY_ID": "testing-key-id", "AWS_SECRET_ACCESS_KEY": "testing-secret-value",
            "AWS_DEFAULT_REGION": "us-east-1"}


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class RssSampler:
    def __init__(self, every: float = 0.25) -> None:
        self.every, self.samples = every, []
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        t0 = time.monotonic()
        while not self._stop.wait(self.every):
            self.samples.append((round(time.monotonic() - t0, 2), _rss()))

    def __enter__(self) -> RssSampler:
        self.samples.append((0.0, _rss()))
        self._t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._t.join()
        self.samples.append((self.samples[-1][0], _rss()))


class S3:
    def __init__(self) -> None:
        self.p = subprocess.Popen([sys.executable, "-m", "benchmarks.scale.s3server"], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, text=True, env={**os.environ, **FAKE_AWS})
        assert self.p.stdout is not None
        for line in self.p.stdout:
            if line.startswith("http"):
                self.url, self.backend = line.split()
                break

    def ask(self, cmd: str) -> dict[str, Any]:
        assert self.p.stdin is not None and self.p.stdout is not None
        self.p.stdin.write(cmd + "\n")
        self.p.stdin.flush()
        return json.loads(self.p.stdout.readline())

    def close(self) -> None:
        assert self.p.stdin is not None
        self.p.stdin.close()
        self.p.wait(10)


def _pct(xs: list[float], q: float) -> float:
    if not xs:
        return 0.0
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shards", type=int, required=True)
    ap.add_argument("--store", choices=("local", "s3"), default="local")
    ap.add_argument("--gpus", type=int, default=256)
    ap.add_argument("--hosts", type=int, default=4)
    ap.add_argument("--delay", type=float, default=2.56, help="seconds per shard per slot (2.56: 100 shards/s)")
    ap.add_argument("--rows", type=int, default=2)
    ap.add_argument("--resume-share", type=float, default=0.1)
    ap.add_argument("--fail-per-mille", type=int, default=10)
    ap.add_argument("--die-per-mille", type=int, default=5)
    ap.add_argument("--listing-only", action="store_true", help="seed manifests directly, time planning+listing")
    args = ap.parse_args()
    os.environ.update(FAKE_AWS)
    os.environ.setdefault("RAY_IGNORE_UNHANDLED_ERRORS", "1")  # the dead slots' queued calls

    import ray

    from benchmarks.scale.sim import SimSpec, SimWorkers
    from pipeline.config import JobConfig
    from pipeline.driver import run_job
    from pipeline.io import Storage
    from pipeline.plan import storage_options
    from wintok_model import WinTok, get_preset

    tmp = tempfile.mkdtemp(prefix="wintok-scale-")
    model = os.path.join(tmp, "model")
    WinTok(get_preset("wintok-tiny")).save_pretrained(model)  # the fingerprint reads it; workers do not
    s3 = S3() if args.store == "s3" else None
    n, digits = args.shards, max(6, len(str(args.shards - 1)))
    if s3:
        import s3fs

        s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3.url}).mkdir("bench")
        root, out, extra = "s3://bench/in", "s3://bench/out", {"s3_endpoint_url": s3.url}
    else:
        root, out, extra = os.path.join(tmp, "in"), os.path.join(tmp, "out"), {}
    seeded = int(n * args.resume_share)

    def cfg(first: int, last: int) -> JobConfig:
        return JobConfig(inputs=(f"{root}/{{{first:0{digits}d}..{last:0{digits}d}}}.tar",), output=out, model=model,
                         max_retries=1, retry_backoff=0.05, retry_backoff_max=0.05, lease_ttl=60.0, **extra)

    ray.init(address="local", num_cpus=2, num_gpus=args.gpus, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {**FAKE_AWS, "RAY_IGNORE_UNHANDLED_ERRORS": "1"}},
             logging_level="ERROR")
    result: dict[str, Any] = {"shards": n, "store": args.store, "gpus": args.gpus, "hosts": args.hosts,
                              "delay_s": args.delay, "seeded": seeded}
    if args.listing_only:  # no run: manifests written straight (99% committed), then plan + listing
        seeded = result["seeded"] = n - n // 100
        run = cfg(0, n - 1)
        from pipeline.plan import check_run_file, run_fingerprint

        check_run_file(Storage(out, storage_options(run)), run_fingerprint(run), run)  # its _run.json
        names = [f"{i:0{digits}d}" for i in range(seeded)]
        t = time.monotonic()
        if s3:
            import s3fs

            fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3.backend}, skip_instance_cache=True)
            for k in range(0, seeded, 5000):
                fs.pipe({f"bench/out/_manifest/{m}.json": b"{}" for m in names[k:k + 5000]}, batch_size=64)
        else:
            os.makedirs(os.path.join(out, "_manifest"), exist_ok=True)
            for m in names:
                with open(os.path.join(out, "_manifest", f"{m}.json"), "wb") as f:
                    f.write(b"{}")
        result["seed_s"] = round(time.monotonic() - t, 1)
    if seeded and not args.listing_only:  # a share already committed: the run below resumes
        sim = SimWorkers(args.hosts, SimSpec())
        run_job(cfg(0, seeded - 1), sim.workers)
        sim.close()
    if s3:
        s3.ask("reset")
    full = cfg(0, n - 1)
    if not args.listing_only:
        _measure_run(args, result, full, s3)
    _measure_listing(result, full, out, s3)
    ray.shutdown()
    print(json.dumps(result), flush=True)


def _measure_run(args: argparse.Namespace, result: dict[str, Any], full: Any, s3: S3 | None) -> None:
    from benchmarks.scale.sim import SimSpec, SimWorkers
    from pipeline.driver import run_job

    spec = SimSpec(delay=args.delay, rows=args.rows, fail_per_mille=args.fail_per_mille,
                   die_per_mille=args.die_per_mille)
    sim = SimWorkers(args.hosts, spec)
    c0, t0, ru0 = time.process_time(), time.monotonic(), resource.getrusage(resource.RUSAGE_SELF)
    with RssSampler() as rss:
        summary = run_job(full, sim.workers)
    wall, cpu = time.monotonic() - t0, time.process_time() - c0
    report = sim.report()
    sim.close()
    dispatched = summary.done + summary.failed  # shards that ran in this run (retries beside)
    result["run"] = {
        "wall_s": round(wall, 2), "driver_cpu_s": round(cpu, 2), "done": summary.done, "failed": summary.failed,
        "skipped": summary.skipped, "shards_per_s": round(dispatched / wall, 1) if wall else 0,
        "driver_cpu_ms_per_shard": round(1000 * cpu / max(1, dispatched), 3),
        "driver_rss_mib_start": round(rss.samples[0][1] / 2**20, 1),
        "driver_rss_mib_peak": round(max(s for _, s in rss.samples) / 2**20, 1),
        "driver_rss_mib_end": round(rss.samples[-1][1] / 2**20, 1),
        "ctx_switches": resource.getrusage(resource.RUSAGE_SELF).ru_nvcsw - ru0.ru_nvcsw,
        "exactly_once": set(report["commits"].values()) <= {1},
        "slot_wait_ms_p50": round(1000 * _pct(report["waits"], 0.5), 2),
        "slot_wait_ms_p90": round(1000 * _pct(report["waits"], 0.9), 2),
        "slot_wait_ms_p99": round(1000 * _pct(report["waits"], 0.99), 2),
    }
    costs = report["costs"]
    if costs:
        result["worker_fixed_ms"] = {name: round(1000 * _pct([c[i] for c in costs], 0.5), 2)
                                     for i, name in enumerate(("sink_rows", "fences", "uploads_manifest"))}
    if s3:
        counts = s3.ask("counts")
        result["requests"] = counts
        result["requests_per_committed_shard"] = {k: round(v / max(1, summary.done), 3)
                                                  for k, v in sorted(counts["by_kind"].items())}
        s3.ask("reset")


def _measure_listing(result: dict[str, Any], full: Any, out: str, s3: S3 | None) -> None:
    """Planning and the resume listing, alone (what a rerun pays before anything starts)."""
    from pipeline.io import Storage
    from pipeline.plan import pending, plan, storage_options

    opts = storage_options(full)
    t = time.monotonic()
    shards = plan(full, opts)
    result["plan_s"] = round(time.monotonic() - t, 3)
    storage = Storage(out, opts)
    tracemalloc.start()
    t = time.monotonic()
    todo, skipped = pending(full, storage, shards)
    result["resume_listing_s"] = round(time.monotonic() - t, 3)
    result["resume_listing_peak_mib"] = round(tracemalloc.get_traced_memory()[1] / 2**20, 1)
    tracemalloc.stop()
    result["resume_found"] = {"todo": len(todo), "committed": skipped}
    if s3:
        result["resume_listing_requests"] = s3.ask("counts")["by_kind"]
        s3.close()


if __name__ == "__main__":
    main()
