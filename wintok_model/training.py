"""WinTok's training forward and losses (model side: torch only).

One pass: encoder over [patch tokens ; semantic tokens] -> pixel path through the
multi-codebook VQ with a straight-through estimator -> decoder -> reconstruction; semantic
path -> pooled semantic embedding. Losses, as the WinTok recipe names them:

- reconstruction: L1 + L2 between the image and its reconstruction (both in [-1, 1]);
- VQ: codebook term ||sg(z) - q||^2 + `commit` * commitment term ||z - sg(q)||^2, on the
  L2-normalised chunks (the quantiser's nearest code is the argmax cosine);
- entropy: per-token entropy of the code distribution (softmax of cosine / `temperature`)
  minimised, entropy of the batch-mean distribution maximised (codebook use);
- distillation: 1 - cosine(pooled semantic tokens, the teacher's pooled embedding).

LPIPS and the GAN loss of the full recipe are not here: both need pretrained networks
(VGG / a discriminator warm-up) that cannot be downloaded in this setting; they sharpen
textures, they do not change what the tokens mean.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .wintok import WinTok


@dataclass(frozen=True)
class LossWeights:
    l1: float = 1.0
    l2: float = 1.0
    vq: float = 1.0
    commit: float = 0.25        # weight of the commitment term inside the VQ loss
    entropy: float = 0.05
    temperature: float = 0.05   # softmax temperature of the entropy loss, on cosines in [-1, 1]
    distill: float = 1.0


def _entropy_terms(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Per-token entropy (minimised) minus batch-mean entropy (maximised)."""
    logits = logits.reshape(-1, logits.shape[-1]) / temperature
    probs = logits.softmax(-1)
    per_token = -(probs * logits.log_softmax(-1)).sum(-1).mean()
    mean = probs.mean(0)
    batch = -(mean * torch.log(mean.clamp_min(1e-10))).sum()
    return per_token - batch


def training_forward(model: WinTok, x: torch.Tensor, teacher_embedding: torch.Tensor | None,
                     w: LossWeights = LossWeights()) -> dict[str, torch.Tensor]:
    """x: images in [-1, 1] (B, 3, S, S); teacher_embedding: (B, D) or None (no distillation).

    Returns every loss term (scalars), their weighted sum as ``loss``, ``recon`` and ``ids``.
    """
    patches, sem = model._encode_hidden(x)
    with torch.autocast(device_type=x.device.type, enabled=False):
        feats = model.quant_proj(patches.float())
        chunks = feats.split(feats.shape[-1] // model.quantizer.num_codebooks, dim=-1)
        codes, ids = [], []
        vq = feats.new_zeros(())
        entropy = feats.new_zeros(())
        for cb, z in zip(model.quantizer.codebooks, chunks, strict=True):
            zn = F.normalize(z, dim=-1)
            book = F.normalize(cb.codebook.weight.float(), dim=1)
            logits = zn @ book.T                       # cosines (B, L, K)
            idx = logits.argmax(-1)
            q = book[idx]
            vq = vq + F.mse_loss(q, zn.detach()) + w.commit * F.mse_loss(zn, q.detach())
            entropy = entropy + _entropy_terms(logits, w.temperature)
            codes.append(zn + (q - zn).detach())       # straight-through
            ids.append(idx)
        quant = model.post_quant_proj(torch.cat(codes, dim=-1))
    recon = model.decode(quant)["recon"].float()
    l1 = F.l1_loss(recon, x.float())
    l2 = F.mse_loss(recon, x.float())
    out = {"l1": l1, "l2": l2, "vq": vq, "entropy": entropy}
    loss = w.l1 * l1 + w.l2 * l2 + w.vq * vq + w.entropy * entropy
    if teacher_embedding is not None:
        pooled = model.projection(model.fc_norm(sem)).mean(dim=1).float()
        if pooled.shape[-1] != teacher_embedding.shape[-1]:
            raise ValueError(f"the teacher's embedding has {teacher_embedding.shape[-1]} dims and the model's "
                             f"semantic tokens {pooled.shape[-1]}: distillation needs the same width")
        distill = (1 - F.cosine_similarity(pooled, teacher_embedding.float(), dim=-1)).mean()
        out["distill"] = distill
        loss = loss + w.distill * distill
    out["loss"] = loss
    out["recon"] = recon
    out["ids"] = torch.stack(ids, dim=1)
    return out
