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
           "output": os.path.join(directory, "run"), "model": "wintok-mini",
           "teacher": os.path.join(directory, "teacher"), "steps": STEPS, "batch_size": 16, "lr": 2e-3, "threads": 1,
           "warmup": 100, "checkpoint_every": 100, "log_every": 20, "seed": 0, "min_scale": 0.1,
           "shuffle_buffer": 64}
    path = os.path.join(directory, "train.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(cfg, f, sort_keys=False)
    return path


if __name__ == "__main__":
    print(prepare(sys.argv[1] if len(sys.argv) > 1 else "wintok_mini_train"))
