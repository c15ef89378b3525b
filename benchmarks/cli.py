"""`python -m benchmarks [flags]`: build the corpora, run the sections, write the results.

Examples:
  python -m benchmarks                                     # CPU: wintok-tiny + wintok-small
  python -m benchmarks --preset wintok-tiny --images 1000 --only limit,decode,pipeline
  python -m benchmarks report benchmarks/results.json     # redraw the PNG and the table
See benchmarks/RESULTS.md for the numbers, the FLOP formula and the GPU script.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import benchmarks
from benchmarks import SECTIONS, log, report
from benchmarks.common import image_size, pipeline_shape
from benchmarks.corpus import corpus
from benchmarks.harness import Harness, child_main, code_version, hardware, short
from benchmarks.models import TEACHER_ARCHS, make_teacher, model_flops

HERE = Path(__file__).resolve().parent
DECODE_SECTIONS = ("decode", "inproc", "pipeline")  # run once per --decode-mode


def _csv(s: str) -> list[str]:
    return [x.strip() for x in s.split(",") if x.strip()]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from pipeline.config import JobConfig

    ap = argparse.ArgumentParser(prog="python -m benchmarks", description=benchmarks.__doc__.split("\n\n")[0],
                                 epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default=",".join(SECTIONS),
                    help=f"comma list of sections to run (default: all of {','.join(SECTIONS)})")
    ap.add_argument("--preset", default="wintok-tiny,wintok-small",
                    help="comma list of model presets (or model dirs); each is benchmarked")
    ap.add_argument("--images", default="2000,600",
                    help="corpus size per preset (comma list matching --preset; the last one repeats)")
    ap.add_argument("--teacher", default=None, help="a teacher folder: adds '+teacher' variants")
    ap.add_argument("--teacher-sections", default="limit,pipeline",
                    help="sections that also run the '+teacher' variant")
    ap.add_argument("--no-plain", action="store_true", help="with --teacher: run only the '+teacher' variants")
    ap.add_argument("--batch-size", type=int, default=JobConfig.batch_size)
    ap.add_argument("--decode-threads", type=int, default=JobConfig.decode_threads,
                    help="decode threads of the pipeline, used for the decode section too (default: the pipeline's)")
    ap.add_argument("--decode-mode", default="auto",
                    help="comma list of threads|processes|auto: the decode, inproc and pipeline sections run once "
                         "per mode (auto: the pipeline's choice, processes on a GPU, threads on a CPU)")
    ap.add_argument("--workers", type=int, default=None, help="pipeline CPU workers (default: the pipeline's)")
    ap.add_argument("--loader-workers", type=int, default=None, help="naive DataLoader workers (default: CPU count)")
    ap.add_argument("--compile", action="store_true", help="JobConfig.compile=True for the pipeline section")
    ap.add_argument("--shard-size", type=int, default=250, help="samples per tar")
    ap.add_argument("--pool", type=int, default=400, help="unique JPEGs (the corpus cycles them)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--limit-seconds", type=float, default=5.0, help="timed seconds per limit measurement")
    ap.add_argument("--scaling-images", type=int, default=500, help="N for the scaling section (N and 10N)")
    ap.add_argument("--scaling-factor", type=int, default=10)
    ap.add_argument("--scaling-preset", default=None, help="preset for the scaling section (default: the first)")
    ap.add_argument("--peak-tflops", type=float, default=None,
                    help="peak for MFU (default: 989 bf16 dense on CUDA, else the measured fp32 matmul rate)")
    ap.add_argument("--section-timeout", type=float, default=900, help="seconds per section run")
    ap.add_argument("--budget", type=float, default=None,
                    help="total seconds: sections not yet started when it is spent are skipped (and reported)")
    ap.add_argument("--work", default=str(HERE / "_work"))
    ap.add_argument("--json", default=str(HERE / "_work" / "results.json"), help="where the results JSON goes")
    ap.add_argument("--markdown", default=str(HERE / "_work" / "results.md"), help="where the markdown table goes")
    ap.add_argument("--png", default=str(HERE / "_work" / "results.png"), help="where the plot goes")
    ap.add_argument("--plot-only", metavar="JSON",
                    help="only redraw the PNG and table from a results JSON (the same as `report JSON`)")
    ap.add_argument("--make-teacher", metavar="DIR", help="save a random SigLIP teacher to DIR first (if missing)")
    ap.add_argument("--teacher-arch", default="so400m-256", choices=sorted(TEACHER_ARCHS))
    ap.add_argument("--wait-quiet", type=float, default=0.0, metavar="SECONDS",
                    help="before each run wait up to SECONDS until the machine is quiet (shared machines)")
    ap.add_argument("--quiet-threshold", type=float, default=0.25,
                    help="'quiet' = the whole machine's CPU busy fraction at most this (default 0.25)")
    ap.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                    help="environment for the sections' processes and their Ray workers (e.g. MALLOC_ARENA_MAX=2)")
    ap.add_argument("--repeat", type=int, default=1,
                    help="run each section this many times and keep the fastest (steady img/s); for noisy machines")
    ap.add_argument("--_child", help=argparse.SUPPRESS)
    ap.add_argument("--_result", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    bad = set(_csv(args.only)) - set(SECTIONS)
    if bad:
        ap.error(f"unknown sections {sorted(bad)}; known: {', '.join(SECTIONS)}")
    return args


@dataclass
class Budget:
    """--budget (total seconds, None: no limit) and --section-timeout, from the run's start."""

    seconds: float | None
    section_timeout: float
    t0: float = field(default_factory=time.monotonic)

    def remaining(self) -> float:
        return self.seconds - (time.monotonic() - self.t0) if self.seconds else float("inf")

    def timeout(self) -> float:
        return max(30.0, min(self.section_timeout, self.remaining()))

    def deadline(self) -> float | None:
        return self.t0 + self.seconds if self.seconds else None


