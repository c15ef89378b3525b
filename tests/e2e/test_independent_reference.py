"""End to end against references that share no code with the pipeline.

The other end-to-end checks recompute expected values with the project's own functions
(decode_image, WinTok, load_teacher), so they check plumbing, not values. Here:

* pixel ids: the checkpoint written by the official WinTok code (tests/fixtures/official_tiny)
  is loaded into tests/reference_official.py's stand-in (transformers' own SigLIP modules plus
  the quantiser written from the official description), which first reproduces the official
  outputs stored in the fixture exactly; it is then run on pixels decoded by PIL alone
  (np.asarray of the PNG, centre square cut with numpy slicing, x / 127.5 - 1);
* teacher embeddings: transformers' model on the pixel_values of the Hugging Face image
  processor (non-default mean/std/size) called on the same PIL pictures.
"""

from __future__ import annotations

import io
import os

import numpy as np
import pytest
import torch
import transformers as tf
from PIL import Image
from safetensors.torch import load_file

from pipeline.config import JobConfig
from pipeline.driver import run_job
from schemas import column_to_numpy
from tests import corpus
from tests.e2e.helpers import read_output
from tests.reference_official import OfficialWinTok, RefSizes, image_like

pytestmark = pytest.mark.e2e
FIXTURE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "fixtures", "official_tiny")
CKPT = os.path.join(FIXTURE, "wintok_official_tiny.pth")
# the fixture's sizes (its README): encoder 128 wide, 16 heads; decoder 2 x 4 heads x 64
SIZES = RefSizes(img_size=32, patch_size=8, hidden_size=128, num_hidden_layers=2, num_attention_heads=16,
                 intermediate_size=256, num_latent_tokens=8, vocab_size=1024, vocab_width=16, num_codebooks=4,
                 decoder_rec_depth=2, decoder_rec_num_heads=4, decoder_rec_hidden_size=64,
                 decoder_rec_intermediate_size=128)
TIE = 1e-4  # best - second-best code similarity below this: either id is a correct answer
MEAN, STD = [0.21, 0.62, 0.37], [0.17, 0.31, 0.24]
TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)


@pytest.fixture(scope="module")
def official() -> OfficialWinTok:
    ref = OfficialWinTok(SIZES)
    ckpt = torch.load(CKPT, map_location="cpu", weights_only=True)
    ref.load_state_dict(ckpt["trainer"]["unitok"], strict=True)
    expected = load_file(os.path.join(FIXTURE, "expected.safetensors"))
    with torch.inference_mode():  # the stand-in reproduces what the official code computed
        assert torch.equal(ref.img_to_idx(expected["input"]), expected["ids"])
    return ref.eval()


def _pictures() -> list[tuple[str, np.ndarray]]:
    """uint8 RGB pictures: 32 x 32, and non-square ones whose centre square is cut by the pipeline."""
    out = []
    for i, (h, w) in enumerate([(32, 32)] * 4 + [(32, 40), (48, 32), (32, 64)]):
        x = image_like(1, max(h, w), seed=100 + i)[0, :, :h, :w]
        out.append((f"pic{i:03d}", ((x + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()))
    return out


def _png(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, "PNG")
    return buf.getvalue()


def _centre(a: np.ndarray) -> np.ndarray:
    h, w = a.shape[:2]
    s = min(h, w)
    return a[(h - s) // 2:(h - s) // 2 + s, (w - s) // 2:(w - s) // 2 + s]


def _official(ref: OfficialWinTok, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ids (C, L), top-1 minus top-2 similarity (C, L), unit-length pooler_out (D,)) of one uint8
    (32, 32, 3) picture, as the official model computes them."""
    x = torch.from_numpy(np.array(pixels)).permute(2, 0, 1)[None].float() / 127.5 - 1
    with torch.inference_mode():
        tokens, _ = ref._encoder_hidden(x)
        f = ref.quant_proj(tokens.float())
        enc = ref.encode(x)
        ids = enc["indices"][0].numpy()
        pooled = torch.nn.functional.normalize(enc["pooler_out"][0], dim=-1).numpy()
        gaps = []
        for i, z in enumerate(f.chunk(ref.quantizer.num_codebooks, dim=-1)):
            sim = (z / z.norm(dim=-1, keepdim=True)) @ ref.quantizer._normed(i).T
            top = sim[0].topk(2, dim=-1).values
            gaps.append((top[:, 0] - top[:, 1]).numpy())
    return ids, np.stack(gaps), pooled


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("teacher")
    torch.manual_seed(2)
    model = tf.Dinov2Model(tf.Dinov2Config(**TINY, image_size=28, patch_size=14)).eval()
    proc = tf.BitImageProcessorPil(size={"shortest_edge": 36}, crop_size={"height": 28, "width": 28},
                                   image_mean=MEAN, image_std=STD)
    model.save_pretrained(root)
    proc.save_pretrained(root)
    return str(root), model, proc


def test_official_checkpoint_end_to_end(tmp_path, ray_session, official, teacher_dir):
    pictures = _pictures()
    corpus.write_tar(tmp_path / "00000.tar", [(k, _png(a), "png") for k, a in pictures[:4]])
    corpus.write_tar(tmp_path / "00001.tar", [(k, _png(a), "png") for k, a in pictures[4:]])
    cfg = JobConfig(inputs=(f"{tmp_path}/*.tar",), output=str(tmp_path / "out"), model=CKPT,
                    encoder_config=FIXTURE, teacher=teacher_dir[0], batch_size=3, decode_threads=1,
                    max_retries=0, progress=False, workers=1)
    summary = run_job(cfg)
    assert summary.ok and summary.images == len(pictures), summary

    rows = {}
    for t in read_output(str(tmp_path / "out"))["rows"].values():
        cols = [column_to_numpy(t, c) for c in ("pixel_ids", "semantic_pooled", "teacher_embedding")]
        for i, key in enumerate(t.column("key").to_pylist()):
            rows[key] = [c[i] for c in cols]
    assert sorted(rows) == [k for k, _ in pictures]

    _, model, proc = teacher_dir
    ties = total = 0
    for key, a in pictures:
        seen = _centre(np.asarray(Image.open(io.BytesIO(_png(a))).convert("RGB")))
        want, gap, pooled = _official(official, seen)
        got = rows[key][0].reshape(want.shape).astype(np.int64)
        wrong = got != want
        assert not (wrong & (gap >= TIE)).any(), f"{key}: {int(wrong.sum())} ids differ from the official model"
        ties += int((gap < TIE).sum())
        total += gap.size
        stored = rows[key][1].astype(np.float32)  # float16 in the file: ~5e-4 relative
        assert np.abs(stored - pooled).max() <= 2e-3, (key, np.abs(stored - pooled).max())
        with torch.no_grad():
            pv = proc([Image.fromarray(seen)], return_tensors="pt")["pixel_values"]
            ref_emb = model(pixel_values=pv).last_hidden_state[0, 0].numpy()
        emb = rows[key][2].astype(np.float32)
        cos = float(emb @ ref_emb / np.linalg.norm(emb) / np.linalg.norm(ref_emb))
        assert cos > 0.999 and np.abs(emb - ref_emb).max() <= 0.02 * np.abs(ref_emb).max(), (key, cos)
    assert ties <= total // 20, f"{ties} of {total} ids are near-ties: the check would be too weak"
