"""Semantic ids: codebook fitting (faiss), assignment, the Parquet column, the run fingerprint."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from schemas import TokenLayout, build_rows, column_to_numpy, tokens_schema
from schemas.tensors import tensor_shape
from wintok_model.semantic import (
    CodebookError,
    CodebookInfo,
    SemanticCodebook,
    fit_codebook,
    load_codebook,
)

pytest.importorskip("faiss")


def _planted(n_centres: int, dim: int, per: int, seed: int, spread: float = 10.0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_centres, dim)).astype(np.float32) * spread
    labels = np.repeat(np.arange(n_centres), per)
    return centres, (centres[labels] + rng.normal(size=(len(labels), dim)).astype(np.float32) * 0.1)


def _match(found: np.ndarray, planted: np.ndarray) -> float:
    """Largest distance from a planted centre to its nearest found centroid (each found one used once)."""
    d = np.linalg.norm(planted[:, None] - found[None], axis=-1)
    assert len(set(d.argmin(axis=1))) == len(planted), "two planted clusters share a centroid"
    return float(d.min(axis=1).max())


def test_kmeans_recovers_planted_clusters():
    centres, x = _planted(8, 16, 200, seed=1)
    cb = fit_codebook(x, k=8, seed=0, nredo=5)  # best of 5 random starts: no local minimum
    assert _match(cb.centroids[0].numpy(), centres) < 0.05
    ids = cb.assign(torch.from_numpy(x)).numpy()[:, 0]
    labels = np.repeat(np.arange(8), 200)
    # the same partition as the planted one: each cluster maps to one id, all ids distinct
    assert all(len(set(ids[labels == c])) == 1 for c in range(8)) and len(set(ids)) == 8


def test_product_quantisation_recovers_clusters_of_each_group():
    a, xa = _planted(4, 8, 300, seed=2)
    b, xb = _planted(4, 8, 300, seed=3)
    perm = np.random.default_rng(4).permutation(len(xb))  # groups vary independently
    x = np.concatenate([xa, xb[perm]], axis=1)
    cb = fit_codebook(x, k=4, kind="pq", levels=2, seed=0, nredo=5)
    assert cb.info.width == 8 and tuple(cb.centroids.shape) == (2, 4, 8)
    assert _match(cb.centroids[0].numpy(), a) < 0.05 and _match(cb.centroids[1].numpy(), b) < 0.05


def test_residual_levels_lower_the_error():
    _, x = _planted(64, 8, 40, seed=5, spread=1.0)
    err = []
    for depth in (1, 2, 3):
        cb = fit_codebook(x, k=8, kind="rq" if depth > 1 else "kmeans", levels=depth, seed=0)
        q = cb.ids_to_tokens(cb.assign(torch.from_numpy(x))).numpy()
        err.append(float(np.square(x - q).sum()))
    assert err[0] > err[1] > err[2]


def _numpy_ids(kind: str, cents: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Nearest centroid by brute force in float64, independent of the torch code."""
    x = x.astype(np.float64)
    cents = cents.astype(np.float64)
    out = []
    if kind == "rq":
        r = x.copy()
        for c in cents:
            i = np.square(r[:, None] - c[None]).sum(-1).argmin(1)
            r = r - c[i]
            out.append(i)
    else:
        for part, c in zip(np.split(x, len(cents), axis=1), cents, strict=True):
            out.append(np.square(part[:, None] - c[None]).sum(-1).argmin(1))
    return np.stack(out, axis=1)


@pytest.mark.parametrize("kind,levels", [("kmeans", 1), ("pq", 4), ("rq", 3)])
def test_ids_are_the_nearest_centroid(kind, levels):
    rng = np.random.default_rng(7)
    dim, k = 32, 300
    width = dim // levels if kind == "pq" else dim
    cents = rng.normal(size=(levels, k, width)).astype(np.float32)
    cb = SemanticCodebook(CodebookInfo(kind=kind, k=k, levels=levels, dim=dim), torch.from_numpy(cents))
    x = rng.normal(size=(5, 11, dim)).astype(np.float32)
    ids = cb.assign(torch.from_numpy(x))
    assert ids.shape == (5, 11, levels)
    np.testing.assert_array_equal(ids.numpy().reshape(-1, levels), _numpy_ids(kind, cents, x.reshape(-1, dim)))
    # ids -> vectors: the chosen centroids, concatenated (pq) or summed (rq)
    q = cb.ids_to_tokens(ids).numpy().reshape(-1, dim)
    flat = ids.numpy().reshape(-1, levels)
    parts = [cents[lv][flat[:, lv]] for lv in range(levels)]
    np.testing.assert_allclose(q, np.sum(parts, 0) if kind == "rq" else np.concatenate(parts, 1), rtol=1e-6)


