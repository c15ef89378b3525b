"""`wintok` command line: tokenize, embed, download, submit, status, verify, inspect, reconstruct,
train, convert-checkpoint, fit-semantic-codebook, demo."""

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
    from wintok_model.checkpoint import shipped_models
    from wintok_model.config import PRESETS

    shipped = shipped_models()
    return ("tokenize needs --model: a model directory, an official .pth, "
            + (f"a shipped trained model ({', '.join(shipped)}), " if shipped else "")
            + f"or a preset name ({', '.join(p for p in PRESETS if p not in shipped)}: RANDOM weights); teacher embeddings only: `wintok embed` or --no-tokenizer")


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
    from wintok_model.checkpoint import is_random_preset

    if not is_random_preset(model):
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


def cmd_inspect(a: argparse.Namespace) -> int:
    from .inspection import inspect_output, render_json, usage_png
    from .io import s3_options

    report = inspect_output(a.output, s3_options(a.s3_endpoint_url, a.s3_profile, bool(a.s3_anon)),
                            max_shards=a.max_shards)
    if a.png:
        usage_png(report, a.png)
    print(render_json(report) if a.json else report.render() + (f"\nwrote {a.png}" if a.png else ""))
    return EXIT_OK


def cmd_reconstruct(a: argparse.Namespace) -> int:
    from .io import s3_options
    from .reconstruct import grid_png, reconstruct

    result = reconstruct(a.output, a.model, n=a.n, opts=s3_options(a.s3_endpoint_url, a.s3_profile, bool(a.s3_anon)),
                         allow_pickle=bool(a.allow_pickle), encoder_config=a.encoder_config)
    grid_png(result, a.out)
    for key, p in zip(result.keys, result.psnr, strict=True):
        print(f"{key}: " + (f"PSNR {p:.2f} dB" if p is not None else "original not reachable"))
    for url, why in result.unreachable.items():
        print(f"source {url} not readable: {why}")
    mean = result.mean_psnr
    print(f"mean PSNR {mean:.2f} dB over {sum(p is not None for p in result.psnr)} images; " if mean is not None
          else "no originals reachable; ", end="")
    print(f"wrote {a.out}")
    return EXIT_OK


def cmd_train(a: argparse.Namespace) -> int:
    from .train import TrainConfig, train

    cfg = TrainConfig.from_yaml(a.config, output=a.output, steps=a.steps)
    result = train(cfg)
    print(json.dumps(result, indent=1, default=str) if a.json else
          f"trained {result['steps']} steps in {result['seconds']:.0f} s; last loss {result['last'].get('loss', 0):.4f}; "
          f"model: {result['final']}" + (f"; loss plot: {result['plot']}" if result["plot"] else "")
          + (f"; {result['missing_from_cache']} samples had no cached embedding" if result["missing_from_cache"]
             else ""))
    return EXIT_OK


def cmd_convert(a: argparse.Namespace) -> int:
    from wintok_model.checkpoint import convert_checkpoint

    model = convert_checkpoint(a.src, a.out_dir, encoder_config=a.encoder_config,
                               allow_pickle=bool(a.allow_pickle))
    n = sum(p.numel() for p in model.parameters())
    print(f"wrote {a.out_dir} ({n / 1e6:.1f}M parameters); use it with --model {a.out_dir}")
    return EXIT_OK


def cmd_fit_semantic(a: argparse.Namespace) -> int:
    from .config import JobConfigError
    from .io import s3_options
    from .semantic import FitConfig, fit_semantic_codebook
    from .shard.encode import ModelSpec

    if a.model is None:
        raise JobConfigError("fit-semantic-codebook needs --model: the model tokenize will run (a model "
                             "directory, an official .pth, or a preset)")
    spec = ModelSpec(model=a.model, encoder_config=a.encoder_config, allow_pickle=bool(a.allow_pickle),
                     dtype=a.dtype or "auto", device=a.device or "auto")
    cfg = FitConfig(inputs=tuple(a.inputs), model=spec, output=a.o, k=a.k, groups=a.codebooks, depth=a.depth,
                    sample=a.sample, seed=a.seed, holdout=a.holdout, batch_size=a.batch_size or 64,
                    storage=s3_options(a.s3_endpoint_url, a.s3_profile, bool(a.s3_anon)))
    report = fit_semantic_codebook(cfg)
    if a.json:
        print(json.dumps(report, indent=1))
    else:
        part = report.get("held_out", report["fit"])
        print(f"wrote {report['codebook']} ({report['kind']}, k={report['k']} x {report['levels']}) from "
              f"{report['sample_images']} images in {report['seconds']['total']:.1f} s; "
              f"{'held-out' if 'held_out' in report else 'fit'}: relative MSE {part['relative_mse']:.4f}, "
              f"pooled cosine {part.get('pooled_cosine_mean', float('nan')):.4f}, "
              f"codes used {part['codes_used_min']:.1%}, perplexity {part['perplexity_min']:.0f}")
    return EXIT_OK


