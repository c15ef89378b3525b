"""An independent stand-in for the official WinTok model (WeChatCV/WinTok), for tests only.

It has EXACTLY the official module tree, so its `state_dict()` has the official key names:
the encoder is transformers' real `SiglipVisionModel` and the decoder its real
`Siglip2VisionModel` (embeddings and head removed). transformers 5 flattened those classes
(no `vision_model` attribute), so each is wrapped in a bare `nn.Module` under
`.vision_model`, which reproduces the transformers-4 key layout of the official files
(`encoder.vision_model.encoder.layers.3.mlp.fc1.weight`). The projections, quantiser and
pixel head are written here from the description of the official code, on purpose without
sharing code with `wintok_model` (explicit softmax attention, explicit head pooling), so
that agreement between the two is evidence rather than tautology.

`save_official(path, args)` writes the official checkpoint format:
`torch.save({'args': {...}, 'trainer': {'unitok': state_dict, 'optimizer': ...}, 'epoch': n})`.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import Siglip2VisionConfig, Siglip2VisionModel, SiglipVisionConfig, SiglipVisionModel


@dataclass(frozen=True)
class RefSizes:
    img_size: int = 32
    patch_size: int = 8
    hidden_size: int = 64
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    intermediate_size: int = 128
    layer_norm_eps: float = 1e-6
    num_latent_tokens: int = 8
    vocab_size: int = 1024
    vocab_width: int = 16
    num_codebooks: int = 4
    # decoder deliberately differs from the encoder so that each size is read from the right arg
    decoder_rec_depth: int = 3
    decoder_rec_num_heads: int = 2
    decoder_rec_hidden_size: int = 32
    decoder_rec_intermediate_size: int = 96

    @property
    def grid(self) -> int:
        return self.img_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid**2


# Tiny: quant_proj head_dim (64/4 = 16) equals vocab_width, so no head pooling.
TINY = RefSizes()
# quant_proj head_dim 128/4 = 32 != vocab_width 16: exercises the adaptive-pool branch (as the
# released model does: 1152/4 = 288 -> 32). 16 encoder heads and eps 1e-6, the so400m preset's,
# so the no-encoder-config path must reproduce it exactly.
POOLED = RefSizes(hidden_size=128, num_attention_heads=16, intermediate_size=256, vocab_width=16)
# Width 72 does not divide by the so400m preset's 16 heads: without an encoder config the loader
# cannot guess the heads and must refuse. quant_proj pools 18 -> 8 in uneven, overlapping windows.
ODD = RefSizes(hidden_size=72, num_attention_heads=4, intermediate_size=144, vocab_width=8)


# ----------------------------------------------------------------------------- pieces


class RefPlainAttention(nn.Module):
    def __init__(self, in_dim: int, out_dim: int, num_heads: int) -> None:
        super().__init__()
        wide = max(in_dim, out_dim)
        self.in_dim, self.out_dim, self.num_heads = in_dim, out_dim, num_heads
        self.head_dim = wide // num_heads
        self.qkv = nn.Linear(in_dim, 3 * wide, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(wide))
        self.v_bias = nn.Parameter(torch.zeros(wide))
        self.register_buffer("zero_k_bias", torch.zeros(wide))  # persistent, as in the official code
        self.proj = nn.Linear(out_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, _ = x.shape
        bias = torch.cat([self.q_bias, self.zero_k_bias, self.v_bias])
        qkv = (x @ self.qkv.weight.T + bias).reshape(B, N, 3, self.num_heads, self.head_dim)
        q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))  # (B, heads, N, hd)
        attn = torch.softmax((q @ k.transpose(-1, -2)) / math.sqrt(self.head_dim), dim=-1)
        out = attn @ v  # (B, heads, N, hd)
        if self.in_dim > self.out_dim:
            out = out.mean(dim=1)  # (B, N, hd)
            if self.head_dim != self.out_dim:
                # adaptive_avg_pool1d(hd -> out), written out: window i = [floor(i*hd/out), ceil((i+1)*hd/out))
                hd, o = self.head_dim, self.out_dim
                out = torch.stack(
                    [out[..., (i * hd) // o: -((-(i + 1) * hd) // o)].mean(-1) for i in range(o)], dim=-1
                )
        else:
            out = out.transpose(1, 2).reshape(B, N, self.num_heads * self.head_dim)
        return self.proj(out)


class RefGeGluMlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.w0 = nn.Linear(dim, hidden)
        self.w1 = nn.Linear(dim, hidden)
        self.w2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = self.norm(x)
        a = self.w0(n)
        gelu_tanh = 0.5 * a * (1 + torch.tanh(math.sqrt(2 / math.pi) * (a + 0.044715 * a**3)))
        return self.w2(gelu_tanh * self.w1(n))


class RefAttnProjection(nn.Module):
    def __init__(self, in_dim: int, out_dim: int, num_heads: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(in_dim, eps=1e-5)
        self.attn = RefPlainAttention(in_dim, out_dim, num_heads)
        self.proj = nn.Linear(in_dim, out_dim)
        self.norm3 = nn.LayerNorm(in_dim, eps=1e-5)
        self.norm2 = nn.LayerNorm(out_dim, eps=1e-5)
        self.mlp = RefGeGluMlp(out_dim, 2 * out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.proj(self.norm3(x)) + self.attn(self.norm1(x))
        return y + self.mlp(self.norm2(y))


class RefCodebook(nn.Module):
    def __init__(self, size: int, width: int) -> None:
        super().__init__()
        self.codebook = nn.Embedding(size, width)
        self.register_buffer("vocab_usage", torch.zeros(size))


class RefVectorQuantizerM(nn.Module):
    def __init__(self, vocab_size: int, vocab_width: int, num_codebooks: int) -> None:
        super().__init__()
        self.num_codebooks = num_codebooks
        self.codebooks = nn.ModuleList(
            RefCodebook(vocab_size // num_codebooks, vocab_width // num_codebooks) for _ in range(num_codebooks)
        )

    def _normed(self, i: int) -> torch.Tensor:
        w = self.codebooks[i].codebook.weight.float()
        return w / w.norm(dim=1, keepdim=True).clamp_min(1e-12)

    def forward(self, f: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, L, W) -> (straight-through quantised features (B, L, W), ids (B, C, L))."""
        f = f.float()
        chunks = f.chunk(self.num_codebooks, dim=-1)
        ids, quant = [], []
        for i, z in enumerate(chunks):
            zn = z / z.norm(dim=-1, keepdim=True).clamp_min(1e-12)
            cb = self._normed(i)
            idx = torch.argmax(zn @ cb.T, dim=-1)  # (B, L)
            zq = cb[idx]
            ids.append(idx)
            quant.append(zn + (zq - zn).detach())  # straight-through, as in training code
        return torch.cat(quant, dim=-1), torch.stack(ids, dim=1)

    def idx_to_f(self, ids: torch.Tensor) -> torch.Tensor:
        return torch.cat([self._normed(i)[ids[:, i]] for i in range(self.num_codebooks)], dim=-1)


