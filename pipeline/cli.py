"""`wintok` command line: tokenize, embed, download, status, convert-checkpoint, demo."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import warnings
from typing import Any

from .config import FIELD_NAMES, FIELDS, flag_of, help_of, value_type

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def _bool(parser: argparse.ArgumentParser, name: str, help: str) -> None:
    parser.add_argument(name, action="store_true", default=None, help=help)


def add_option(p: argparse.ArgumentParser, name: str) -> None:
    """JobConfig field `name` as a flag, generated from its one declaration (pipeline/config.py):
    spelling, type, choices, help and default text. Every default here is None (= not given), so
    a flag that is not given leaves the job file's value alone."""
    meta, flag, kind = FIELDS[name].metadata, flag_of(name), value_type(name)
    assert flag is not None, f"{name} has no flag"
    if kind is bool:
        negated = FIELDS[name].default is True  # --no-progress: stores False
        p.add_argument(flag, dest=name, action="store_false" if negated else "store_true", default=None,
                       help=_escape(f"no {meta['help']}" if negated else help_of(name)))
    else:
        p.add_argument(flag, dest=name, type=kind, default=None, choices=meta["choices"], metavar=meta["metavar"],
                       help=_escape(help_of(name)))


def _escape(help: str) -> str:
    return help.replace("%", "%%")  # argparse %-formats help texts


def _job_args(p: argparse.ArgumentParser, teacher_only: bool = False) -> None:
    p.add_argument("paths", nargs="*", metavar="INPUT... OUTPUT",
                   help=_escape(FIELDS["inputs"].metadata["help"] + ", then the OUTPUT URL"))
    p.add_argument("--job", help="YAML job file (see jobs/, keys: jobs/REFERENCE.md); flags override it")
    for name, f in FIELDS.items():
        if flag_of(name) is None or (teacher_only and f.metadata["tokenizer"]):
            continue
        add_option(p, name)
        if name == "semantic_tokens":
            _bool(p, "--no-tokenizer", "teacher embeddings only (same as `wintok embed`)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")


def model_required() -> str:
    """The one line for tokenize without a model; names the presets (imports torch: error path only)."""
    from wintok_model.config import PRESETS

    return (f"tokenize needs --model: a model directory, an official .pth, or a preset name "
            f"({', '.join(PRESETS)}: RANDOM weights); teacher embeddings only: `wintok embed` or --no-tokenizer")


def _job_from_args(a: argparse.Namespace, teacher_only: bool) -> Any:
    from .config import JobConfigError, load_job_file, resolve

    paths = list(a.paths)
    output = a.output
    if output is None and paths:
        output = paths.pop()  # INPUT... OUTPUT: the last positional is the output
    overrides = {k: v for k, v in vars(a).items() if k in FIELD_NAMES}
    overrides["output"] = output
    overrides["inputs"] = tuple(paths) if paths else None
    if teacher_only or getattr(a, "no_tokenizer", None):
        overrides["model"] = None
        if not a.teacher:
            raise JobConfigError("teacher-only mode needs --teacher")
    elif a.model is None and not (a.job and load_job_file(a.job).get("model")):
        raise JobConfigError(model_required())
    cfg = resolve(a.job, overrides)
    if teacher_only and cfg.model is not None:
        cfg = cfg.replace(model=None)
    return cfg


def preset_warning(model: str | None) -> str | None:
    """The one line to print when `model` names a preset (random weights), else None."""
    from wintok_model.config import PRESETS

    if model is None or model not in PRESETS or os.path.exists(model):
        return None
    return (f"wintok: warning: model {model!r} is a preset with RANDOM weights: its tokens mean nothing; "
            "give --model a trained checkpoint (a model directory or an official .pth) for real tokens")


def _check_output_is_a_folder(output: str) -> None:
    """A local OUTPUT (or a folder above it) that is an existing file: one line, before anything starts."""
    from .config import JobConfigError
    from .io import protocol_of

    if protocol_of(output) != "file":
        return
    target = path = os.path.abspath(output.split("://", 1)[-1])
    while not os.path.exists(path):
        if os.path.dirname(path) == path:
            return
        path = os.path.dirname(path)
    if not os.path.isdir(path):
        where = "is" if path == target else f"is inside {path}, which is"
        raise JobConfigError(f"OUTPUT {output} {where} an existing file: give a new folder, or one that "
                             "an earlier wintok run wrote")