def cmd_demo(a: argparse.Namespace) -> int:
    from .demo import run_demo

    _quiet_local_ray_auth(None)
    return run_demo(a.dir, workers=a.workers)


def cmd_submit(a: argparse.Namespace) -> int:
    from jobs import submit as jobs  # the Ray Jobs client lives with the job files (jobs/submit.py)

    from .config import JobConfigError, resolve

    one = [x for x in ("status", "logs", "stop") if getattr(a, x)]
    if one:
        job_id = getattr(a, one[0])
        if one[0] == "status":
            d = jobs.info(a.address, job_id)
            print(json.dumps(d, indent=1) if a.json else
                  f"{d['job_id']}: {d['status']}" + (f" ({d['message']})" if d["message"] else ""))
            return EXIT_FAILED if d["status"] in ("FAILED", "STOPPED") else EXIT_OK
        if one[0] == "logs":
            jobs.logs(a.address, job_id, follow=a.follow)
            return EXIT_OK
        print(f"{job_id}: stop requested" if jobs.stop(a.address, job_id) else f"{job_id}: had already ended")
        return EXIT_OK
    if not a.job_file:
        raise JobConfigError("submit needs JOB.yaml (or --status / --logs / --stop ID)")
    overrides = {k: v for k, v in vars(a).items() if k in FIELD_NAMES and k != "address"}
    cfg = resolve(a.job_file, overrides)
    for path in jobs.local_paths(cfg):
        print(f"wintok: note: {path} is a local path: it must be the same folder on every node "
              "(a shared filesystem); use s3:// URLs otherwise", file=sys.stderr)
    s = jobs.submit(cfg, a.address, python=a.python, resubmit=a.resubmit)
    if s.existed:
        again = ("; `--resubmit` runs it again (committed shards are skipped)"
                 if s.status in ("FAILED", "STOPPED") else "")
        print(f"job {s.job_id} was submitted before (status {s.status}): not submitted again{again}")
    else:
        print(f"submitted job {s.job_id} to {s.address} (status {s.status})")
    print("follow it:\n" + "\n".join(f"  {c}" for c in jobs.follow_commands(s.job_id, s.address)))
    return EXIT_OK


