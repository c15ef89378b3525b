"""Discrete ids for WinTok's semantic tokens: a fitted codebook over the (B, N, D) query tokens.

Three kinds, one tensor ``centroids`` of shape (L, K, d):

* ``kmeans``: L = 1, d = D; one id per token, the nearest centroid (squared L2).
* ``pq`` (product quantisation): D split into L = G groups of d = D / G, one id per group.
* ``rq`` (residual quantisation): L = R levels of d = D; level l quantises what levels < l
  left over (greedy, as it was fitted).

:func:`fit_codebook` fits one with faiss k-means (imported only there: tokenizing with a
codebook needs torch alone). Assignment and decoding run in fp32 whatever the model's precision.
The file format: ``<name>.safetensors`` (the centroids) + ``<name>.json`` (what they are).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from .checkpoint import CheckpointError

KINDS = ("kmeans", "pq", "rq")
CODEBOOK_NAME = "semantic_codebook.safetensors"  # its default name, in the model directory
FORMAT_VERSION = 1
_CHUNK_ELEMENTS = 1 << 25  # distance matrix elements per step (128 MB fp32): bounds memory for any K


class CodebookError(CheckpointError):
    """A semantic codebook cannot be fitted, read or used; the message says why and what to do."""


@dataclass(frozen=True)
class CodebookInfo:
    """The JSON beside the centroids."""

    kind: str
    k: int                   # codes per group / level
    levels: int              # G groups (pq), R levels (rq), 1 (kmeans)
    dim: int                 # D of the semantic tokens
    model_sha256: str = ""   # the weights the tokens came from (`weights_sha256`)
    sample_images: int = 0
    sample_vectors: int = 0
    seed: int = 0
    format_version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        if self.kind not in (*KINDS, "vq"):  # vq: a checkpoint's trained quantiser, never a file
            raise CodebookError(f"semantic codebook kind must be one of {', '.join(KINDS)}, not {self.kind!r}")
        if self.k < 1 or self.levels < 1 or self.dim < 1:
            raise CodebookError(f"semantic codebook needs k, levels and dim >= 1 (got {self.k}, {self.levels}, {self.dim})")
        if self.kind == "kmeans" and self.levels != 1:
            raise CodebookError("a kmeans codebook has one level")
        if self.kind in ("pq", "vq") and self.dim % self.levels:
            raise CodebookError(f"product quantisation: dim {self.dim} does not split into {self.levels} groups")

    @property
    def width(self) -> int:
        """d: the width of one centroid."""
        return self.dim // self.levels if self.kind in ("pq", "vq") else self.dim


class SemanticCodebook(nn.Module):
    """Centroids (L, K, d) as a buffer; `assign` tokens -> ids, `ids_to_tokens` ids -> vectors."""

    def __init__(self, info: CodebookInfo, centroids: torch.Tensor) -> None:
        super().__init__()
        if info.kind not in KINDS:
            raise CodebookError(f"a semantic codebook file is kmeans, pq or rq, not {info.kind!r}")
        want = (info.levels, info.k, info.width)
        if tuple(centroids.shape) != want:
            raise CodebookError(f"semantic codebook centroids are {tuple(centroids.shape)}, its JSON says {want}")
        self.info = info
        self.register_buffer("centroids", centroids.detach().float().contiguous())
        self.register_buffer("sq_norms", self.centroids.square().sum(-1))  # (L, K)

    def _nearest(self, x: torch.Tensor, level: int) -> torch.Tensor:
        """(M, d) fp32 -> (M,) int64 nearest centroid of `level`: argmin |c|^2 - 2 x.c, in row chunks."""
        c, n = self.centroids[level], self.sq_norms[level]
        step = max(1, _CHUNK_ELEMENTS // self.info.k)
        return torch.cat([torch.addmm(n, x[i:i + step], c.T, alpha=-2.0).argmin(dim=1)
                          for i in range(0, x.shape[0], step)]) if x.shape[0] else x.new_zeros(0, dtype=torch.long)

    def assign(self, tokens: torch.Tensor) -> torch.Tensor:
        """(..., D) tokens, any float dtype -> (..., L) int64 ids, computed in fp32 on their device."""
        info = self.info
        if tokens.shape[-1] != info.dim:
            raise ValueError(f"semantic tokens have width {tokens.shape[-1]}, the codebook {info.dim}")
        lead = tokens.shape[:-1]
        with torch.autocast(device_type=tokens.device.type, enabled=False):
            x = tokens.reshape(-1, info.dim).to(self.centroids.device, torch.float32)
            if info.kind == "rq":
                ids, r = [], x.clone()
                for level in range(info.levels):
                    i = self._nearest(r, level)
                    r -= self.centroids[level][i]
                    ids.append(i)
            else:
                parts = x.split(info.width, dim=1)
                ids = [self._nearest(p.contiguous(), level) for level, p in enumerate(parts)]
        return torch.stack(ids, dim=1).view(*lead, info.levels)

    def ids_to_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        """(..., L) ids -> (..., D) fp32 quantised tokens (on the codebook's device)."""
        if ids.shape[-1] != self.info.levels:
            raise ValueError(f"semantic ids must end in {self.info.levels} (groups / levels), got {tuple(ids.shape)}")
        ids = ids.to(self.centroids.device, torch.long)
        vecs = [self.centroids[level][ids[..., level]] for level in range(self.info.levels)]
        if self.info.kind == "rq":
            return torch.stack(vecs).sum(0)
        return torch.cat(vecs, dim=-1)

    # ------------------------------------------------------------------ files
    def save(self, path: str) -> None:
        """`path` (.safetensors) and its JSON (same stem, .json)."""
        from safetensors.torch import save_file

        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        tmp = path + ".tmp"
        save_file({"centroids": self.centroids.cpu().contiguous()}, tmp, metadata={"wintok": "semantic_codebook"})
        os.replace(tmp, path)
        with open(info_path(path), "w", encoding="utf-8") as f:
            json.dump(asdict(self.info), f, indent=1, sort_keys=True)


def info_path(path: str) -> str:
    """The JSON beside a codebook file."""
    return os.path.splitext(path)[0] + ".json"


def read_info(path: str) -> CodebookInfo:
    """The codebook's JSON, checked; a missing or bad file is a one-line CodebookError."""
    if not os.path.isfile(path):
        raise CodebookError(f"semantic codebook {path} not found (fit one with `wintok fit-semantic-codebook`)")
    try:
        with open(info_path(path), encoding="utf-8") as f:
            d = json.load(f)
        if d.get("format_version") != FORMAT_VERSION:
            raise CodebookError(f"semantic codebook {path}: format_version {d.get('format_version')} is not "
                                f"{FORMAT_VERSION}")
        return CodebookInfo(**d)
    except CodebookError:
        raise
    except (OSError, ValueError, TypeError) as e:
        raise CodebookError(f"semantic codebook {path}: cannot read {info_path(path)}: {e}") from None


def load_codebook(path: str) -> SemanticCodebook:
    from safetensors.torch import load_file

    info = read_info(path)
    try:
        centroids = load_file(path)["centroids"]
    except Exception as e:  # noqa: BLE001 - any unreadable file is the same user mistake
        raise CodebookError(f"cannot read semantic codebook {path}: {type(e).__name__}: {e}") from None
    return SemanticCodebook(info, centroids).eval()


def codebook_sha256(path: str) -> str:
    from .checkpoint import file_sha256

    return file_sha256(path)


# ---------------------------------------------------------------------- fitting
def fit_codebook(x: np.ndarray, k: int, kind: str = "kmeans", levels: int = 1, seed: int = 0,
                 niter: int = 20, nredo: int = 1, **info: Any) -> SemanticCodebook:
    """(M, D) vectors -> a fitted codebook: faiss k-means per group (pq) or per residual level (rq).

    `info`: the rest of :class:`CodebookInfo` (model_sha256, sample sizes). Deterministic for
    the same vectors, `k`, `seed` (faiss seeds its initialisation and its subsampling); `nredo`:
    k-means runs per group / level, the best kept (faiss initialises from random points)."""
    faiss = _faiss()
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"fit_codebook needs (M, D) vectors, got {x.shape}")
    levels = 1 if kind == "kmeans" else levels
    meta = CodebookInfo(kind=kind, k=k, levels=levels, dim=int(x.shape[1]), seed=seed,
                        sample_vectors=int(x.shape[0]), **info)
    if x.shape[0] < k:
        raise CodebookError(f"{x.shape[0]} token vectors cannot fit {k} codes: use a larger --sample or a smaller --k")
    gpu = bool(getattr(faiss, "get_num_gpus", lambda: 0)())
    cents = []
    residual = x.copy()
    for level in range(levels):
        part = np.ascontiguousarray(np.split(x, levels, axis=1)[level]) if kind == "pq" else residual
        km = faiss.Kmeans(part.shape[1], k, niter=niter, nredo=nredo, seed=seed + level,
                          verbose=False, gpu=gpu)
        km.train(part)
        c = np.asarray(km.centroids, dtype=np.float32).reshape(k, -1)
        cents.append(c)
        if kind == "rq":
            _, idx = km.index.search(residual, 1)
            residual = residual - c[idx[:, 0]]
    return SemanticCodebook(meta, torch.from_numpy(np.stack(cents))).eval()