def set_peak(results: dict[str, Any], peak_tflops: float | None) -> None:
    """The MFU peak: --peak-tflops, else the H100/H200 datasheet on CUDA, else the measured matmul rate."""
    meta = results["meta"]
    measured = [r.get("matmul_tflops") or 0 for r in results["runs"] if r.get("section") == "limit" and r.get("ok")]
    meta["measured_matmul_tflops"] = max(measured) if measured else None
    if peak_tflops:
        meta["peak_tflops"], meta["peak_source"] = peak_tflops, "--peak-tflops"
    elif meta["hardware"].get("cuda"):
        meta["peak_tflops"] = 989.0
        meta["peak_source"] = "H100/H200 SXM datasheet, bf16 dense"
    else:
        meta["peak_tflops"] = meta["measured_matmul_tflops"]
        meta["peak_source"] = "best measured fp32 2048^3 matmul on all cores (limit section)"


class Run:
    """One invocation: the corpora, the runs in the order given to --only, the results written as they come."""

    def __init__(self, args: argparse.Namespace, argv: list[str]) -> None:
        self.args = args
        self.harness = Harness(env=dict(kv.split("=", 1) for kv in args.env), wait_quiet=args.wait_quiet,
                               quiet_threshold=args.quiet_threshold, repeat=args.repeat)
        self.budget = Budget(args.budget, args.section_timeout)
        self.presets = _csv(args.preset)
        self.results: dict[str, Any] = {
            "meta": {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                     "command": " ".join([Path(sys.executable).name, "-m", "benchmarks", *argv]),
                     "hardware": hardware(), "code": code_version(),
                     "args": {k: v for k, v in vars(args).items() if not k.startswith("_")}},
            "corpora": {}, "runs": [], "scaling": None,
        }

    def write(self, quiet: bool = True) -> None:
        a = self.args
        report.write_outputs(self.results, a.json, a.markdown, a.png, quiet=quiet)

    def main(self) -> int:
        a = self.args
        log(f"hardware: {json.dumps(self.results['meta']['hardware'])}")
        sizes = [int(x) for x in _csv(a.images)]
        corpora = {}
        for i, preset in enumerate(self.presets):
            n = sizes[min(i, len(sizes) - 1)]
            corpora[preset] = corpus(Path(a.work), n, a.shard_size, a.pool, a.seed, os.cpu_count() or 1)
            self.results["corpora"][preset] = corpora[preset]
        variants: list[str | None] = [] if (a.teacher and a.no_plain) else [None]
        if a.teacher:
            variants.append(a.teacher)
        for section in _csv(a.only):  # the order given to --only
            if section == "scaling":
                self.scaling()
                continue
            modes: list[str | None] = list(_csv(a.decode_mode)) if section in DECODE_SECTIONS else [None]
            for preset in self.presets:
                for teacher, mode in [(t, m) for t in variants for m in modes]:
                    if teacher and (section not in _csv(a.teacher_sections) or section == "decode"):
                        continue  # decoding does not depend on the teacher
                    self.section(section, preset, corpora[preset], teacher, mode, len(modes) > 1)
        set_peak(self.results, a.peak_tflops)
        self.write(quiet=False)
        return 0 if all(r.get("ok") for r in self.results["runs"]) else 1

    def spec(self, section: str, preset: str, info: dict[str, Any], teacher: str | None,
             mode: str | None) -> dict[str, Any]:
        a = self.args
        return {"section": section, "preset": preset, "teacher": teacher, "corpus": info,
                "images": info["images"], "batch_size": a.batch_size, "decode_threads": a.decode_threads,
                "workers": a.workers, "loader_workers": a.loader_workers, "work": str(a.work),
                "compile": a.compile and section == "pipeline", "limit_seconds": a.limit_seconds,
                "image_size": image_size(preset), "tag": "main", "decode_mode": mode}

    def section(self, section: str, preset: str, info: dict[str, Any], teacher: str | None, mode: str | None,
                mode_label: bool) -> None:
        """One section on one model variant (and decode mode): best of --repeat, recorded and written."""
        label = f"{section} {preset}{' +teacher' if teacher else ''}{f' [{mode}]' if mode_label else ''}"
        if self.budget.remaining() < 30:
            log(f"skipping {label}: --budget spent")
            self.results["runs"].append({"ok": False, "error": "skipped: --budget spent", "section": section,
                                         "preset": preset, "teacher": bool(teacher)})
            return
        p = self.spec(section, preset, info, teacher, mode)
        log(f"running {label} on {info['images']} images ...")
        res = self.harness.best_of(p, self.budget.timeout())
        if section in DECODE_SECTIONS and "decode_mode" not in res:  # a failed run: the pipeline's mode for it
            res["decode_mode"] = pipeline_shape(p).decode_mode
        res.update(section=section, preset=preset, teacher=bool(teacher), mode_label=mode_label,
                   flops_per_image=model_flops(preset, teacher)["total"] if section != "decode" else 0.0)
        self.results["runs"].append(res)
        log(f"  {label}: {short(res)}")
        set_peak(self.results, self.args.peak_tflops)
        self.write()

    def scaling(self) -> None:
        from benchmarks.sections import scaling

        a = self.args
        self.results["scaling"] = scaling.run({
            "preset": a.scaling_preset or self.presets[0], "scaling_images": a.scaling_images,
            "factor": a.scaling_factor, "shard_size": a.shard_size, "pool": a.pool, "seed": a.seed,
            "work": str(a.work), "batch_size": a.batch_size, "decode_threads": a.decode_threads,
            "workers": a.workers, "harness": asdict(self.harness), "section_timeout": a.section_timeout,
            "deadline": self.budget.deadline()})
        self.write()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["report"]:
        return report.main(argv[1:])
    args = parse_args(argv)
    if args._child:
        return child_main(args._child, args._result)
    if args.plot_only:
        report.write_outputs(json.loads(Path(args.plot_only).read_text()), None, args.markdown, args.png)
        return 0
    if args.make_teacher:
        make_teacher(args.make_teacher, args.teacher_arch)
        args.teacher = args.teacher or args.make_teacher
    return Run(args, argv).main()
