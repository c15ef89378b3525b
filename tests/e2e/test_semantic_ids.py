"""Semantic ids end to end on a local Ray: the column a run writes with a codebook, the resume
that another codebook must not make, and a fit from the run's cached tokens."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.driver import RunRefused, run_job
from pipeline.verify import verify
from schemas import column_to_numpy
from tests import corpus
from tests.e2e.helpers import read_output, small_job
from wintok_model.semantic import CodebookInfo, SemanticCodebook

pytestmark = pytest.mark.e2e


def test_tokenize_writes_semantic_ids_and_refuses_another_codebook(tmp_path, ray_session, tiny_model_dir):
    from pipeline.semantic import FitConfig, fit_semantic_codebook
    from pipeline.shard.encode import ModelSpec, Runner

    shards = corpus.make_shards(tmp_path / "in", n_shards=2, per_shard=4, seed=5)
    # a codebook that separates well: the N tokens of one image (the fp16 tokens stored
    # next to the ids are then nearest to the same codes as the fp32 ones assigned)
    runner = Runner(ModelSpec(model=tiny_model_dir, device="cpu", semantic_tokens=True, semantic_codebook="none"))
    image = np.zeros((1, 64, 64, 3), np.uint8) + 90
    cents = torch.from_numpy(runner.run(image)["semantic_tokens"])
    n_tok, dim = cents.shape[1:]
    path = str(tmp_path / "cb.safetensors")
    SemanticCodebook(CodebookInfo(kind="kmeans", k=n_tok, levels=1, dim=dim), cents).save(path)
    out = tmp_path / "out"
    job = small_job(shards, out, tiny_model_dir, semantic_codebook=path, semantic_tokens=True)
    assert run_job(job).ok
    assert verify(str(out)).clean(strict=True)
    rows = read_output(str(out))["rows"]
    for table in rows.values():
        ids = column_to_numpy(table, "semantic_ids")
        tokens = column_to_numpy(table, "semantic_tokens").astype(np.float64)
        assert ids.dtype == np.uint16 and ids.shape == (table.num_rows, n_tok, 1)
        nearest = np.square(tokens[:, :, None] - cents.numpy()[0][None, None]).sum(-1).argmin(-1)
        np.testing.assert_array_equal(ids[..., 0], nearest)
    # another codebook (here: the fit from this OUTPUT's cached tokens) is refused on resume
    fitted = str(tmp_path / "fit.safetensors")
    report = fit_semantic_codebook(FitConfig(inputs=(str(out),), model=ModelSpec(model=tiny_model_dir, device="cpu"),
                                             output=fitted, k=4, sample=8, holdout=0.0))
    assert report["sample_images"] == 8
    with pytest.raises(RunRefused, match="semantic_codebook"):
        run_job(job.replace(semantic_codebook=fitted))
    assert run_job(job).skipped == 2  # the same codebook: resumes (nothing left to do)
