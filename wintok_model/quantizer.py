"""Multi-codebook vector quantiser and the attention projections into and out of it.

Nearest code = argmax of cosine similarity between the L2-normalised feature chunk and the
L2-normalised codebook, computed in fp32. Inference never touches the usage buffers (the
official quantiser updates them on every forward; they are kept only so official
checkpoints load strictly).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Codebook(nn.Module):
    def __init__(self, size: int, width: int) -> None:
        super().__init__()
        self.codebook = nn.Embedding(size, width)
        self.register_buffer("vocab_usage", torch.zeros(size))

    def normalized(self) -> torch.Tensor:
        return F.normalize(self.codebook.weight.float(), dim=1)

    def f_to_idx(self, feats: torch.Tensor) -> torch.Tensor:
        """(B, L, w) features -> (B, L) int64 ids."""
        B, L, C = feats.shape
        f = F.normalize(feats.reshape(-1, C).float(), dim=-1)
        return torch.argmax(f @ self.normalized().T, dim=1).view(B, L)

    def idx_to_f(self, idx: torch.Tensor) -> torch.Tensor:
        return F.embedding(idx, self.normalized())


class MultiCodebookVQ(nn.Module):
    """Splits the feature width into `num_codebooks` chunks, each quantised on its own codebook."""

    def __init__(self, vocab_size: int, vocab_width: int, num_codebooks: int) -> None:
        super().__init__()
        self.num_codebooks = num_codebooks
        self.codebooks = nn.ModuleList(
            Codebook(vocab_size // num_codebooks, vocab_width // num_codebooks) for _ in range(num_codebooks)
        )

    def f_to_idx(self, feats: torch.Tensor) -> torch.Tensor:
        """(B, L, W) -> (B, num_codebooks, L) int64."""
        chunks = feats.split(feats.shape[-1] // self.num_codebooks, dim=-1)
        return torch.stack([cb.f_to_idx(c) for cb, c in zip(self.codebooks, chunks, strict=True)], dim=1)

    def idx_to_f(self, idx: torch.Tensor) -> torch.Tensor:
        """(B, num_codebooks, L) -> (B, L, W) fp32 normalised code vectors."""
        if idx.ndim != 3 or idx.shape[1] != self.num_codebooks:
            raise ValueError(f"ids must be (B, {self.num_codebooks}, L), got {tuple(idx.shape)}")
        return torch.cat([cb.idx_to_f(idx[:, i]) for i, cb in enumerate(self.codebooks)], dim=-1)


class PlainAttention(nn.Module):
    """Attention that changes width: heads are averaged (down) or concatenated (up)."""

    def __init__(self, in_dim: int, out_dim: int, num_heads: int) -> None:
        super().__init__()
        wide = max(in_dim, out_dim)
        self.in_dim, self.out_dim, self.num_heads = in_dim, out_dim, num_heads
        self.head_dim = wide // num_heads
        self.qkv = nn.Linear(in_dim, wide * 3, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(wide))
        self.v_bias = nn.Parameter(torch.zeros(wide))
        self.register_buffer("zero_k_bias", torch.zeros(wide))
        self.proj = nn.Linear(out_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, _ = x.shape
        bias = torch.cat((self.q_bias, self.zero_k_bias, self.v_bias))
        qkv = F.linear(x, self.qkv.weight, bias).reshape(B, N, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        out = F.scaled_dot_product_attention(q, k, v)  # (B, heads, N, head_dim)
        if self.in_dim > self.out_dim:
            out = out.mean(dim=1)
            if self.head_dim != self.out_dim:
                out = F.adaptive_avg_pool1d(out, self.out_dim)
        else:
            out = out.transpose(1, 2).reshape(B, N, -1)
        return self.proj(out)


class GeGluMlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.w0 = nn.Linear(dim, hidden)
        self.w1 = nn.Linear(dim, hidden)
        self.w2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(x)
        return self.w2(F.gelu(self.w0(x), approximate="tanh") * self.w1(x))


class AttnProjection(nn.Module):
    """Width-changing block: linear shortcut + PlainAttention, then a GeGLU MLP residual."""

    def __init__(self, in_dim: int, out_dim: int, num_heads: int, mlp_ratio: int = 2) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(in_dim)
        self.attn = PlainAttention(in_dim, out_dim, num_heads)
        self.proj = nn.Linear(in_dim, out_dim)
        self.norm3 = nn.LayerNorm(in_dim)
        self.norm2 = nn.LayerNorm(out_dim)
        self.mlp = GeGluMlp(out_dim, int(out_dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.proj.weight.dtype)
        x = self.proj(self.norm3(x)) + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))
