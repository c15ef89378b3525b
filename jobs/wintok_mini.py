"""Everything that trains wintok-mini, from nothing but this machine's installed packages.

    python -m jobs.wintok_mini DIR          # writes DIR/corpus, DIR/teacher, DIR/train.yaml
    wintok train DIR/train.yaml             # trains; DIR/run/final is the model

Data: the scikit-image sample photos (BSD-licensed, shipped inside scikit-image) except the
held-out ones (pipeline.demo.HELD_OUT), as 4 webdataset shards; random resized crops and
flips (TrainConfig.augment) make the many views. Teacher: a tiny SigLIP vision tower of the
model's width (128), random weights, seed 0, made here: it exercises the distillation path
(cosine to a fixed random feature of each image); it carries no meaning of its own.
"""

from __future__ import annotations

import os
import sys

STEPS = 1200


def prepare(directory: str) -> str:
    import torch
    import transformers as tf
    import yaml

    from pipeline.demo import HELD_OUT, PHOTOS, write_corpus

    directory = os.path.abspath(directory)
    names = [p for p in PHOTOS if p not in HELD_OUT]
    paths = write_corpus(os.path.join(directory, "corpus"), shards=4, names=names)
    torch.manual_seed(0)
    teacher = tf.SiglipVisionModel(tf.SiglipVisionConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                                         num_attention_heads=4, image_size=64, patch_size=8))
    teacher.save_pretrained(os.path.join(directory, "teacher"))
    cfg = {"inputs": [f"{os.path.dirname(paths[0])}/{{00000..{len(paths) - 1:05d}}}.tar"],
           "output": os.path.join(directory, "run"), "model": "wintok-mini", "from_scratch": True,
           "teacher": os.path.join(directory, "teacher"), "steps": STEPS, "batch_size": 16, "lr": 2e-3, "threads": 1,
           "warmup": 100, "checkpoint_every": 100, "log_every": 20, "seed": 0, "min_scale": 0.1,
           "shuffle_buffer": 64}
    path = os.path.join(directory, "train.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(cfg, f, sort_keys=False)
    return path


if __name__ == "__main__":
    print(prepare(sys.argv[1] if len(sys.argv) > 1 else "wintok_mini_train"))


def evaluate(model: str = "wintok-mini") -> dict:
    """Reconstruction PSNR (8-bit) of the held-out photos as the pipeline preprocesses them, and
    the codebook usage over them."""
    import warnings

    import numpy as np
    import torch

    from pipeline.demo import HELD_OUT, _photos
    from pipeline.preprocess import PreprocessConfig, decode_image
    from pipeline.reconstruct import psnr
    from pipeline.shard.encode import to_model_input
    from wintok_model.checkpoint import load_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        net = load_model(model).eval()
    cfg = PreprocessConfig(image_size=net.config.image_size)
    out: dict = {"psnr": {}}
    ids = []
    for name, data in _photos(list(HELD_OUT)):
        pixels = decode_image(data, cfg).pixels
        with torch.inference_mode():
            idx = net.img_to_idx(to_model_input(torch.from_numpy(pixels[None])))
            rec = net.idx_to_img(idx).clamp(-1, 1)
        rec = ((rec + 1) * 127.5).round().to(torch.uint8)[0].permute(1, 2, 0).numpy()
        out["psnr"][name.split(".")[0]] = round(psnr(pixels, rec), 2)
        ids.append(idx[0].numpy())
    out["mean_psnr"] = round(float(np.mean(list(out["psnr"].values()))), 2)
    all_ids = np.stack(ids)  # (n, C, L)
    k = net.config.codebook_size
    out["codes_used"] = [int(np.unique(all_ids[:, c]).size) for c in range(all_ids.shape[1])]
    out["codebook_size"] = k
    return out