def test_assignment_is_fp32_under_bf16_autocast():
    """Large norms, small gaps: bf16 distances would pick wrong codes; ids must equal the
    float64 nearest of the (bf16) tokens given."""
    rng = np.random.default_rng(11)
    base = rng.normal(size=(1, 64)).astype(np.float32) * 30
    cents = base + rng.normal(size=(200, 64)).astype(np.float32) * 0.3
    cb = SemanticCodebook(CodebookInfo(kind="kmeans", k=200, levels=1, dim=64), torch.from_numpy(cents[None]))
    x = torch.from_numpy(cents[rng.integers(0, 200, 300)] + rng.normal(size=(300, 64)).astype(np.float32) * 0.05)
    xb = x.bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ids = cb.assign(xb[None])[0, :, 0].numpy()
    np.testing.assert_array_equal(ids, _numpy_ids("kmeans", cents[None], xb.float().numpy())[:, 0])


def test_assignment_in_chunks_equals_one_step(monkeypatch):
    import wintok_model.semantic as sem

    rng = np.random.default_rng(8)
    cb = SemanticCodebook(CodebookInfo(kind="kmeans", k=50, levels=1, dim=8),
                          torch.from_numpy(rng.normal(size=(1, 50, 8)).astype(np.float32)))
    x = torch.from_numpy(rng.normal(size=(3, 40, 8)).astype(np.float32))
    whole = cb.assign(x)
    monkeypatch.setattr(sem, "_CHUNK_ELEMENTS", 50 * 7)  # 7 rows per step, a short last one
    assert torch.equal(cb.assign(x), whole)


@pytest.mark.parametrize("k,dtype", [(4096, np.uint16), (65536, np.uint16), (70_000, np.uint32)])
def test_semantic_ids_column_round_trips_through_parquet(tmp_path, k, dtype):
    layout = TokenLayout(pixel_ids=(1, 2, 2), semantic_dim=4, semantic_tokens=(3, 4), semantic_ids=(3, 2),
                         semantic_codes=k)
    schema = tokens_schema(layout)
    names = schema.names
    assert names.index("semantic_ids") == names.index("semantic_tokens") + 1
    assert tensor_shape(schema.field("semantic_ids").type) == ((3, 2), pa.from_numpy_dtype(dtype))
    rng = np.random.default_rng(9)
    n = 5
    ids = rng.integers(0, k, size=(n, 3, 2))
    ids[0, 0, 0] = k - 1
    cols = {"key": [f"k{i}" for i in range(n)], "shard": ["s"] * n, "sample_index": list(range(n)),
            "image_hash": [bytes(16)] * n, "width": [1] * n, "height": [1] * n,
            "pixel_ids": np.zeros((n, 1, 2, 2), np.int32), "semantic_pooled": np.zeros((n, 4), np.float32),
            "semantic_tokens": np.zeros((n, 3, 4), np.float32), "semantic_ids": ids.astype(np.int32),
            "text": [None] * n, "meta": [None] * n}
    pq.write_table(pa.Table.from_batches([build_rows(schema, cols)]), tmp_path / "t.parquet")
    back = column_to_numpy(pq.read_table(tmp_path / "t.parquet"), "semantic_ids")
    assert back.dtype == dtype and back.shape == (n, 3, 2)
    np.testing.assert_array_equal(back, ids)


def test_codebook_file_round_trip_and_bad_files(tmp_path):
    rng = np.random.default_rng(10)
    info = CodebookInfo(kind="pq", k=16, levels=2, dim=8, model_sha256="abc", sample_images=3, seed=4)
    cb = SemanticCodebook(info, torch.from_numpy(rng.normal(size=(2, 16, 4)).astype(np.float32)))
    path = str(tmp_path / "cb.safetensors")
    cb.save(path)
    back = load_codebook(path)
    assert back.info == info and torch.equal(back.centroids, cb.centroids)
    meta = json.loads((tmp_path / "cb.json").read_text())
    meta["k"] = 17
    (tmp_path / "cb.json").write_text(json.dumps(meta))
    with pytest.raises(CodebookError, match="centroids are"):
        load_codebook(path)
    with pytest.raises(CodebookError, match="not found"):
        load_codebook(str(tmp_path / "missing.safetensors"))


