"""The training readers on S3 (moto on 127.0.0.1): the OUTPUT and the input shards read through fsspec."""

from __future__ import annotations

import pytest
import torch
import transformers as tf

from pipeline.dataset import TokenDataset
from pipeline.distill import DistillDataset
from tests.readers import build_output

pytestmark = pytest.mark.e2e


def test_token_and_distill_readers_on_s3(s3fs_client, s3_endpoint, tmp_path):
    s3fs_client.mkdir("wintok-readers")
    torch.manual_seed(0)
    tf.SiglipVisionModel(tf.SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                               num_attention_heads=4, image_size=32, patch_size=8)
                         ).save_pretrained(tmp_path / "teacher")
    info = build_output(tmp_path, [5, 4], teacher=str(tmp_path / "teacher"), broken={0: 1}, uncommitted=1,
                        s3=(s3fs_client, "wintok-readers/run", s3_endpoint))
    assert info["output"].startswith("s3://")
    expected = sorted(s["key"] for shard in info["plan"].values() for s in shard if s["expect"] == "ok")
    parts = [[r["key"] for r in TokenDataset(info["output"], ["key", "pixel_ids"], storage=info["storage"],
                                             rank=r, world_size=2, shuffle=True, buffer_size=2)] for r in range(2)]
    assert sorted(parts[0] + parts[1]) == expected
    ds = DistillDataset(info["output"], info["inputs"] + info["extra"], storage=info["storage"])
    got = list(ds)
    assert sorted(s["key"] for s in got) == expected
    assert all(s["shard"].startswith("s3://") and s["teacher_embedding"].shape == (32,) for s in got)
    assert ds.missing == 1 + 4 and ds.missing_by_shard[info["extra"][0]] == 4
