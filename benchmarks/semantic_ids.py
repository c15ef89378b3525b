"""Cost of semantic-id assignment next to the encoder's, per image (issue 12).

`python -m benchmarks.semantic_ids [--model wintok-small] [--batch 64] [--ks 256,1024,4096,16384]`
runs, on one batch of random images, `WinTok.encode` (as the Runner does: with_quant=False,
the configured dtype) and then `SemanticCodebook.assign` on its query tokens for each codebook
(k-means with each K; PQ and RQ with the largest K), alternating encoder and assignment rounds
(`--rounds`, the best of each kept: this machine's speed drifts). Random centroids: the cost
of assignment does not depend on their values. Prints one JSON line per codebook and a table.
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch

from wintok_model import WinTok, get_preset
from wintok_model.semantic import CodebookInfo, SemanticCodebook


def _best(fn, rounds: int) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(rounds):
        t = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return best


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="wintok-small", help="preset (random weights: the cost is the same)")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--ks", default="256,1024,4096,16384")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"))
    a = p.parse_args(argv)
    dev = torch.device(a.device)
    cfg = get_preset(a.model)
    model = WinTok(cfg).to(dev).eval().requires_grad_(False)
    x = torch.rand(a.batch, 3, cfg.image_size, cfg.image_size, device=dev) * 2 - 1
    dtype = torch.bfloat16 if a.dtype == "bf16" else torch.float32

    def enc() -> torch.Tensor:
        with torch.inference_mode(), torch.autocast(dev.type, dtype=dtype, enabled=dtype != torch.float32):
            return model.encode(x, with_quant=False)["query_tokens"]

    tokens = enc()
    ks = [int(k) for k in a.ks.split(",")]
    books = [("kmeans", k, 1) for k in ks] + [("pq", ks[-1], 4), ("rq", ks[-1], 2)]
    gen = torch.Generator().manual_seed(0)
    hw = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, {dev}"
    print(f"# {a.model} batch {a.batch} {a.dtype} on {hw}; tokens {tuple(tokens.shape)}")
    rows = []
    for kind, k, levels in books:
        info = CodebookInfo(kind=kind, k=k, levels=levels, dim=cfg.hidden_size)
        cb = SemanticCodebook(info, torch.randn(levels, k, info.width, generator=gen)).to(dev)
        t_enc, t_asg = float("inf"), float("inf")
        for _ in range(a.rounds):  # alternate: drift hits both alike
            t_enc = min(t_enc, _best(enc, 1))
            with torch.inference_mode():
                t_asg = min(t_asg, _best(lambda cb=cb: cb.assign(tokens), 1))
        row = {"kind": kind, "k": k, "levels": levels, "encoder_ms_per_image": 1e3 * t_enc / a.batch,
               "assign_ms_per_image": 1e3 * t_asg / a.batch, "share_of_encoder": t_asg / t_enc}
        rows.append(row)
        print(json.dumps(row))
    print("\n| codebook | encoder ms/img | assignment ms/img | assignment / encoder |\n|---|---|---|---|")
    for r in rows:
        name = r["kind"] + (f" x{r['levels']}" if r["levels"] > 1 else "")
        print(f"| {name}, K={r['k']} | {r['encoder_ms_per_image']:.3f} | {r['assign_ms_per_image']:.4f} | "
              f"{100 * r['share_of_encoder']:.2f}% |")


if __name__ == "__main__":
    main()