# ---------------------------------------------------------------------- with the model
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny model directory and one small input shard."""
    from tests import corpus
    from wintok_model import WinTok, get_preset

    root = tmp_path_factory.mktemp("sem")
    model = str(root / "model")
    WinTok(get_preset("wintok-tiny")).save_pretrained(model)
    shards = corpus.make_shards(str(root / "in"), n_shards=2, per_shard=6, seed=3)
    return model, shards, root


def _batch(n: int = 8) -> np.ndarray:
    from pipeline.preprocess import PreprocessConfig, decode_image
    from tests import corpus

    pre = PreprocessConfig(image_size=64)
    return np.stack([decode_image(data, pre).pixels for _, data, _ in corpus.good_images(n, seed=12)])


def test_bf16_model_with_fp32_assignment_gives_the_fp32_ids(tiny, tmp_path):
    """Codebook = the fp32 tokens of one image (its N positions, far apart). Every token of the
    batch whose two nearest codes differ in distance by more than 4x what the bf16 encoder moves
    any token (well separated: the premise, checked) gets the same id from bf16 as from fp32."""
    from pipeline.shard.encode import ModelSpec, Runner

    model, _, _ = tiny
    images = _batch()
    plain = Runner(ModelSpec(model=model, device="cpu", dtype="fp32", semantic_tokens=True, semantic_codebook="none"))
    tokens = torch.from_numpy(plain.run(images)["semantic_tokens"])  # fp32 in the runner's output
    n, N, D = tokens.shape
    cents = tokens[:1].clone()
    d = torch.cdist(tokens.reshape(-1, D), cents[0]).sort(dim=1).values
    margin = d[:, 1] - d[:, 0]
    path = str(tmp_path / "cb.safetensors")
    SemanticCodebook(CodebookInfo(kind="kmeans", k=N, levels=1, dim=D), cents).save(path)
    got = {}
    for dtype in ("fp32", "bf16"):
        r = Runner(ModelSpec(model=model, device="cpu", dtype=dtype, semantic_tokens=True, semantic_codebook=path))
        out = r.run(images)
        got[dtype] = out["semantic_ids"].reshape(n, N)
        if dtype == "bf16":
            moved = (torch.from_numpy(out["semantic_tokens"]) - tokens).norm(dim=-1).max()
    assert moved > 0 and bool((margin > 4 * moved).all()), "not well separated: the test's premise fails"
    np.testing.assert_array_equal(got["fp32"][0], np.arange(N))
    np.testing.assert_array_equal(got["bf16"], got["fp32"])


def _fitted(model: str, path: str, seed: int) -> str:
    from wintok_model.checkpoint import weights_sha256

    rng = np.random.default_rng(seed)
    cb = fit_codebook(rng.normal(size=(200, 64)).astype(np.float32), k=8, seed=seed,
                      model_sha256=weights_sha256(model))
    cb.save(path)
    return path


def test_resume_with_another_codebook_is_refused(tiny, tmp_path):
    """OUTPUT's _run.json written for codebook A (as a run does before its workers start):
    run_job with codebook B is refused before any worker starts; A's fingerprint is stable."""
    from pipeline.config import JobConfig
    from pipeline.driver import RunRefused, run_job
    from pipeline.io import Storage
    from pipeline.plan import check_run_file, run_fingerprint

    model, shards, _ = tiny
    a = _fitted(model, str(tmp_path / "a.safetensors"), seed=1)
    b = _fitted(model, str(tmp_path / "b.safetensors"), seed=2)
    out = str(tmp_path / "out")
    job = JobConfig(inputs=tuple(shards), output=out, model=model, semantic_codebook=a, progress=False)
    fp = run_fingerprint(job)
    assert fp["semantic_codebook"]["k"] == 8 and fp == run_fingerprint(job)
    check_run_file(Storage(out), fp, job)
    with pytest.raises(RunRefused, match="semantic_codebook"):
        run_job(job.replace(semantic_codebook=b))
    with pytest.raises(RunRefused, match="semantic_codebook"):
        run_job(job.replace(semantic_codebook="none"))  # and without one
    # a run without a codebook keeps the fingerprint it had before codebooks existed
    assert "semantic_codebook" not in run_fingerprint(job.replace(semantic_codebook="none"))


