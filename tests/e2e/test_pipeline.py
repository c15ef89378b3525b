"""The tokenize pipeline end to end on a local Ray: local disk, broken input, resume, determinism."""

from __future__ import annotations

import hashlib
import os
import shutil

import numpy as np
import pytest
import torch

from pipeline.config import JobConfig
from pipeline.driver import RunRefused, run_job
from pipeline.preprocess import PreprocessConfig, decode_image
from pipeline.shard.encode import to_model_input
from tests import corpus
from tests.e2e.helpers import file_states, ids_by_key, read_output
from wintok_model import WinTok

pytestmark = pytest.mark.e2e

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "gif")


def _job(inputs, output, model, **kw) -> JobConfig:
    base = dict(inputs=tuple(inputs), output=str(output), model=model, batch_size=4, decode_threads=2,
                max_retries=1, retry_backoff=0.05, progress=False, workers=1)
    base.update(kw)
    return JobConfig(**base)


def _expected(plan: list[list[dict]]) -> dict[str, dict]:
    return {s["key"]: s for shard in plan for s in shard}


@pytest.fixture(scope="module")
def broken_run(tmp_path_factory, ray_session, tiny_model_dir):
    root = tmp_path_factory.mktemp("broken")
    paths = corpus.make_shards(root / "in", n_shards=3, per_shard=6, seed=7, broken=True)
    (root / "in" / "00003.tar").write_bytes(corpus.truncated_tar_bytes())
    (root / "in" / "00004.tar").write_bytes(corpus.not_a_tar_bytes())
    cfg = _job([f"{root}/in/{{00000..00004}}.tar"], root / "out", tiny_model_dir)
    summary = run_job(cfg)
    return root, paths, cfg, summary


def test_every_sample_is_a_row_or_an_error(broken_run):
    root, paths, cfg, summary = broken_run
    plan = corpus.shard_plan(3, 6, seed=7, broken=True)
    expected = _expected(plan)
    out = read_output(str(root / "out"))
    assert summary.done == 3 and summary.failed == 2 and not summary.ok
    assert set(out["manifests"]) == {"00000", "00001", "00002"}
    rows = {k for t in out["rows"].values() for k in t.column("key").to_pylist()}
    errors = {}
    for t in out["errors"].values():
        for k, r in zip(t.column("key").to_pylist(), t.column("reason").to_pylist(), strict=True):
            errors[k] = r
    assert rows.isdisjoint(errors)
    assert rows | set(errors) == set(expected), "a sample was lost"
    for key, s in expected.items():
        if s["expect"] == "ok":
            assert key in rows, f"{key} should be a row"
        else:
            assert errors.get(key) == s["expect"].split(":", 1)[1], f"{key}: {errors.get(key)} vs {s['expect']}"
    for stem, m in out["manifests"].items():
        assert m["rows"] + m["errors"] == m["samples"] == len(plan[int(stem)])
        assert m["rows"] == out["rows"][stem].num_rows
    assert summary.images == len(rows) and summary.errors == len(errors)


def test_sizes_text_and_sample_index(broken_run):
    root, _, _, _ = broken_run
    expected = _expected(corpus.shard_plan(3, 6, seed=7, broken=True))
    out = read_output(str(root / "out"))
    for stem, t in out["rows"].items():
        d = t.to_pydict()
        assert d["sample_index"] == sorted(d["sample_index"])
        for key, w, h, text in zip(d["key"], d["width"], d["height"], d["text"], strict=True):
            s = expected[key]
            if "size" in s:
                assert (w, h) == tuple(s["size"]), key
            if key == "broken_latin1_caption":
                assert text is not None and text.startswith("caf")
        assert set(d["shard"]) == {f"{root}/in/{stem}.tar"}
        for key, digest in zip(d["key"], d["image_hash"], strict=True):
            member = next(v for k, v in expected[key]["members"].items() if k not in ("txt", "json"))
            assert digest == hashlib.blake2b(member, digest_size=16).digest(), key


def test_broken_shards_fail_with_reason_and_nothing_visible(broken_run):
    root, _, _, summary = broken_run
    assert set(summary.failures) == {"00003", "00004"}
    for stem in ("00003", "00004"):
        assert summary.failures[stem].startswith("shard_read")
        assert not (root / "out" / "shards" / f"{stem}.parquet").exists()
        assert (root / "out" / "_failed" / f"{stem}.json").exists()
    leftovers = [p for p in file_states(str(root / "out")) if ".tmp" in p]
    assert leftovers == []


def test_read_back_equals_direct_model_call(broken_run, tiny_model_dir):
    root, _, _, _ = broken_run
    expected = _expected(corpus.shard_plan(3, 6, seed=7, broken=True))
    model = WinTok.from_checkpoint(tiny_model_dir)
    stored = ids_by_key(read_output(str(root / "out"))["rows"])
    pre = PreprocessConfig(image_size=model.config.image_size)
    for key, ids in stored.items():
        members = expected[key]["members"]
        data = next(members[e] for e in IMAGE_EXTS if e in members)
        pixels = torch.from_numpy(decode_image(data, pre).pixels[None])
        with torch.inference_mode():
            direct = model.img_to_idx(to_model_input(pixels))
        np.testing.assert_array_equal(ids.reshape(direct.shape[1:]), direct[0].numpy(), err_msg=key)