def _faiss() -> Any:
    try:
        import faiss
    except ImportError:
        raise CodebookError("fitting a semantic codebook needs faiss: pip install 'wintok-pipeline[semantic]' "
                            "(faiss-cpu; or a faiss GPU build)") from None
    return faiss


# ---------------------------------------------------------------------- report
@torch.no_grad()
def evaluate(cb: SemanticCodebook, tokens: np.ndarray, pooled: np.ndarray | None = None,
             chunk: int = 1024) -> dict[str, Any]:
    """How much the ids lose on (n, N, D) tokens: relative MSE, pooled cosine, code usage
    (`chunk` images at a time: memory stays bounded for a large sample)."""
    n, _, dim = tokens.shape
    err = total = 0.0
    sums = np.zeros(dim)
    counts = torch.zeros(cb.info.levels, cb.info.k, dtype=torch.float64)
    cos: list[torch.Tensor] = []
    for i in range(0, n, chunk):
        x = torch.from_numpy(np.ascontiguousarray(tokens[i:i + chunk], dtype=np.float32)).to(cb.centroids.device)
        ids = cb.assign(x)
        q = cb.ids_to_tokens(ids)
        err += (x - q).double().square().sum().item()
        total += x.double().square().sum().item()
        sums += x.double().sum(dim=(0, 1)).cpu().numpy()
        flat = ids.reshape(-1, cb.info.levels).cpu()
        for level in range(cb.info.levels):
            counts[level] += torch.bincount(flat[:, level], minlength=cb.info.k).double()
        if pooled is not None:
            p = torch.from_numpy(np.asarray(pooled[i:i + chunk], np.float32)).to(q.device)
            cos.append(torch.nn.functional.cosine_similarity(q.mean(dim=1), p, dim=-1).cpu())
    m = n * tokens.shape[1]
    centred = total - float(np.square(sums).sum()) / max(m, 1)  # sum |x - mean|^2
    out: dict[str, Any] = {
        "images": int(n), "vectors": int(m),
        "relative_mse": err / max(total, 1e-30),            # |x - q|^2 / |x|^2
        "unexplained_variance": err / max(centred, 1e-30),  # |x - q|^2 / |x - mean|^2
    }
    if cos:
        c = torch.cat(cos)
        out["pooled_cosine_mean"], out["pooled_cosine_min"] = c.mean().item(), c.min().item()
    usage = []
    for level in range(cb.info.levels):
        prob = counts[level][counts[level] > 0] / counts[level].sum()
        usage.append({"used": float((counts[level] > 0).double().mean()),
                      "perplexity": float(torch.exp(-(prob * prob.log()).sum()))})
    out["code_usage"] = usage
    out["codes_used_min"] = min(u["used"] for u in usage)
    out["perplexity_min"] = min(u["perplexity"] for u in usage)
    return out


class TrainedSemanticQuantizer(nn.Module):
    """A checkpoint's own `semantic_quantizer` (MultiCodebookVQ over the semantic tokens: G
    groups, cosine argmax, fp32) behind the codebook interface: ids (..., G), info.kind "vq"."""

    def __init__(self, vq: nn.Module) -> None:
        super().__init__()
        self.vq = vq
        g = vq.num_codebooks
        size, width = vq.codebooks[0].codebook.weight.shape
        self.info = CodebookInfo(kind="vq", k=int(size), levels=g, dim=int(width) * g)

    def assign(self, tokens: torch.Tensor) -> torch.Tensor:
        lead = tokens.shape[:-1]
        with torch.autocast(device_type=tokens.device.type, enabled=False):
            ids = self.vq.f_to_idx(tokens.reshape(1, -1, self.info.dim).float())  # (1, G, M)
        return ids[0].T.reshape(*lead, self.info.levels)

    def ids_to_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        """(..., G) -> (..., D): the normalised code vectors (the quantiser's own idx_to_f)."""
        lead = ids.shape[:-1]
        flat = ids.reshape(1, -1, self.info.levels).transpose(1, 2).long()
        return self.vq.idx_to_f(flat)[0].reshape(*lead, self.info.dim)