def test_codebook_of_another_model_is_refused(tiny, tmp_path):
    from pipeline.config import JobConfig
    from pipeline.plan import RunRefused, run_fingerprint

    model, shards, _ = tiny
    other = str(tmp_path / "o.safetensors")
    fit_codebook(np.random.default_rng(0).normal(size=(50, 64)).astype(np.float32), k=4,
                 model_sha256="0" * 64).save(other)
    with pytest.raises(RunRefused, match="another model"):
        run_fingerprint(JobConfig(inputs=tuple(shards), output=str(tmp_path / "o"), model=model,
                                  semantic_codebook=other))


def test_fit_from_an_output_equals_fit_from_its_images(tiny, tmp_path):
    """An OUTPUT written by the shard path (ShardProcessor, as tokenize's workers) with its
    _run.json: fitting from its cached tokens and from the images gives the same codebook."""
    from pipeline.config import JobConfig
    from pipeline.io import Storage
    from pipeline.plan import check_run_file, run_fingerprint
    from pipeline.protocol import ShardTask
    from pipeline.semantic import FitConfig, fit_semantic_codebook
    from pipeline.shard.encode import ModelSpec
    from pipeline.shard.processor import ShardProcessor, WorkerConfig
    from pipeline.urls import shard_stems

    model, shards, _ = tiny
    out = str(tmp_path / "out")
    job = JobConfig(inputs=tuple(shards), output=out, model=model, semantic_tokens=True, device="cpu")
    fp = run_fingerprint(job)
    check_run_file(Storage(out), fp, job)
    proc = ShardProcessor(WorkerConfig(output=out, model=ModelSpec(model=model, semantic_tokens=True, device="cpu"),
                                       batch_size=4, decode_threads=1, fingerprint=fp))
    for url, stem in zip(shards, shard_stems(shards), strict=True):
        assert proc.process(ShardTask(url, stem, 1)).ok
    proc.close()
    spec = ModelSpec(model=model, device="cpu")
    reports = []
    for i, inputs in enumerate(((out,), tuple(shards))):
        cfg = FitConfig(inputs=inputs, model=spec, output=str(tmp_path / f"cb{i}.safetensors"), k=6, sample=9,
                        seed=3, holdout=0.0, batch_size=4, decode_threads=1)
        reports.append(fit_semantic_codebook(cfg))
    a, b = (load_codebook(str(tmp_path / f"cb{i}.safetensors")) for i in range(2))
    assert a.info == b.info and a.info.sample_images == 9 and a.info.sample_vectors == 9 * 8
    assert torch.equal(a.centroids, b.centroids)
    fit = reports[0]["fit"]
    assert fit == reports[1]["fit"]
    assert 0 <= fit["relative_mse"] < 1 and -1 <= fit["pooled_cosine_mean"] <= 1
    assert 0 < fit["codes_used_min"] <= 1 and 1 <= fit["perplexity_min"] <= 6
    assert json.loads((tmp_path / "cb0.report.json").read_text())["fit"] == fit


def test_fit_needs_semantic_tokens_in_an_output(tiny, tmp_path):
    from pipeline.config import JobConfig
    from pipeline.io import Storage
    from pipeline.plan import check_run_file, run_fingerprint
    from pipeline.semantic import FitConfig, FitError, fit_semantic_codebook
    from pipeline.shard.encode import ModelSpec

    model, shards, _ = tiny
    out = str(tmp_path / "out")
    job = JobConfig(inputs=tuple(shards), output=out, model=model)
    check_run_file(Storage(out), run_fingerprint(job), job)
    with pytest.raises(FitError, match="--semantic-tokens"):
        fit_semantic_codebook(FitConfig(inputs=(out,), model=ModelSpec(model=model), k=4, sample=4))