def _quiet_local_ray_auth(address: str | None) -> None:
    """Before Ray is imported (it reads RAY_AUTH_MODE once, at import): when this run starts a
    local Ray (no --address / RAY_ADDRESS, as in cluster.start_ray), name the auth mode Ray picks
    for a new local cluster anyway, token (a token in ~/.ray/auth_token, made if missing). Left
    unset, Ray picks the same mode and logs 'Token authentication is enabled...' on every run.
    A cluster being joined keeps its own mode: nothing is set then."""
    address = address or os.environ.get("RAY_ADDRESS")
    if (not address or address == "local") and "ray" not in sys.modules:
        os.environ.setdefault("RAY_AUTH_MODE", "token")


def cmd_tokenize(a: argparse.Namespace, teacher_only: bool = False) -> int:
    from .driver import run_job

    cfg = _job_from_args(a, teacher_only)
    _check_output_is_a_folder(cfg.output)
    warning = preset_warning(cfg.model)
    if warning:
        print(warning, file=sys.stderr, flush=True)
    _quiet_local_ray_auth(cfg.address)
    summary = run_job(cfg)
    print(json.dumps(summary.to_dict(), indent=1) if a.json else summary.render())
    return EXIT_OK if summary.ok else EXIT_FAILED


def _download_args(p: argparse.ArgumentParser) -> None:
    """`wintok download`'s flags, generated from pipeline/ingest.py's DownloadConfig fields."""
    from .ingest import DOWNLOAD_FIELDS

    for name, f in DOWNLOAD_FIELDS.items():
        meta, help = f.metadata, _escape(f.metadata["help"])
        if meta["positional"]:
            p.add_argument(name, metavar=name.upper(), help=help)
        elif f.default is False:
            p.add_argument(f"--{name.replace('_', '-')}", dest=name, action="store_true", help=help)
        else:
            kind = int if isinstance(f.default, int) else str
            shown = f" (default {f.default})" if f.default is not None else ""
            p.add_argument(f"--{name.replace('_', '-')}", dest=name, type=kind, default=f.default,
                           choices=meta["choices"], help=help + shown)
    p.add_argument("--json", action="store_true", help="print the summary as JSON")


def cmd_download(a: argparse.Namespace) -> int:
    from .ingest import DOWNLOAD_FIELDS, DownloadConfig, download

    cfg = DownloadConfig(**{k: getattr(a, k) for k in DOWNLOAD_FIELDS})
    summary = download(cfg)
    print(json.dumps(summary.to_dict(), indent=1) if a.json else summary.render(cfg.output))
    return EXIT_OK if summary.shards else EXIT_FAILED


def cmd_status(a: argparse.Namespace) -> int:
    from .io import s3_options
    from .status import render, status

    s = status(a.output, s3_options(a.s3_endpoint_url, a.s3_profile, bool(a.s3_anon)))
    print(json.dumps(s, indent=1) if a.json else render(s))
    return EXIT_OK if s["shards_failed"] == 0 else EXIT_FAILED


def cmd_verify(a: argparse.Namespace) -> int:
    from .io import s3_options
    from .verify import repair, verify

    opts = s3_options(a.s3_endpoint_url, a.s3_profile, bool(a.s3_anon))
    report = verify(a.output, opts)
    if a.repair and report.damaged:
        repair(a.output, report, opts)
    print(json.dumps(report.to_dict(), indent=1) if a.json else report.render())
    return EXIT_OK if report.clean(strict=a.strict) else EXIT_FAILED


def cmd_convert(a: argparse.Namespace) -> int:
    from wintok_model.checkpoint import convert_checkpoint

    model = convert_checkpoint(a.src, a.out_dir, encoder_config=a.encoder_config,
                               allow_pickle=bool(a.allow_pickle))
    n = sum(p.numel() for p in model.parameters())
    print(f"wrote {a.out_dir} ({n / 1e6:.1f}M parameters); use it with --model {a.out_dir}")
    return EXIT_OK


