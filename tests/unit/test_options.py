"""One declaration per option: JobConfig's fields carry default, help, choices and CLI spelling,
and the `tokenize`/`embed` flags, the job-file keys, the choice checks and jobs/REFERENCE.md all
come from them. These tests fail when a field is added without reaching the CLI or the reference,
or when a flag and its field drift apart."""

from __future__ import annotations

import argparse
import os

import pytest
import yaml

from pipeline import config
from pipeline.cli import _job_from_args, build_parser, model_required
from pipeline.config import FIELD_NAMES, FIELDS, JobConfig, JobConfigError, flag_of, resolve

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# Fields with no flag, on purpose: given positionally (INPUT...) or tuning knobs for job files only.
POSITIONAL = {"inputs"}
JOB_ONLY = {"prefetch", "row_group_rows", "gpus_per_worker", "retry_backoff_max", "stop_grace", "lease_ttl"}
TOKENIZER_ONLY = {"model", "encoder_config", "allow_pickle", "dtype", "semantic_tokens", "semantic_codebook"}
# Flags of tokenize that are not JobConfig fields.
NOT_FIELDS = {"help", "paths", "job", "json", "no_tokenizer"}


def _actions(cmd: str) -> dict[str, argparse.Action]:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[cmd]
    return {a.dest: a for a in sub._actions}


def test_every_field_has_a_flag_with_help_unless_marked():
    tok, emb = _actions("tokenize"), _actions("embed")
    assert {n for n in FIELD_NAMES if flag_of(n) is None} == POSITIONAL | JOB_ONLY
    assert set(tok) - FIELD_NAMES == NOT_FIELDS
    assert set(tok) & FIELD_NAMES == FIELD_NAMES - POSITIONAL - JOB_ONLY
    assert set(emb) == set(tok) - TOKENIZER_ONLY - {"no_tokenizer"}
    for name in FIELD_NAMES - POSITIONAL - JOB_ONLY:
        action, meta = tok[name], FIELDS[name].metadata
        assert action.option_strings == [flag_of(name)], name
        assert action.help and meta["help"] in action.help or action.help == f"no {meta['help']}", name
        assert action.default is None, f"{name}: a flag not given must not override the job file"
        assert tuple(action.choices or ()) == (meta["choices"] or ()), name
    for name in FIELD_NAMES:
        assert FIELDS[name].metadata["help"], f"{name} has no help"


def _value(name: str) -> tuple[list[str], object]:
    """Command-line words that set field `name` to something other than its default, and that value."""
    f, kind = FIELDS[name], config.value_type(name)
    if kind is bool:
        return [flag_of(name)], not f.default
    if f.metadata["choices"]:
        v = next(c for c in reversed(f.metadata["choices"]) if c != f.default)
        return [flag_of(name), v], v
    v = {int: 7, float: 2.5, str: f"v-{name}"}[kind]
    return [flag_of(name), str(v)], v


@pytest.mark.parametrize("name", sorted(FIELD_NAMES - POSITIONAL - JOB_ONLY))
def test_each_flag_sets_its_field_over_the_job_file(tmp_path, name):
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump({"inputs": ["j.tar"], "output": "j-out", "model": "j-model"}))
    words, value = _value(name)
    a = build_parser().parse_args(["tokenize", "--job", str(job), *words])
    cfg = _job_from_args(a, teacher_only=False)
    assert getattr(cfg, name) == value
    untouched = resolve(str(job), {})
    for other in FIELD_NAMES - {name}:
        assert getattr(cfg, other) == getattr(untouched, other), f"{' '.join(words)} changed {other}"


def test_job_file_keys_are_the_field_names(tmp_path):
    job = tmp_path / "all.yaml"
    values = {n: (["x.tar"] if n == "inputs" else _value(n)[1] if n not in JOB_ONLY else FIELDS[n].default)
              for n in FIELD_NAMES}
    job.write_text(yaml.safe_dump({k.replace("_", "-") if i % 2 else k: v for i, (k, v) in enumerate(values.items())}))
    cfg = resolve(str(job), {})
    for name, value in values.items():
        assert getattr(cfg, name) == (tuple(value) if name == "inputs" else value), name
    (tmp_path / "bad.yaml").write_text("inputs: [a.tar]\nmodel: m\nno_progress: true\n")
    with pytest.raises(JobConfigError, match="unknown keys in .*: no_progress"):
        config.load_job_file(str(tmp_path / "bad.yaml"))  # the flag's spelling is not a key: the field's is


@pytest.mark.parametrize("name", sorted(n for n in FIELD_NAMES if FIELDS[n].metadata["choices"]))
def test_choices_are_checked_from_the_same_declaration(name):
    choices = FIELDS[name].metadata["choices"]
    for ok in choices:
        assert getattr(JobConfig(model="m", **{name: ok}), name) == ok
    with pytest.raises(JobConfigError, match=f"^{name} must be .*, not 'bogus'$") as e:
        JobConfig(model="m", **{name: "bogus"})
    assert all(c in str(e.value) for c in choices)


def test_defaults_shown_in_help_are_the_field_defaults():
    tok = _actions("tokenize")
    assert tok["max_image_pixels"].help.endswith(f"(default {config.MAX_IMAGE_PIXELS})")
    assert tok["shard_timeout"].help.endswith("(default 600)") and tok["resize"].help.endswith("(default center-crop)")
    assert config.help_of("progress").endswith("(default true)") and tok["progress"].help.startswith("no progress")


def test_other_modules_take_the_shared_defaults_from_config():
    from pipeline.preprocess import PreprocessConfig
    from pipeline.shard.encode import ModelSpec
    from pipeline.shard.processor import WorkerConfig
    from wintok_model.config import PRESETS

    job, pre, worker = JobConfig(model="m"), PreprocessConfig(), WorkerConfig(output="o")
    assert (job.resize, job.max_image_pixels) == (pre.resize, pre.max_image_pixels) == \
        (worker.resize, worker.max_image_pixels) == (config.RESIZE_MODES[0], config.MAX_IMAGE_PIXELS)
    assert ModelSpec().model == config.TINY_PRESET and config.TINY_PRESET in PRESETS
    assert all(preset in model_required() for preset in PRESETS)


def test_s3_flags_of_status_and_verify_are_the_job_fields():
    tok = _actions("tokenize")
    for cmd in ("status", "verify"):
        acts = _actions(cmd)
        for name in ("s3_endpoint_url", "s3_profile", "s3_anon"):
            assert (acts[name].option_strings, acts[name].help) == (tok[name].option_strings, tok[name].help)


def test_secret_fields_are_masked_everywhere():
    secret = {n for n in FIELD_NAMES if FIELDS[n].metadata["secret"]}
    assert secret == {"s3_key", "s3_secret"}
    cfg = JobConfig(model="m", s3_key="K3YID", s3_secret="S3CR3T")
    assert "K3YID" not in repr(cfg) and "S3CR3T" not in repr(cfg)
    assert {n: cfg.public_dict()[n] for n in secret} == {"s3_key": "***", "s3_secret": "***"}


def test_job_reference_is_generated_and_current():
    with open(os.path.join(REPO, "jobs", "REFERENCE.md"), encoding="utf-8") as f:
        assert f.read() == config.job_reference(), "regenerate: python -m pipeline.config > jobs/REFERENCE.md"
    for name in FIELD_NAMES:
        assert f"| `{name}` |" in config.job_reference()


def test_example_job_resolves():
    cfg = resolve(os.path.join(REPO, "jobs", "example.yaml"), {})
    assert cfg.batch_size == 256 and cfg.decode_threads == 12 and cfg.inputs