# ---------------------------------------------------------------------- a checkpoint's own quantiser
def test_checkpoint_semantic_quantizer_yields_the_column(tmp_path):
    """A model directory with `semantic_quantizer.*` (4 groups of 16 codes): without a fitted
    codebook the runner writes its ids, the cosine argmax of each group (numpy, independently);
    `none` turns them off; the fingerprint says where the ids came from."""
    from pipeline.config import JobConfig
    from pipeline.plan import run_fingerprint
    from pipeline.shard.encode import ModelSpec, Runner
    from wintok_model import WinTok, get_preset, load_model

    cfg = get_preset("wintok-tiny").replace(semantic_vocab_size=64, semantic_num_codebooks=4)
    model_dir = str(tmp_path / "m")
    WinTok(cfg).save_pretrained(model_dir)
    model = load_model(model_dir)
    weights = np.stack([cb.codebook.weight.detach().numpy() for cb in model.semantic_quantizer.codebooks])
    images = _batch(4)
    r = Runner(ModelSpec(model=model_dir, device="cpu", semantic_tokens=True))
    assert r.layout.semantic_ids == (cfg.num_latent_tokens, 4) and r.layout.semantic_codes == 16
    out = r.run(images)
    tokens = out["semantic_tokens"].reshape(-1, 4, cfg.hidden_size // 4).astype(np.float64)
    unit = tokens / np.linalg.norm(tokens, axis=-1, keepdims=True)
    codes = weights / np.linalg.norm(weights, axis=-1, keepdims=True)
    want = np.einsum("mgd,gkd->mgk", unit, codes).argmax(-1)
    np.testing.assert_array_equal(out["semantic_ids"].reshape(-1, 4), want)
    back = model.semantic_ids_to_tokens(torch.from_numpy(out["semantic_ids"]))
    assert back.shape == (4, cfg.num_latent_tokens, cfg.hidden_size)
    off = Runner(ModelSpec(model=model_dir, device="cpu", semantic_codebook="none"))
    assert off.layout.semantic_ids is None and "semantic_ids" not in off.run(images)
    job = JobConfig(inputs=("x.tar",), output=str(tmp_path / "o"), model=model_dir)
    assert run_fingerprint(job)["semantic_codebook"] == {"source": "checkpoint", "kind": "vq", "k": 16, "levels": 4}
    assert "semantic_codebook" not in run_fingerprint(job.replace(semantic_codebook="none"))
    # models without a quantiser keep the config dict (run fingerprint) they had
    assert "semantic_vocab_size" not in get_preset("wintok-tiny").to_dict()


def test_fit_command_user_mistakes_are_one_line(tiny, tmp_path, capsys):
    from pipeline.cli import EXIT_OK, EXIT_USAGE, main

    model, shards, _ = tiny
    cases = [(["--model", "wintok-tiny"], "not a model directory: give -o"),
             ([], "needs --model"),
             (["--model", model, "--k", "1"], "--k must be >= 2"),
             (["--model", model, "--codebooks", "3", "-o", str(tmp_path / "c.safetensors")], "does not divide")]
    for extra, message in cases:
        assert main(["fit-semantic-codebook", shards[0], *extra]) == EXIT_USAGE
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err
    out = str(tmp_path / "ok.safetensors")
    assert main(["fit-semantic-codebook", *shards, "--model", model, "-o", out, "--k", "4", "--codebooks", "2",
                 "--sample", "10", "--device", "cpu", "--json"]) == EXIT_OK
    report = json.loads(capsys.readouterr().out)
    assert report["kind"] == "pq" and report["levels"] == 2 and report["held_out"]["images"] == 1
    assert load_codebook(out).info.sample_images == 9


def test_report_numbers_against_numpy_and_chunking():
    from wintok_model.semantic import evaluate

    rng = np.random.default_rng(13)
    cents = rng.normal(size=(1, 5, 6)).astype(np.float32)
    cb = SemanticCodebook(CodebookInfo(kind="kmeans", k=5, levels=1, dim=6), torch.from_numpy(cents))
    x = rng.normal(size=(7, 3, 6)).astype(np.float32) + 2
    pooled = rng.normal(size=(7, 6)).astype(np.float32)
    ids = _numpy_ids("kmeans", cents, x.reshape(-1, 6))[:, 0]
    q = cents[0][ids].reshape(7, 3, 6).astype(np.float64)
    err = np.square(x - q).sum()
    qm = q.mean(1)
    cos = (qm * pooled).sum(1) / np.linalg.norm(qm, axis=1) / np.linalg.norm(pooled, axis=1)
    p = np.bincount(ids, minlength=5) / len(ids)
    for chunk in (1024, 3):
        r = evaluate(cb, x, pooled, chunk=chunk)
        assert r["relative_mse"] == pytest.approx(err / np.square(x).sum(), rel=1e-5)
        assert r["unexplained_variance"] == pytest.approx(err / np.square(x - x.reshape(-1, 6).mean(0)).sum(), rel=1e-5)
        assert r["pooled_cosine_mean"] == pytest.approx(cos.mean(), rel=1e-5)
        assert r["codes_used_min"] == pytest.approx((p > 0).mean())
        assert r["perplexity_min"] == pytest.approx(np.exp(-(p[p > 0] * np.log(p[p > 0])).sum()), rel=1e-6)
