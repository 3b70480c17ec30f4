"""The CLAVER model: open_clip's CLIP towers plus Kronecker-mask temporal blocks.

Visual branch (claver-method.md §1): every frame runs through the whole pretrained CLIP
image transformer unchanged; a learnable temporal embedding is added to every token of
frame t; ``layers // 3`` new temporal blocks attend over all ``T*L`` tokens of a clip
under the Kronecker mask; each frame's cls token goes through ``ln_post`` and ``proj``;
frame embeddings are L2-normalised and averaged. Text branch: CLIP's text tower as is.

A pure ``nn.Module``: no files, no process groups. Build one with
``claver_dist.model.build_model`` (weights, interpolation) or directly from an open_clip
``CLIP``:

    model = Claver(open_clip.create_model("ViT-B-16-quickgelu"), num_frames=8)
    logits = model(video, text_tokens, num_variants=K)   # [B, K, C]
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from open_clip.transformer import LayerNorm, QuickGELU
from timm.layers import DropPath
from torch import nn
from torch.utils.checkpoint import checkpoint

from claver_dist.model.attention import AttentionImpl, KroneckerAttention

TemporalKind = Literal["kmt", "kmct", "none"]


class TemporalBlock(nn.Module):
    """Pre-LN transformer block over a clip's tokens, Kronecker-masked; shaped like a CLIP block."""

    def __init__(self, dim: int, causal: bool, impl: AttentionImpl = "auto", drop_path: float = 0.0):
        super().__init__()
        self.ln_1 = LayerNorm(dim)
        self.attn = KroneckerAttention(dim, max(1, dim // 64), causal=causal, impl=impl)
        self.ln_2 = LayerNorm(dim)
        self.mlp = nn.Sequential()
        self.mlp.add_module("c_fc", nn.Linear(dim, 4 * dim))
        self.mlp.add_module("gelu", QuickGELU())
        self.mlp.add_module("c_proj", nn.Linear(4 * dim, dim))
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, num_frames: int) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.ln_1(x), num_frames))
        return x + self.drop_path(self.mlp(self.ln_2(x)))