def _submit_args(s: argparse.ArgumentParser) -> None:
    s.add_argument("job_file", nargs="?", metavar="JOB.yaml", help="the job file (as for tokenize --job)")
    s.add_argument("--address", help="the head's Ray Jobs address, http://HEAD:8265 (default: "
                                     "RAY_API_SERVER_ADDRESS, else RAY_ADDRESS)")
    which = s.add_mutually_exclusive_group()
    which.add_argument("--status", metavar="ID", help="show the status of a submitted job")
    which.add_argument("--logs", metavar="ID", help="print the log of a submitted job")
    which.add_argument("--stop", metavar="ID", help="stop a submitted job")
    s.add_argument("--follow", action="store_true", help="with --logs: follow the log until the job ends")
    s.add_argument("--resubmit", action="store_true",
                   help="submit again a job that ended FAILED or STOPPED (committed shards are skipped)")
    s.add_argument("--python", default="python", help="the head node's python command (default python)")
    s.add_argument("--json", action="store_true", help="with --status: print it as JSON")
    for name in FIELDS:
        if flag_of(name) is not None and name != "address":
            add_option(s, name)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="wintok", description="WinTok offline tokenization pipeline")
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("tokenize", help="tokenize webdataset shards into Parquet (pixel ids, semantic, teacher)")
    _job_args(t)
    t.set_defaults(func=cmd_tokenize)
    e = sub.add_parser("embed", help="teacher embeddings only, same output contract")
    _job_args(e, teacher_only=True)
    e.set_defaults(func=lambda a: cmd_tokenize(a, teacher_only=True))
    u = sub.add_parser("submit", help="run a job on a Ray cluster through Ray Jobs (same job as tokenize --job)")
    _submit_args(u)
    u.set_defaults(func=cmd_submit)
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
    i = sub.add_parser("inspect", help="rows, errors, schema, code usage and duplicate images of an OUTPUT")
    i.add_argument("output", metavar="OUTPUT", help="the OUTPUT URL a tokenize run wrote")
    i.add_argument("--png", help="also write a code-usage plot (rank-frequency per codebook) to this PNG")
    i.add_argument("--max-shards", type=int, default=None,
                   help="read only the first N committed shards for usage and duplicates (default: all)")
    i.add_argument("--json", action="store_true", help="print the report as JSON")
    r = sub.add_parser("reconstruct", help="decode pixel ids of an OUTPUT back to images: a grid with PSNR")
    r.add_argument("output", metavar="OUTPUT", help="the OUTPUT URL a tokenize run wrote")
    r.add_argument("--model", required=True, help="the model the OUTPUT was tokenized with")
    r.add_argument("--n", type=int, default=16, help="how many images (the first rows in stem order; default 16)")
    r.add_argument("-o", "--out", default="reconstruction.png", help="PNG to write (default reconstruction.png)")
    for sp in (i, r):
        for option in ("s3_endpoint_url", "s3_profile", "s3_anon"):
            add_option(sp, option)
    add_option(r, "encoder_config")
    add_option(r, "allow_pickle")
    i.set_defaults(func=cmd_inspect)
    r.set_defaults(func=cmd_reconstruct)
    tr = sub.add_parser("train", help="train or fine-tune WinTok from shards + cached (or online) teacher embeddings")
    tr.add_argument("config", metavar="CONFIG.yaml", help="training options (pipeline/train.py TrainConfig)")
    tr.add_argument("--output", help="override the config's output folder")
    tr.add_argument("--steps", type=int, help="override the config's number of steps")
    tr.add_argument("--json", action="store_true", help="print the result as JSON")
    tr.set_defaults(func=cmd_train)
    c = sub.add_parser("convert-checkpoint", help="official WinTok .pth -> model directory (safetensors)")
    c.add_argument("src", help="the official WinTok .pth checkpoint")
    c.add_argument("out_dir", help="model directory to write (config.json + model.safetensors)")
    add_option(c, "encoder_config")
    add_option(c, "allow_pickle")
    c.set_defaults(func=cmd_convert)
    f = sub.add_parser("fit-semantic-codebook", help="fit discrete semantic ids (k-means / PQ / RQ codebook) "
                                                     "on a corpus sample, for tokenize's semantic_ids")
    f.add_argument("inputs", nargs="+", metavar="INPUT",
                   help="input shards (as tokenize takes them), or one OUTPUT of `tokenize --semantic-tokens`")
    f.add_argument("-o", metavar="CODEBOOK", default=None,
                   help="codebook file to write (.safetensors; its .json and .report.json beside it); default: "
                        "semantic_codebook.safetensors in the model directory, which tokenize then uses")
    f.add_argument("--k", type=int, default=4096, help="codes per codebook (default 4096)")
    g = f.add_mutually_exclusive_group()
    g.add_argument("--codebooks", type=int, default=1, metavar="G",
                   help="product quantisation: split the token into G groups, k codes each (default 1)")
    g.add_argument("--depth", type=int, default=1, metavar="R",
                   help="residual quantisation: R levels of k codes (default 1)")
    f.add_argument("--sample", type=int, default=10_000, help="images to sample (default 10000)")
    f.add_argument("--seed", type=int, default=0, help="seed of the sample and of k-means (default 0)")
    f.add_argument("--holdout", type=float, default=0.1,
                   help="share of the sampled images kept out of the fit and reported apart (default 0.1)")
    f.add_argument("--json", action="store_true", help="print the report as JSON")
    for option in ("model", "encoder_config", "allow_pickle", "dtype", "device", "batch_size",
                   "s3_endpoint_url", "s3_profile", "s3_anon"):
        add_option(f, option)
    f.set_defaults(func=cmd_fit_semantic)
    d = sub.add_parser("demo", help="make a small photo corpus and tokenize it on a local Ray (CPU ok)")
    d.add_argument("--dir", default="wintok_demo", help="folder for the demo corpus and output (default wintok_demo)")
    d.add_argument("--workers", type=int, default=None, help="CPU workers (default: one per 4 CPUs)")
    d.set_defaults(func=cmd_demo)
    return p


# user mistakes that end in one line and exit status 2: (module, class). Looked up in sys.modules
# only, so that catching them imports nothing: `status` and `verify` must not pay for torch and Ray.
_USER_ERRORS = (("pipeline.config", "JobConfigError"), ("pipeline.train", "TrainConfigError"),
                ("pipeline.io", "InputError"), ("pipeline.output", "OutputError"), ("jobs.submit", "SubmitError"),
                ("pipeline.lease_file", "LeaseError"), ("pipeline.driver", "RunRefused"),
                ("wintok_model.checkpoint", "CheckpointError"), ("pipeline.plan", "RunRefused"),
                ("wintok_model.config", "ConfigError"),
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
