"""`wintok` command line: tokenize, embed, status, convert-checkpoint, demo."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import warnings
from typing import Any

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def _bool(parser: argparse.ArgumentParser, name: str, help: str) -> None:
    parser.add_argument(name, action="store_true", default=None, help=help)


def _job_args(p: argparse.ArgumentParser, teacher_only: bool = False) -> None:
    p.add_argument("paths", nargs="*", metavar="INPUT... OUTPUT",
                   help="input shards (fsspec URLs, brace ranges {00000..00099}, globs, or a .txt list), "
                        "then the OUTPUT URL")
    p.add_argument("--job", help="YAML job file (see jobs/); flags override it")
    p.add_argument("--output", help="OUTPUT URL (instead of the last positional argument)")
    if not teacher_only:
        p.add_argument("--model", help="preset name, model directory, or official .pth (default wintok-tiny)")
        p.add_argument("--encoder-config", help="SigLIP config.json (or folder) for an official .pth")
        _bool(p, "--allow-pickle", "allow checkpoints that need pickled code (only for files you trust)")
        p.add_argument("--dtype", choices=["auto", "bf16", "fp32"], help="auto: bf16 on GPU, fp32 on CPU")
        _bool(p, "--semantic-tokens", "also store the (N, D) semantic tokens (large)")
        _bool(p, "--no-tokenizer", "teacher embeddings only (same as `wintok embed`)")
    p.add_argument("--teacher", help="teacher model folder or model id in the local HF cache")
    p.add_argument("--teacher-dtype", choices=["auto", "bf16", "fp32"])
    _bool(p, "--teacher-patch-tokens", "also store the teacher's patch features")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"])
    _bool(p, "--compile", "torch.compile the encoder")
    p.add_argument("--resize", choices=["center-crop", "squash"])
    p.add_argument("--max-image-pixels", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--decode-threads", type=int, help="decoders per worker (threads or processes)")
    p.add_argument("--decode-mode", choices=["auto", "threads", "processes"],
                   help="decode in threads of the worker or in child processes (auto: processes on GPU workers)")
    p.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else a local Ray)")
    p.add_argument("--workers", type=int, help="CPU workers when there are no GPUs")
    p.add_argument("--torch-threads", type=int, help="intra-op threads of each CPU worker")
    p.add_argument("--max-retries", type=int)
    p.add_argument("--retry-backoff", type=float, help="seconds before the first retry (doubles each time)")
    p.add_argument("--shard-timeout", type=float, metavar="SECONDS",
                   help="fail a shard (reason timeout) that makes no progress for this long, and replace "
                        "its worker (default 600)")
    _bool(p, "--overwrite", "redo every shard even if OUTPUT holds a different run")
    _bool(p, "--retry-failed", "only take up the shards recorded as failed")
    p.add_argument("--s3-endpoint-url")
    p.add_argument("--s3-profile")
    _bool(p, "--s3-anon", "anonymous S3 access")
    p.add_argument("--s3-key", help="prefer AWS_* variables or --s3-profile; never written anywhere")
    p.add_argument("--s3-secret", help="prefer AWS_* variables or --s3-profile; never written anywhere")
    p.add_argument("--no-progress", dest="progress", action="store_false", default=None)
    p.add_argument("--json", action="store_true", help="print the summary as JSON")


def _job_from_args(a: argparse.Namespace, teacher_only: bool) -> Any:
    from .config import JobConfigError, resolve

    paths = list(a.paths)
    output = a.output
    if output is None and paths:
        output = paths.pop()  # INPUT... OUTPUT: the last positional is the output
    overrides = {k: v for k, v in vars(a).items()
                 if k not in ("paths", "job", "json", "cmd", "func", "no_tokenizer")}
    overrides["output"] = output
    overrides["inputs"] = tuple(paths) if paths else None
    if teacher_only or getattr(a, "no_tokenizer", None):
        overrides["model"] = None
        if not a.teacher:
            raise JobConfigError("teacher-only mode needs --teacher")
    elif a.model is None and a.job is None:
        overrides["model"] = "wintok-tiny"
    cfg = resolve(a.job, overrides)
    if teacher_only and cfg.model is not None:
        cfg = cfg.replace(model=None)
    return cfg


def cmd_tokenize(a: argparse.Namespace, teacher_only: bool = False) -> int:
    from .driver import run_job

    cfg = _job_from_args(a, teacher_only)
    summary = run_job(cfg)
    print(json.dumps(summary.to_dict(), indent=1) if a.json else summary.render())
    return EXIT_OK if summary.ok else EXIT_FAILED


def cmd_status(a: argparse.Namespace) -> int:
    from .io import s3_options
    from .status import render, status

    s = status(a.output, s3_options(a.s3_endpoint_url, a.s3_profile, a.s3_anon))
    print(json.dumps(s, indent=1) if a.json else render(s))
    return EXIT_OK if s["shards_failed"] == 0 else EXIT_FAILED


def cmd_verify(a: argparse.Namespace) -> int:
    from .io import s3_options
    from .verify import verify

    report = verify(a.output, s3_options(a.s3_endpoint_url, a.s3_profile, a.s3_anon))
    print(json.dumps(report.to_dict(), indent=1) if a.json else report.render())
    return EXIT_OK if report.clean(strict=a.strict) else EXIT_FAILED


def cmd_convert(a: argparse.Namespace) -> int:
    from wintok_model.checkpoint import convert_checkpoint

    model = convert_checkpoint(a.src, a.out_dir, encoder_config=a.encoder_config, allow_pickle=a.allow_pickle)
    n = sum(p.numel() for p in model.parameters())
    print(f"wrote {a.out_dir} ({n / 1e6:.1f}M parameters); use it with --model {a.out_dir}")
    return EXIT_OK


def cmd_demo(a: argparse.Namespace) -> int:
    from .demo import run_demo

    return run_demo(a.dir, workers=a.workers)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="wintok", description="WinTok offline tokenization pipeline")
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("tokenize", help="tokenize webdataset shards into Parquet (pixel ids, semantic, teacher)")
    _job_args(t)
    t.set_defaults(func=cmd_tokenize)
    e = sub.add_parser("embed", help="teacher embeddings only, same output contract")
    _job_args(e, teacher_only=True)
    e.set_defaults(func=lambda a: cmd_tokenize(a, teacher_only=True))
    for name, helptext, func in (("status", "summarise an OUTPUT from its manifests", cmd_status),
                                 ("verify", "check every manifest against its files", cmd_verify)):
        s = sub.add_parser(name, help=helptext)
        s.add_argument("output")
        s.add_argument("--json", action="store_true")
        s.add_argument("--s3-endpoint-url")
        s.add_argument("--s3-profile")
        s.add_argument("--s3-anon", action="store_true")
        if name == "verify":
            s.add_argument("--strict", action="store_true", help="uncommitted leftovers count as problems")
        s.set_defaults(func=func)
    c = sub.add_parser("convert-checkpoint", help="official WinTok .pth -> model directory (safetensors)")
    c.add_argument("src")
    c.add_argument("out_dir")
    c.add_argument("--encoder-config")
    c.add_argument("--allow-pickle", action="store_true")
    c.set_defaults(func=cmd_convert)
    d = sub.add_parser("demo", help="make a small photo corpus and tokenize it on a local Ray (CPU ok)")
    d.add_argument("--dir", default="wintok_demo")
    d.add_argument("--workers", type=int, default=None)
    d.set_defaults(func=cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    from wintok_model.checkpoint import CheckpointError
    from wintok_model.config import ConfigError

    from .config import JobConfigError
    from .driver import RunRefused
    from .io import InputError
    from .lease import LeaseHeld
    from .signals import RunStopped, raise_stopped, trap_sigterm

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    warnings.filterwarnings("default")
    a = build_parser().parse_args(argv)
    try:
        with trap_sigterm(raise_stopped):  # SIGTERM (preemption) stops the run like SIGINT
            return a.func(a)
    except RunStopped as e:
        print(f"wintok: {e}", file=sys.stderr)
        return e.exit_status
    except (JobConfigError, CheckpointError, ConfigError, RunRefused, InputError, LeaseHeld,
            FileNotFoundError) as e:
        print(f"wintok: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("wintok: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