def test_retry_failed_takes_up_only_failed(broken_run, tiny_model_dir):
    root, _, cfg, _ = broken_run
    good = corpus.tar_bytes(corpus.good_samples(3, seed=99, prefix="fixed_"))
    (root / "in" / "00003.tar").write_bytes(good)
    before = file_states(str(root / "out" / "shards"))
    summary = run_job(cfg.replace(retry_failed=True))
    assert summary.done == 1 and summary.failed == 1 and summary.skipped == 3
    assert not (root / "out" / "_failed" / "00003.json").exists()
    after = file_states(str(root / "out" / "shards"))
    assert {p: s for p, s in after.items() if p in before} == before  # committed shards untouched


def test_rerun_with_nothing_to_do_rewrites_nothing(tmp_path, ray_session, tiny_model_dir):
    corpus.make_shards(tmp_path / "in", n_shards=2, per_shard=3, seed=3)
    cfg = _job([f"{tmp_path}/in/*.tar"], tmp_path / "out", tiny_model_dir)
    first = run_job(cfg)
    assert first.ok and first.done == 2
    states = file_states(str(tmp_path / "out"))
    again = run_job(cfg)
    assert again.ok and again.done == 0 and again.skipped == 2 and again.workers == 0
    assert file_states(str(tmp_path / "out")) == states


def test_different_fingerprint_is_refused_unless_overwrite(tmp_path, ray_session, tiny_model_dir):
    corpus.make_shards(tmp_path / "in", n_shards=1, per_shard=3, seed=4)
    cfg = _job([f"{tmp_path}/in/00000.tar"], tmp_path / "out", tiny_model_dir)
    assert run_job(cfg).ok
    with pytest.raises(RunRefused, match="different run"):
        run_job(cfg.replace(resize="squash"))
    redo = run_job(cfg.replace(resize="squash", overwrite=True))
    assert redo.ok and redo.done == 1


def test_ids_do_not_depend_on_batch_size_workers_or_order(tmp_path, ray_session, tiny_model_dir):
    corpus.make_shards(tmp_path / "in", n_shards=3, per_shard=5, seed=11)
    a = _job([f"{tmp_path}/in/{{00000..00002}}.tar"], tmp_path / "a", tiny_model_dir, batch_size=2, workers=1)
    b = _job([f"{tmp_path}/in/0000{i}.tar" for i in (2, 0, 1)], tmp_path / "b", tiny_model_dir,
             batch_size=7, workers=2, decode_threads=1)
    assert run_job(a).ok and run_job(b).ok
    ids_a = ids_by_key(read_output(str(tmp_path / "a"))["rows"])
    ids_b = ids_by_key(read_output(str(tmp_path / "b"))["rows"])
    assert ids_a.keys() == ids_b.keys() and len(ids_a) == 15
    for k in ids_a:
        np.testing.assert_array_equal(ids_a[k], ids_b[k])


def test_stale_partial_data_without_manifest_is_redone(tmp_path, ray_session, tiny_model_dir):
    """A crash between the data upload and the manifest: the rerun rewrites and commits once."""
    corpus.make_shards(tmp_path / "in", n_shards=2, per_shard=3, seed=5)
    cfg = _job([f"{tmp_path}/in/*.tar"], tmp_path / "out", tiny_model_dir)
    assert run_job(cfg).ok
    os.remove(tmp_path / "out" / "_manifest" / "00001.json")
    (tmp_path / "out" / "shards" / "00001.parquet").write_bytes(b"garbage from a dead attempt")
    summary = run_job(cfg)
    assert summary.done == 1 and summary.skipped == 1
    out = read_output(str(tmp_path / "out"))
    assert out["rows"]["00001"].num_rows == 3
    shutil.rmtree(tmp_path / "out")


def test_cli_job_file_then_status(tmp_path, ray_session, tiny_model_dir, capsys):
    import json

    from pipeline.cli import main as cli_main

    corpus.make_shards(tmp_path / "in", n_shards=2, per_shard=3, seed=12, broken=False)
    (tmp_path / "bad.tar").write_bytes(corpus.not_a_tar_bytes())
    job = tmp_path / "job.yaml"
    job.write_text(f"inputs:\n  - {tmp_path}/in/{{00000..00001}}.tar\n  - {tmp_path}/bad.tar\n"
                   f"output: {tmp_path}/out\nmodel: {tiny_model_dir}\nbatch_size: 2\nmax_retries: 0\n"
                   "workers: 1\nprogress: false\n")
    rc = cli_main(["tokenize", "--job", str(job), "--json"])
    summary = json.loads(capsys.readouterr().out)
    assert rc == 1 and summary["shards_done"] == 2 and summary["shards_failed"] == 1
    assert summary["images"] == 6 and list(summary["failed_shards"]) == ["bad"]
    assert cli_main(["status", str(tmp_path / "out"), "--json"]) == 1
    st = json.loads(capsys.readouterr().out)
    assert st["shards_committed"] == 2 and st["images"] == 6 and list(st["failed"]) == ["bad"]
    run = json.loads((tmp_path / "out" / "_run.json").read_text())
    assert run["job"]["batch_size"] == 2 and run["fingerprint"]["model"]["name"] == "wintok-tiny"