def cmd_demo(a: argparse.Namespace) -> int:
    from .demo import run_demo

    _quiet_local_ray_auth(None)
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
    dl = sub.add_parser("download", help="download a URL list into webdataset shards with img2dataset "
                                         "(the ingest extra)")
    _download_args(dl)
    dl.set_defaults(func=cmd_download)
    for name, helptext, func in (("status", "summarise an OUTPUT from its manifests", cmd_status),
                                 ("verify", "check every manifest against its files", cmd_verify)):
        s = sub.add_parser(name, help=helptext)
        s.add_argument("output", metavar="OUTPUT", help="the OUTPUT URL a tokenize run wrote")
        s.add_argument("--json", action="store_true", help="print the report as JSON")
        for option in ("s3_endpoint_url", "s3_profile", "s3_anon"):
            add_option(s, option)
        if name == "verify":
            s.add_argument("--strict", action="store_true", help="uncommitted leftovers count as problems")
            s.add_argument("--repair", action="store_true",
                           help="un-commit every damaged shard (remove its manifest and files) so that a plain "
                                "rerun of the tokenize command redoes exactly those")
        s.set_defaults(func=func)
    c = sub.add_parser("convert-checkpoint", help="official WinTok .pth -> model directory (safetensors)")
    c.add_argument("src", help="the official WinTok .pth checkpoint")
    c.add_argument("out_dir", help="model directory to write (config.json + model.safetensors)")
    add_option(c, "encoder_config")
    add_option(c, "allow_pickle")
    c.set_defaults(func=cmd_convert)
    d = sub.add_parser("demo", help="make a small photo corpus and tokenize it on a local Ray (CPU ok)")
    d.add_argument("--dir", default="wintok_demo", help="folder for the demo corpus and output (default wintok_demo)")
    d.add_argument("--workers", type=int, default=None, help="CPU workers (default: one per 4 CPUs)")
    d.set_defaults(func=cmd_demo)
    return p


# user mistakes that end in one line and exit status 2: (module, class). Looked up in sys.modules
# only, so that catching them imports nothing: `status` and `verify` must not pay for torch and Ray.
_USER_ERRORS = (("pipeline.config", "JobConfigError"), ("pipeline.io", "InputError"),
                ("pipeline.status", "OutputError"),
                ("pipeline.lease_file", "LeaseError"), ("pipeline.driver", "RunRefused"),
                ("wintok_model.checkpoint", "CheckpointError"), ("wintok_model.config", "ConfigError"),
                ("braceexpand", "UnbalancedBracesError"))


def _message(e: BaseException) -> str:
    if type(e).__name__ == "UnbalancedBracesError":  # braceexpand's, raised while expanding INPUT
        return (f"{e}: close every '{{' of the input pattern (a range is written {{00000..00099}}) and quote "
                "the pattern so that the shell passes it on as it is")
    return str(e)


def _is_user_error(e: BaseException) -> bool:
    if isinstance(e, FileNotFoundError):
        return True
    types = [getattr(sys.modules[m], n) for m, n in _USER_ERRORS if m in sys.modules]
    return isinstance(e, tuple(types))


def main(argv: list[str] | None = None) -> int:
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
    except KeyboardInterrupt:
        print("wintok: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    except Exception as e:
        if not _is_user_error(e):
            raise
        from .urls import redact_text

        print(f"wintok: error: {redact_text(_message(e))}", file=sys.stderr)
        return EXIT_USAGE


def entry() -> None:
    """The `wintok` command (and `python -m pipeline.cli`): `main`, every atexit handler (Ray's
    included), then the exit without the interpreter's teardown of torch's and Ray's modules,
    which took 0.7-1.3 s of every run (measured: benchmarks/startup.py)."""
    import atexit

    status = [EXIT_FAILED]  # an exception out of main: its traceback is printed, the status is 1

    def _exit_now() -> None:  # registered first, so it runs last
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status[0])

    atexit.register(_exit_now)
    try:
        status[0] = main()
    except SystemExit as e:  # argparse: 2 on a usage error, 0 after --help
        status[0] = e.code if isinstance(e.code, int) else int(e.code is not None)
        raise
    sys.exit(status[0])


if __name__ == "__main__":
    entry()