class RefScalingLayer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("shift", torch.tensor([0.5, 0.5, 0.5])[None, :, None, None])
        self.register_buffer("scale", torch.tensor([0.5, 0.5, 0.5])[None, :, None, None])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = ((x + 1) * 127.5).clamp(0, 255) / 255
        return (x - self.shift) / self.scale


class RefRearrange(nn.Module):
    """einops Rearrange('b (p1 p2 c) h w -> b c (h p1) (w p2)'), parameter-free."""

    def __init__(self, p: int) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, _, h, w = x.shape
        p = self.p
        out = torch.empty(B, 3, h * p, w * p, dtype=x.dtype)
        for p1 in range(p):
            for p2 in range(p):
                for c in range(3):
                    out[:, c, p1::p, p2::p] = x[:, (p1 * p + p2) * 3 + c]
        return out


# ----------------------------------------------------------------------------- model


def siglip_vision_config(s: RefSizes) -> SiglipVisionConfig:
    cfg = SiglipVisionConfig(
        hidden_size=s.hidden_size, intermediate_size=s.intermediate_size,
        num_hidden_layers=s.num_hidden_layers, num_attention_heads=s.num_attention_heads,
        image_size=s.img_size, patch_size=s.patch_size, layer_norm_eps=s.layer_norm_eps,
        hidden_act="gelu_pytorch_tanh",
    )
    cfg._attn_implementation = "eager"
    return cfg