class Claver(nn.Module):
    """CLAVER over an open_clip ``CLIP``. ``logit_scale`` is kept as a shape-[1] parameter
    (DeepSpeed cannot handle 0-dim parameters); the CLIP's own scalar is removed."""

    def __init__(self, clip: nn.Module, num_frames: int, temporal: TemporalKind = "kmt",
                 temporal_layers: int | None = None, attention: AttentionImpl = "auto",
                 drop_path: float = 0.0, grad_checkpointing: str = "none", checkpoint_every: int = 1,
                 init_logit_scale: float = math.log(1 / 0.07), temporal_embedding_std: float = 0.02):
        super().__init__()
        visual = clip.visual
        if getattr(visual, "attn_pool", None) is not None or not hasattr(visual, "class_embedding"):
            raise ValueError("CLAVER needs a CLIP ViT with a class token (no attention pooling)")
        # a pretrained checkpoint's own scale replaces this when loaded (load_pretrained)
        init = torch.tensor([init_logit_scale])
        if hasattr(clip, "logit_scale"):
            del clip.logit_scale
        if getattr(clip, "logit_bias", None) is not None:
            raise ValueError("SigLIP-style models (logit_bias) are not supported")
        self.clip = clip
        self.logit_scale = nn.Parameter(init)
        self.num_frames = num_frames
        self.temporal_kind = temporal
        self.grad_checkpointing = grad_checkpointing
        if grad_checkpointing == "all" and hasattr(clip, "transformer"):
            clip.transformer.grad_checkpointing = True  # the text tower
        self.checkpoint_every = checkpoint_every
        self.temporal_embedding_std = temporal_embedding_std

        width = visual.class_embedding.shape[-1]
        n_layers = len(visual.transformer.resblocks)
        n_temporal = 0 if temporal == "none" else (n_layers // 3 if temporal_layers is None else temporal_layers)
        if n_temporal:
            self.temporal_embedding = nn.Parameter(torch.empty(1, num_frames, width))
            self.temporal_blocks = nn.ModuleList(
                TemporalBlock(width, causal=temporal == "kmct", impl=attention,
                              drop_path=drop_path * (i + 1) / n_temporal)
                for i in range(n_temporal))
        else:
            self.temporal_embedding = None
            self.temporal_blocks = nn.ModuleList()
        self.init_temporal_parameters()

    # ------------------------------------------------------------------ parameters
    def init_temporal_parameters(self) -> None:
        """Random init of the new (non-CLIP) parameters: trunc-normal(0.02) weights, zero biases."""
        if self.temporal_embedding is not None:
            std = self.temporal_embedding_std
            nn.init.trunc_normal_(self.temporal_embedding, std=std)
        for m in self.temporal_blocks.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def temporal_parameter_names(self) -> list[str]:
        """Names of the parameters CLAVER adds to CLIP (trained at a higher LR)."""
        return [n for n, _ in self.named_parameters() if n.startswith(("temporal_embedding", "temporal_blocks."))]

    def no_weight_decay_names(self) -> set[str]:
        """Positional/temporal embeddings and cls token: excluded from weight decay by name
        (biases, norms and other 1-D parameters are excluded by shape in the optimiser)."""
        keys = {"temporal_embedding", "logit_scale", "clip.visual.positional_embedding",
                "clip.visual.class_embedding", "clip.positional_embedding"}
        return {n for n, _ in self.named_parameters() if n in keys}

    # ------------------------------------------------------------------ towers
    def _maybe_checkpoint(self, fn, i: int, *args, enabled: bool):
        if enabled and self.training and i % self.checkpoint_every == 0 and torch.is_grad_enabled():
            return checkpoint(fn, *args, use_reentrant=False)
        return fn(*args)

    def encode_frames(self, video: torch.Tensor) -> torch.Tensor:
        """``[B, T, 3, S, S]`` -> per-frame embeddings ``[B, T, E]`` (not normalised).

        With ``temporal="none"`` this is exactly ``clip.encode_image`` on every frame."""
        B, T = video.shape[:2]
        visual = self.clip.visual
        x = visual._embeds(video.flatten(0, 1))  # [B*T, L, D]: patches, cls, pos, ln_pre
        spatial_ckpt = self.grad_checkpointing in ("spatial", "all")
        batch_first = getattr(visual.transformer, "batch_first", True)
        if not batch_first:
            x = x.transpose(0, 1)
        for i, block in enumerate(visual.transformer.resblocks):
            x = self._maybe_checkpoint(block, i, x, enabled=spatial_ckpt)
        if not batch_first:
            x = x.transpose(0, 1)
        if len(self.temporal_blocks):
            if T != self.num_frames:
                raise ValueError(f"clip has {T} frames, the model was built for {self.num_frames} "
                                 "(rebuild with the new num_frames: the temporal embedding is interpolated)")
            L, D = x.shape[1:]
            x = x.view(B, T, L, D) + self.temporal_embedding.to(x.dtype)[:, :, None, :]
            x = x.reshape(B, T * L, D)
            temporal_ckpt = self.grad_checkpointing in ("temporal", "all")
            for i, block in enumerate(self.temporal_blocks):
                x = self._maybe_checkpoint(block, i, x, T, enabled=temporal_ckpt)
            x = x.reshape(B * T, L, D)
        pooled, _ = visual._pool(x)  # cls -> ln_post
        if visual.proj is not None:
            pooled = pooled @ visual.proj
        return pooled.view(B, T, -1)

    def encode_video(self, video: torch.Tensor) -> torch.Tensor:
        """``[B, T, 3, S, S]`` -> L2-normalised video embeddings ``[B, E]`` (normalise, then average)."""
        frames = F.normalize(self.encode_frames(video), dim=-1)
        return F.normalize(frames.mean(dim=1), dim=-1)

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        """Token ids ``[N, ctx]`` -> L2-normalised text embeddings ``[N, E]``.

        Padding after the longest prompt is trimmed: under CLIP's causal mask no token
        attends to later positions, so the EOT features are unchanged and the text tower
        runs on ~20 positions instead of 77 for typical prompts."""
        clip = self.clip
        if getattr(clip, "text_pool_type", "argmax") != "argmax" or not hasattr(clip, "token_embedding"):
            return clip.encode_text(tokens, normalize=True)
        eot = tokens.argmax(dim=-1)  # EOT has the largest id in CLIP's vocabulary
        # meta tensors (FLOP counting) have no values: there the caller trims
        n = tokens.shape[1] if tokens.is_meta else int(eot.max()) + 1
        cast = clip.transformer.get_cast_dtype()
        x = clip.token_embedding(tokens[:, :n]).to(cast) + clip.positional_embedding[:n].to(cast)
        mask = clip.attn_mask[:n, :n] if clip.attn_mask is not None else None
        x = clip.transformer(x, attn_mask=mask)
        x = clip.ln_final(x)[torch.arange(x.shape[0], device=x.device), eot]
        proj = clip.text_projection
        x = proj(x) if isinstance(proj, nn.Linear) else (x @ proj if proj is not None else x)
        return F.normalize(x, dim=-1)

    def logits(self, video_emb: torch.Tensor, text_emb: torch.Tensor, num_variants: int) -> torch.Tensor:
        """``[B, E]`` x ``[K*C, E]`` (variant-major) -> ``[B, K, C]`` scaled cosine logits."""
        text = text_emb.view(num_variants, -1, text_emb.shape[-1])
        # CLIP's clamp: a temperature below 1/100 makes training unstable
        scale = self.logit_scale.clamp(max=math.log(100)).exp()
        return scale * torch.einsum("be,kce->bkc", video_emb, text.to(video_emb.dtype))

    def forward(self, video: torch.Tensor, text_tokens: torch.Tensor | None = None, num_variants: int = 1,
                text_features: torch.Tensor | None = None) -> torch.Tensor:
        """Logits ``[B, K, C]`` against ``K*C`` texts (variant-major), given as token ids or,
        when the text tower is frozen, as precomputed normalised ``text_features``."""
        if text_features is None:
            text_features = self.encode_text(text_tokens)
        return self.logits(self.encode_video(video), text_features, num_variants)
