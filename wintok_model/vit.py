"""SigLIP-style ViT blocks: pre-LN attention + GELU-tanh MLP, as in SigLIP/SigLIP2.

Attribute names follow the SigLIP layout (`layer_norm1`, `self_attn.q_proj`, `mlp.fc1`...) so
that official checkpoints map onto them by prefix only (see checkpoint.remap_official_keys).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, D = x.shape

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(B, N, self.num_heads, self.head_dim).transpose(1, 2)

        q, k, v = heads(self.q_proj(x)), heads(self.k_proj(x)), heads(self.v_proj(x))
        out = F.scaled_dot_product_attention(q, k, v)
        return self.out_proj(out.transpose(1, 2).reshape(B, N, D))


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int, act: str = "gelu_pytorch_tanh") -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.approximate = "tanh" if act == "gelu_pytorch_tanh" else "none"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate=self.approximate))


class EncoderLayer(nn.Module):
    def __init__(self, dim: int, heads: int, hidden: int, eps: float, act: str) -> None:
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(dim, eps=eps)
        self.self_attn = Attention(dim, heads)
        self.layer_norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = MLP(dim, hidden, act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class PatchEmbeddings(nn.Module):
    """Conv patchify + learned absolute position embedding (SigLIP fixed-resolution)."""

    def __init__(self, channels: int, dim: int, patch: int, num_patches: int) -> None:
        super().__init__()
        self.patch_embedding = nn.Conv2d(channels, dim, kernel_size=patch, stride=patch)
        self.position_embedding = nn.Embedding(num_patches, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embedding(x.to(self.patch_embedding.weight.dtype)).flatten(2).transpose(1, 2)
        return x + self.position_embedding.weight.unsqueeze(0)


class Transformer(nn.Module):
    """A stack of encoder layers followed by a post-LayerNorm; embeddings are optional."""

    def __init__(
        self, dim: int, depth: int, heads: int, hidden: int, eps: float, act: str,
        embeddings: PatchEmbeddings | None = None,
    ) -> None:
        super().__init__()
        if embeddings is not None:
            self.embeddings = embeddings
        self.layers = nn.ModuleList(EncoderLayer(dim, heads, hidden, eps, act) for _ in range(depth))
        self.post_layernorm = nn.LayerNorm(dim, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return self.post_layernorm(x)


def sincos_1d(dim: int, positions: np.ndarray) -> np.ndarray:
    """Sin-cos embedding of 1-D positions: (M, dim), sines in the first half, cosines in the second."""
    if dim % 2:
        raise ValueError("sincos embedding needs an even dim")
    omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
    angles = np.outer(positions.reshape(-1).astype(np.float64), omega)
    return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)


def sincos_2d(dim: int, grid: int) -> np.ndarray:
    """Fixed 2-D sin-cos embedding of a grid x grid lattice, row-major: (grid*grid, dim)."""
    coords = np.arange(grid, dtype=np.float32)
    ww, hh = np.meshgrid(coords, coords)  # first half encodes the column, second the row
    return np.concatenate([sincos_1d(dim // 2, ww), sincos_1d(dim // 2, hh)], axis=1)