def siglip2_decoder_config(s: RefSizes) -> Siglip2VisionConfig:
    cfg = Siglip2VisionConfig(
        hidden_size=s.decoder_rec_hidden_size, intermediate_size=s.decoder_rec_intermediate_size,
        num_hidden_layers=s.decoder_rec_depth, num_attention_heads=s.decoder_rec_num_heads,
        patch_size=1, num_patches=s.num_patches,
    )
    cfg._attn_implementation = "eager"
    return cfg


def _wrap(vision_model: nn.Module) -> nn.Module:
    holder = nn.Module()
    holder.vision_model = vision_model
    return holder


class OfficialWinTok(nn.Module):
    def __init__(self, s: RefSizes = TINY, seed: int = 0) -> None:
        super().__init__()
        self.sizes = s
        D, Dd, p = s.hidden_size, s.decoder_rec_hidden_size, s.patch_size
        enc = SiglipVisionModel(siglip_vision_config(s))
        enc.head = None
        self.encoder = _wrap(enc)
        self.query_tokens = nn.Parameter(torch.zeros(s.num_latent_tokens, D))
        self.query_tokens_pos_embed = nn.Parameter(torch.zeros(s.num_latent_tokens, D))
        self.quant_proj = RefAttnProjection(D, s.vocab_width, s.num_codebooks)
        self.quantizer = RefVectorQuantizerM(s.vocab_size, s.vocab_width, s.num_codebooks)
        self.post_quant_proj = RefAttnProjection(s.vocab_width, D, s.num_codebooks)
        self.fc_norm = nn.LayerNorm(D, eps=1e-6)
        self.projection = nn.Linear(D, D)
        dec = Siglip2VisionModel(siglip2_decoder_config(s))
        dec.embeddings = None
        dec.head = None
        self.decoder = _wrap(dec)
        self.decoder_rec_pos_embed = nn.Parameter(torch.zeros(s.num_patches, Dd), requires_grad=False)
        self.decode_task_layer_1 = nn.Sequential(nn.Linear(D, Dd), nn.Tanh(), nn.Linear(Dd, Dd))
        self.decode_task_layer_2 = nn.Sequential(nn.Conv2d(Dd, p * p * 3, 1), RefRearrange(p))
        self.conv_out = nn.Conv2d(3, 3, 3, padding=1)
        self.scaling_layer = RefScalingLayer()
        self.randomize(seed)
        self.eval()

    @torch.no_grad()
    def randomize(self, seed: int) -> None:
        """Non-trivial random weights: unit-variance-preserving linears, perturbed LayerNorms,
        random position embeddings and codebooks, so ids spread over the codebooks."""
        g = torch.Generator().manual_seed(seed)

        def randn(*shape: int) -> torch.Tensor:
            return torch.randn(*shape, generator=g)

        for name, t in self.named_parameters():
            if name.endswith("codebook.weight"):
                t.copy_(randn(*t.shape))
            elif t.ndim >= 2 and "position_embedding" not in name and "query_tokens" not in name and "pos_embed" not in name:
                fan_in = t[0].numel()
                t.copy_(randn(*t.shape) / math.sqrt(fan_in))
            elif "norm" in name and name.endswith("weight"):
                t.copy_(1 + 0.2 * randn(*t.shape))
            elif t.ndim == 1:
                t.copy_(0.1 * randn(*t.shape))
            else:  # position embeddings, query tokens
                t.copy_(0.5 * randn(*t.shape))
        for cb in self.quantizer.codebooks:
            cb.vocab_usage.copy_(torch.rand(cb.vocab_usage.shape, generator=g) * 100)

    # ------------------------------------------------------------------ official API
    def _encoder_hidden(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        vm = self.encoder.vision_model
        x = self.scaling_layer(x)
        h = vm.embeddings(x)
        B, L, _ = h.shape
        q = (self.query_tokens + self.query_tokens_pos_embed).unsqueeze(0).expand(B, -1, -1)
        h = torch.cat([h, q], dim=1)
        h = vm.encoder(inputs_embeds=h).last_hidden_state
        h = vm.post_layernorm(h)
        return h[:, :L], h[:, L:]

    def encode(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        image_tokens, semantic = self._encoder_hidden(x)
        feats, indices = self.quantizer(self.quant_proj(image_tokens.float()))
        quant = self.post_quant_proj(feats)
        query_tokens = self.projection(self.fc_norm(semantic))
        return {"indices": indices, "quant": quant, "query_tokens": query_tokens,
                "pooler_out": query_tokens.mean(dim=1)}

    def img_to_idx(self, x: torch.Tensor) -> torch.Tensor:
        return self.encode(x)["indices"]

    def decode(self, quant: torch.Tensor) -> torch.Tensor:
        s = self.sizes
        x = self.decode_task_layer_1(quant) + self.decoder_rec_pos_embed
        vm = self.decoder.vision_model
        x = vm.post_layernorm(vm.encoder(inputs_embeds=x).last_hidden_state)
        x = x.permute(0, 2, 1).reshape(x.shape[0], -1, s.grid, s.grid)
        return self.conv_out(self.decode_task_layer_2(x))

    def idx_to_img(self, ids: torch.Tensor) -> torch.Tensor:
        return self.decode(self.post_quant_proj(self.quantizer.idx_to_f(ids)))

    # ------------------------------------------------------------------ files
    def official_args(self, **extra: Any) -> dict[str, Any]:
        s = self.sizes
        args = {
            "img_size": s.img_size, "vocab_size": s.vocab_size, "vocab_width": s.vocab_width,
            "num_codebooks": s.num_codebooks, "num_latent_tokens": s.num_latent_tokens,
            "decoder_rec_depth": s.decoder_rec_depth, "decoder_rec_num_heads": s.decoder_rec_num_heads,
            "decoder_rec_hidden_size": s.decoder_rec_hidden_size,
            "decoder_rec_intermediate_size": s.decoder_rec_intermediate_size,
            "model": "google/siglip2-so400m-patch16-256",  # a hub name the trainer started from
            "dtype": torch.bfloat16, "lr": 1e-4, "ep": 10, "bs": 256, "local_out_dir_path": "/tmp/x",
            "semantic_distill": True, "teacher": "siglip", "betas": (0.9, 0.95), "le": 0.0, "wd": 0.05,
        }
        args.update(extra)
        return args

    def official_state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in self.state_dict().items()}

    def save_official(self, path: str, args: Any = None, state_dict: dict[str, torch.Tensor] | None = None) -> str:
        sd = self.official_state_dict() if state_dict is None else state_dict
        first = next(iter(sd.values()))
        ckpt = {
            "args": self.official_args() if args is None else args,
            "trainer": {
                "unitok": sd,
                "optimizer": {"state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.zeros_like(first)}},
                              "param_groups": [{"lr": 1e-4, "params": [0]}]},
                "disc": {"w": torch.ones(2)},
                "disc_optimizer": {"state": {}, "param_groups": []},
            },
            "epoch": 7,
            "iter": 1234,
        }
        torch.save(ckpt, path)
        return path

    def save_encoder_config(self, directory: str, full_siglip: bool = False) -> str:
        """The SigLIP config.json the encoder was built from (vision config, or a full SiglipConfig)."""
        vcfg = siglip_vision_config(self.sizes)
        if full_siglip:
            from transformers import SiglipConfig

            cfg = SiglipConfig(vision_config=vcfg.to_dict(), text_config={"vocab_size": 49408})
        else:
            cfg = vcfg
        os.makedirs(directory, exist_ok=True)
        cfg.save_pretrained(directory)
        return directory


def image_like(batch: int, size: int, seed: int = 0) -> torch.Tensor:
    """Images in [-1, 1] with image statistics: smooth colour fields, edges, some texture."""
    g = torch.Generator().manual_seed(seed)
    low = F.interpolate(torch.rand(batch, 3, 4, 4, generator=g) * 2 - 1, size=(size, size),
                        mode="bicubic", align_corners=False)
    mid = F.interpolate(torch.rand(batch, 3, 8, 8, generator=g) * 2 - 1, size=(size, size),
                        mode="bilinear", align_corners=False)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    angle = torch.rand(batch, 1, 1, 1, generator=g) * 6.283
    edge = ((torch.cos(angle) * xx + torch.sin(angle) * yy) > 0).float() * 2 - 1  # a hard edge
    noise = torch.randn(batch, 3, size, size, generator=g) * 0.05
    x = 0.6 * low + 0.3 * mid + 0.3 * edge + noise
    return x.clamp(-1, 1)
