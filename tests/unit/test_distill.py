"""DistillDataset: input images (webdataset) joined with the OUTPUT's cached teacher embeddings."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
import transformers as tf
from torch.utils.data import DataLoader

from pipeline.distill import DistillDataset
from pipeline.output import OutputError
from tests.readers import build_output
from wintok_model.teachers import load_teacher

SIZES = [5, 4, 6]
BROKEN = {1: 2}  # shard 1 holds two samples the pipeline records in errors/: not in the cache


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("distill")
    torch.manual_seed(0)
    m = tf.SiglipVisionModel(tf.SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                   num_attention_heads=4, image_size=32, patch_size=8))
    m.save_pretrained(root / "teacher")
    info = build_output(root, SIZES, teacher=str(root / "teacher"), broken=BROKEN, uncommitted=1)
    info["teacher"] = str(root / "teacher")
    return info


def test_each_image_comes_with_its_own_teacher_embedding(built):
    teacher = load_teacher(built["teacher"])
    got = list(DistillDataset(built["output"]))
    assert len(got) == sum(SIZES)
    for s in got:
        assert s["image"].dtype == torch.uint8 and s["image"].shape == (3, 64, 64)  # wintok-tiny's size
        with torch.no_grad():  # the teacher run again on the image the reader decoded
            ref = teacher(s["image"].permute(1, 2, 0)[None].contiguous())["embedding"][0].numpy()
        assert s["teacher_embedding"].dtype == torch.float32
        np.testing.assert_array_equal(s["teacher_embedding"].numpy(), ref.astype(np.float16).astype(np.float32))
    # the embeddings differ between images, so a pairing off by one row would fail above
    assert len({tuple(s["teacher_embedding"].tolist()) for s in got}) == len(got)


def test_missing_samples_are_counted_and_logged(built, caplog):
    urls = built["inputs"] + built["extra"]  # the extra shard was never tokenized
    ds = DistillDataset(built["output"], urls)
    with caplog.at_level(logging.WARNING, logger="wintok"):
        got = list(ds)
    assert len(got) == sum(SIZES) and ds.joined == sum(SIZES)
    assert ds.missing == 2 + 4
    assert ds.missing_by_shard == {built["inputs"][1]: 2, built["extra"][0]: 4}
    assert sum("no cached teacher row" in r.getMessage() for r in caplog.records) == 2


def test_workers_split_the_shards_and_keys_are_unique(built):
    keys = [k for b in DataLoader(DistillDataset(built["output"]), batch_size=3, num_workers=2) for k in b["key"]]
    assert sorted(keys) == sorted(k for shard in built["plan"].values() for k in
                                  [s["key"] for s in shard if s["expect"] == "ok"])


def test_an_output_without_teacher_is_refused(tmp_path):
    info = build_output(tmp_path, [2])
    with pytest.raises(OutputError, match="no teacher_embedding column"):
        DistillDataset(info["output"])
