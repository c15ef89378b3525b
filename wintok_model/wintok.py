"""The WinTok hybrid tokenizer (arXiv 2605.18115), inference side.

Encoder: SigLIP ViT over [patch tokens ; semantic tokens]. Pixel path: patch tokens ->
AttnProjection -> multi-codebook VQ -> ids (B, C, L). Semantic path: semantic tokens ->
LayerNorm -> Linear -> query_tokens, mean = pooler_out. Decoder: ids -> codes ->
AttnProjection -> transformer on a fixed 2-D sincos grid -> pixel head -> conv_out.
Input images are RGB in [-1, 1].
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .config import WinTokConfig
from .quantizer import AttnProjection, MultiCodebookVQ
from .vit import PatchEmbeddings, Transformer, sincos_1d, sincos_2d


class ScalingLayer(nn.Module):
    """[-1, 1] -> quantised to the 0..255 range -> SigLIP normalisation (mean 0.5, std 0.5)."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("shift", torch.tensor([0.5, 0.5, 0.5])[None, :, None, None])
        self.register_buffer("scale", torch.tensor([0.5, 0.5, 0.5])[None, :, None, None])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = ((x + 1.0) * 127.5).clamp(0, 255.0) / 255.0
        return (x - self.shift) / self.scale


class PixelHead(nn.Module):
    """1x1 conv to patch*patch*3 channels, then unfold channels into patch pixels."""

    def __init__(self, dim: int, patch: int) -> None:
        super().__init__()
        self.patch = patch
        self.conv = nn.Conv2d(dim, patch * patch * 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        B, _, h, w = x.shape
        p = self.patch
        # channel index = (p1 * p + p2) * 3 + c  ->  pixel (h * p + p1, w * p + p2), channel c
        return x.view(B, p, p, 3, h, w).permute(0, 3, 4, 1, 5, 2).reshape(B, 3, h * p, w * p)


def _fp32_region(device: torch.device) -> contextlib.AbstractContextManager:
    return torch.autocast(device_type=device.type, enabled=False)


class WinTok(nn.Module):
    """WinTok tokenizer. Names of the public methods follow the official code."""

    def __init__(self, config: WinTokConfig, init_weights: bool = True) -> None:
        super().__init__()
        self.config = c = config
        self.scaling_layer = ScalingLayer()
        self.encoder = Transformer(
            c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.intermediate_size,
            c.layer_norm_eps, c.hidden_act,
            embeddings=PatchEmbeddings(c.num_channels, c.hidden_size, c.patch_size, c.num_patches),
        )
        self.query_tokens = nn.Parameter(torch.zeros(c.num_latent_tokens, c.hidden_size))
        self.query_tokens_pos_embed = nn.Parameter(torch.zeros(c.num_latent_tokens, c.hidden_size))
        self.quant_proj = AttnProjection(c.hidden_size, c.vocab_width, c.num_codebooks)
        self.quantizer = MultiCodebookVQ(c.vocab_size, c.vocab_width, c.num_codebooks)
        self.post_quant_proj = AttnProjection(c.vocab_width, c.hidden_size, c.num_codebooks)
        self.fc_norm = nn.LayerNorm(c.hidden_size, eps=1e-6)
        self.projection = nn.Linear(c.hidden_size, c.hidden_size)
        if c.semantic_vocab_size:
            self.semantic_quantizer = MultiCodebookVQ(c.semantic_vocab_size, c.hidden_size, c.semantic_num_codebooks)
        # decoder
        d = c.decoder_hidden_size
        self.decode_task_layer_1 = nn.Sequential(nn.Linear(c.hidden_size, d), nn.Tanh(), nn.Linear(d, d))
        self.decoder_rec_pos_embed = nn.Parameter(torch.zeros(c.num_patches, d), requires_grad=False)
        self.decoder = Transformer(
            d, c.decoder_depth, c.decoder_num_heads, c.decoder_intermediate_size,
            c.decoder_layer_norm_eps, "gelu_pytorch_tanh",
        )
        self.decode_task_layer_2 = PixelHead(d, c.patch_size)
        self.conv_out = nn.Conv2d(3, 3, 3, padding=1)
        if init_weights and not self.query_tokens.is_meta:
            self.reset_parameters()

    # ---------------------------------------------------------------- init
    @torch.no_grad()
    def reset_parameters(self, seed: int | None = 0) -> None:
        """Random init (for presets without weights): truncated-normal linears, sincos positions."""
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        for m in self.modules():
            if isinstance(m, nn.Linear | nn.Conv2d | nn.Embedding):
                w = torch.empty_like(m.weight)
                nn.init.trunc_normal_(w, std=0.02, generator=gen)
                m.weight.copy_(w)
                if getattr(m, "bias", None) is not None:
                    m.bias.zero_()
            elif isinstance(m, nn.LayerNorm):
                m.weight.fill_(1.0)
                m.bias.zero_()
        for cb in self.quantizer.codebooks:
            cb.codebook.weight.copy_(torch.randn(cb.codebook.weight.shape, generator=gen))
        c = self.config
        self.query_tokens.copy_(torch.randn(self.query_tokens.shape, generator=gen))
        self.query_tokens_pos_embed.copy_(
            torch.from_numpy(sincos_1d(c.hidden_size, np.arange(c.num_latent_tokens))).float()
        )
        self.decoder_rec_pos_embed.copy_(torch.from_numpy(sincos_2d(c.decoder_hidden_size, c.grid_size)).float())
        if c.semantic_vocab_size:  # drawn last: the other weights stay what they were
            for cb in self.semantic_quantizer.codebooks:
                cb.codebook.weight.copy_(torch.randn(cb.codebook.weight.shape, generator=gen))

    # ---------------------------------------------------------------- encoder
    def _encode_hidden(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[-1, 1] images -> (normed patch tokens (B, L, D), normed semantic tokens (B, N, D))."""
        c = self.config
        if x.ndim != 4 or x.shape[1] != c.num_channels or x.shape[2:] != (c.image_size, c.image_size):
            raise ValueError(
                f"expected images (B, {c.num_channels}, {c.image_size}, {c.image_size}), got {tuple(x.shape)}"
            )
        h = self.encoder.embeddings(self.scaling_layer(x))
        B, L, _ = h.shape
        q = (self.query_tokens + self.query_tokens_pos_embed).unsqueeze(0).expand(B, -1, -1)
        h = self.encoder(torch.cat([h, q.to(h.dtype)], dim=1))
        return h[:, :L], h[:, L:]

    def _ids_from_patches(self, patches: torch.Tensor) -> torch.Tensor:
        with _fp32_region(patches.device):
            return self.quantizer.f_to_idx(self.quant_proj(patches.float()))

    def img_to_idx(self, x: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] (B, 3, H, W) -> pixel ids (B, num_codebooks, L) int64."""
        patches, _ = self._encode_hidden(x)
        return self._ids_from_patches(patches)

    def encode(self, x: torch.Tensor, with_quant: bool = True) -> dict[str, torch.Tensor]:
        """One encoder pass -> 'indices', 'quant' (unless with_quant=False), 'query_tokens', 'pooler_out'."""
        patches, sem = self._encode_hidden(x)
        out: dict[str, torch.Tensor] = {"indices": self._ids_from_patches(patches)}
        if with_quant:
            with _fp32_region(x.device):
                out["quant"] = self.post_quant_proj(self.quantizer.idx_to_f(out["indices"]))
        query_tokens = self.projection(self.fc_norm(sem))
        out["query_tokens"] = query_tokens
        out["pooler_out"] = query_tokens.mean(dim=1)
        return out

    def encode_image(self, x: torch.Tensor) -> torch.Tensor:
        """L2-normalised pooled semantic embedding (B, D)."""
        return F.normalize(self.encode(x, with_quant=False)["pooler_out"].float(), dim=-1)

    # ---------------------------------------------------------------- semantic ids
    @property
    def semantic_codebook(self) -> nn.Module | None:
        """What makes semantic ids: the attached fitted codebook
        (:class:`~wintok_model.semantic.SemanticCodebook`), else the checkpoint's trained
        quantiser (:class:`~wintok_model.semantic.TrainedSemanticQuantizer`), else None."""
        attached = self.__dict__.get("_semantic_codebook")
        if attached is not None or not self.config.semantic_vocab_size or self.__dict__.get("_no_semantic_ids"):
            return attached
        from .semantic import TrainedSemanticQuantizer

        return TrainedSemanticQuantizer(self.semantic_quantizer)

    def attach_semantic_codebook(self, codebook: nn.Module | None, use_trained: bool = True) -> None:
        """Use `codebook` for semantic ids (None: the checkpoint's trained quantiser if it has one
        and `use_trained`). Kept out of the state dict (it is its own file) and out of `.to()`:
        move it with ``codebook.to(device)`` before attaching."""
        self.__dict__["_semantic_codebook"] = codebook
        self.__dict__["_no_semantic_ids"] = not use_trained

    def _codebook(self) -> nn.Module:
        if self.semantic_codebook is None:
            raise ValueError("no semantic codebook attached: attach_semantic_codebook(load_codebook(path)) first")
        return self.semantic_codebook

    def tokens_to_semantic_ids(self, query_tokens: torch.Tensor) -> torch.Tensor:
        """(B, N, D) semantic tokens (encode()['query_tokens']) -> (B, N, G or R) int64 ids, in fp32."""
        return self._codebook().assign(query_tokens)

    def semantic_ids_to_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        """(B, N, G or R) semantic ids -> (B, N, D) fp32 quantised semantic tokens."""
        return self._codebook().ids_to_tokens(ids)

    # ---------------------------------------------------------------- decoder
    def decode(self, quant: torch.Tensor) -> dict[str, torch.Tensor]:
        c = self.config
        x = self.decode_task_layer_1(quant.to(self.decode_task_layer_1[0].weight.dtype))
        x = self.decoder(x + self.decoder_rec_pos_embed.unsqueeze(0).to(x.dtype))
        B = x.shape[0]
        x = x.permute(0, 2, 1).reshape(B, -1, c.grid_size, c.grid_size)
        return {"recon": self.conv_out(self.decode_task_layer_2(x))}

    def idx_to_img(self, indices: torch.Tensor) -> torch.Tensor:
        """Pixel ids (B, num_codebooks, L) -> images (B, 3, H, W), nominally in [-1, 1]."""
        c = self.config
        if indices.ndim != 3 or indices.shape[1:] != (c.num_codebooks, c.num_patches):
            raise ValueError(f"ids must be (B, {c.num_codebooks}, {c.num_patches}), got {tuple(indices.shape)}")
        with _fp32_region(indices.device):
            quant = self.post_quant_proj(self.quantizer.idx_to_f(indices.long()))
        return self.decode(quant)["recon"]

    def img_to_reconstructed_img(self, x: torch.Tensor) -> torch.Tensor:
        return self.idx_to_img(self.img_to_idx(x))

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        out = self.encode(x)
        out.update(self.decode(out["quant"]))
        return out

    # ---------------------------------------------------------------- io
    @classmethod
    def from_checkpoint(
        cls, path: str, encoder_config: str | None = None, allow_pickle: bool = False
    ) -> WinTok:
        """Load an official .pth, one of our directories, or a preset name (random weights)."""
        from .checkpoint import load_model

        return load_model(path, encoder_config=encoder_config, allow_pickle=allow_pickle)

    from_pretrained = from_checkpoint

    def save_pretrained(self, directory: str) -> None:
        from .checkpoint import save_pretrained

        save_pretrained(self, directory)
