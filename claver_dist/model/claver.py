"""The CLAVER model: open_clip's CLIP towers plus Kronecker-mask temporal blocks.

Visual branch (claver-method.md §1): every frame runs through the whole pretrained CLIP
image transformer unchanged; a learnable temporal embedding is added to every token of
frame t; ``layers // 3`` new temporal blocks attend over all ``T*L`` tokens of a clip
under the Kronecker mask; each frame's cls token goes through ``ln_post`` and ``proj``;
frame embeddings are L2-normalised and averaged (not normalised again, as the official
release does). Text branch: CLIP's text tower as is.

A pure ``nn.Module``: no files, no process groups. Build one with
``claver_dist.model.build_model`` (weights, interpolation) or directly from an open_clip
``CLIP``:

    model = Claver(open_clip.create_model("ViT-B-16-quickgelu"), num_frames=8)
    logits = model(video, text_tokens, num_variants=K)   # [B, K, C]
"""

from __future__ import annotations

import functools
import math
from typing import Literal

import torch
import torch.nn.functional as F
from open_clip.transformer import LayerNorm, QuickGELU
from einops import rearrange
from timm.layers import DropPath
from torch import nn
from torch.utils.checkpoint import checkpoint

from claver_dist.model.attention import AttentionImpl, KroneckerAttention
from claver_dist.model.compile import mark_dynamic

TemporalKind = Literal["kmt", "kmct", "none"]
TemporalInit = Literal["torch", "trunc_normal"]
DropPathLayout = Literal["shared", "temporal"]


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

    def reset_parameters(self, init: TemporalInit) -> None:
        """``torch``: the defaults the block's modules have in PyTorch (attention as
        ``nn.MultiheadAttention`` initialises itself: Xavier-uniform input projection, zero
        biases; ``nn.Linear``'s Kaiming-uniform weights and uniform biases elsewhere), which
        is what the official release trains from. ``trunc_normal``: weights trunc-normal(0.02),
        biases zero (ViT practice)."""
        self.ln_1.reset_parameters()
        self.ln_2.reset_parameters()
        for linear in (self.attn.in_proj, self.attn.out_proj, self.mlp.c_fc, self.mlp.c_proj):
            if init == "trunc_normal":
                nn.init.trunc_normal_(linear.weight, std=0.02)
                nn.init.zeros_(linear.bias)
            else:
                linear.reset_parameters()
        if init == "torch":
            nn.init.xavier_uniform_(self.attn.in_proj.weight)
            nn.init.zeros_(self.attn.in_proj.bias)
            nn.init.zeros_(self.attn.out_proj.bias)


def drop_path_rates(rate: float, n_layers: int, n_temporal: int,
                    layout: DropPathLayout) -> tuple[list[float], list[float]]:
    """Drop-path rates of the CLIP blocks and of the temporal blocks.

    ``shared`` (the official release): one linear ramp ``0 .. rate`` over the CLIP depth;
    spatial block i and temporal block i both take its i-th value. ``temporal``: the CLIP
    blocks get none, the temporal blocks rise linearly to ``rate`` (``rate * (i+1) / n``)."""
    if layout == "shared":
        ramp = torch.linspace(0, rate, n_layers).tolist() if rate > 0 else [0.0] * n_layers
        return ramp, [ramp[min(i, n_layers - 1)] for i in range(n_temporal)]
    return [0.0] * n_layers, [rate * (i + 1) / n_temporal for i in range(n_temporal)]


def _block_with_drop_path(block: nn.Module, drop: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """An open_clip ``ResidualAttentionBlock`` (self-attention, no mask) with drop path on
    both residual branches: its own ``forward`` with ``drop`` around each branch."""
    x = x + drop(block.ls_1(block.attention(q_x=block.ln_1(x))))
    return x + drop(block.ls_2(block.mlp(block.ln_2(x))))


class Claver(nn.Module):
    """CLAVER over an open_clip ``CLIP``. ``logit_scale`` is kept as a shape-[1] parameter
    (DeepSpeed cannot handle 0-dim parameters); the CLIP's own scalar is removed."""

    def __init__(self, clip: nn.Module, num_frames: int, temporal: TemporalKind = "kmt",
                 temporal_layers: int | None = None, attention: AttentionImpl = "auto",
                 drop_path: float = 0.0, grad_checkpointing: str = "none", checkpoint_every: int = 1,
                 init_logit_scale: float = math.log(1 / 0.07), temporal_embedding_std: float = 0.02,
                 temporal_init: TemporalInit = "torch", drop_path_layout: DropPathLayout = "shared",
                 renormalize_video: bool = False, logit_scale_max: float | None = None):
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
        self.temporal_init = temporal_init
        self.renormalize_video = renormalize_video
        self.logit_scale_max = logit_scale_max
        # set by claver_dist.model.compile.compile_blocks (model.compile): the blocks are compiled
        self.compiled = False

        width = visual.class_embedding.shape[-1]
        n_layers = len(visual.transformer.resblocks)
        n_temporal = 0 if temporal == "none" else (n_layers // 3 if temporal_layers is None else temporal_layers)
        spatial_rates, temporal_rates = drop_path_rates(drop_path, n_layers, n_temporal, drop_path_layout)
        # drop path around the CLIP blocks' residuals (open_clip's blocks have none); only
        # the blocks with a non-zero rate run through it, the others are called as they are
        self.spatial_drop_path = nn.ModuleDict({str(i): DropPath(r) for i, r in enumerate(spatial_rates) if r > 0})
        if n_temporal:
            self.temporal_embedding = nn.Parameter(torch.empty(1, num_frames, width))
            self.temporal_blocks = nn.ModuleList(
                TemporalBlock(width, causal=temporal == "kmct", impl=attention, drop_path=r) for r in temporal_rates)
        else:
            self.temporal_embedding = None
            self.temporal_blocks = nn.ModuleList()
        self.init_temporal_parameters()

    # ------------------------------------------------------------------ parameters
    def init_temporal_parameters(self) -> None:
        """Random init of the new (non-CLIP) parameters: the temporal embedding trunc-normal
        (``temporal_embedding_std``), the blocks per ``temporal_init``."""
        if self.temporal_embedding is not None:
            nn.init.trunc_normal_(self.temporal_embedding, std=self.temporal_embedding_std)
        for block in self.temporal_blocks:
            block.reset_parameters(self.temporal_init)

    def temporal_parameter_names(self) -> list[str]:
        """Names of the parameters CLAVER adds to CLIP (trained at a higher LR)."""
        return [n for n, _ in self.named_parameters() if n.startswith(("temporal_embedding", "temporal_blocks."))]

    def scalar_parameter_names(self) -> set[str]:
        """Parameters that are scalars in the method but stored with shape [1] (DeepSpeed
        cannot handle 0-dim ones): the optimiser must not take them for 1-D parameters."""
        return {"logit_scale"}

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
        x = visual._embeds(rearrange(video, "b t c h w -> (b t) c h w"))  # patches, cls, pos, ln_pre
        spatial_ckpt = self.grad_checkpointing in ("spatial", "all")
        batch_first = getattr(visual.transformer, "batch_first", True)
        if not batch_first:
            x = rearrange(x, "n l d -> l n d")
        for i, block in enumerate(visual.transformer.resblocks):
            drop = self.spatial_drop_path[str(i)] if str(i) in self.spatial_drop_path else None
            fn = block if drop is None else functools.partial(_block_with_drop_path, block, drop)
            x = self._maybe_checkpoint(fn, i, x, enabled=spatial_ckpt)
        if not batch_first:
            x = rearrange(x, "l n d -> n l d")
        if len(self.temporal_blocks):
            if T != self.num_frames:
                raise ValueError(f"clip has {T} frames, the model was built for {self.num_frames} "
                                 "(rebuild with the new num_frames: the temporal embedding is interpolated)")
            # every token of frame t gets the frame's temporal embedding; then a clip's frames
            # are one sequence of T*L tokens (frame-major, the Kronecker mask's layout)
            x = rearrange(x, "(b t) l d -> b t l d", t=T) + rearrange(self.temporal_embedding.to(x.dtype),
                                                                      "1 t d -> 1 t 1 d")
            x = rearrange(x, "b t l d -> b (t l) d")
            temporal_ckpt = self.grad_checkpointing in ("temporal", "all")
            for i, block in enumerate(self.temporal_blocks):
                x = self._maybe_checkpoint(block, i, x, T, enabled=temporal_ckpt)
            x = rearrange(x, "b (t l) d -> (b t) l d", t=T)
        pooled, _ = visual._pool(x)  # cls -> ln_post
        if visual.proj is not None:
            pooled = pooled @ visual.proj
        return rearrange(pooled, "(b t) e -> b t e", b=B)

    def encode_video(self, video: torch.Tensor) -> torch.Tensor:
        """``[B, T, 3, S, S]`` -> video embeddings ``[B, E]``: the mean of the L2-normalised
        frame embeddings, whose norm is below 1 when frames differ (the official release);
        with ``renormalize_video`` normalised again, so that logits are cosines."""
        video_emb = F.normalize(self.encode_frames(video), dim=-1).mean(dim=1)
        return F.normalize(video_emb, dim=-1) if self.renormalize_video else video_emb

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        """Token ids ``[N, ctx]`` -> L2-normalised text embeddings ``[N, E]``.

        Padding after the longest prompt is trimmed: under CLIP's causal mask no token
        attends to later positions, so the EOT features are unchanged and the text tower
        runs on ~20 positions instead of 77 for typical prompts. Full-width tokens are trimmed
        here; tokens bound for a GPU are trimmed by the caller before they move
        (``text.prompts.trim_padding``), since reading their length there stalls the GPU."""
        clip = self.clip
        if getattr(clip, "text_pool_type", "argmax") != "argmax" or not hasattr(clip, "token_embedding"):
            return clip.encode_text(tokens, normalize=True)
        eot = tokens.argmax(dim=-1)  # EOT has the largest id in CLIP's vocabulary
        # full-width tokens are trimmed here (a host read); the trainer and eval pass tokens
        # trimmed on the host (text.prompts.trim_padding), meta tensors (FLOP counting) too
        full = tokens.shape[1] == clip.positional_embedding.shape[0] and not tokens.is_meta
        n = int(eot.max()) + 1 if full else tokens.shape[1]
        cast = clip.transformer.get_cast_dtype()
        x = clip.token_embedding(tokens[:, :n]).to(cast) + clip.positional_embedding[:n].to(cast)
        mask = clip.attn_mask[:n, :n] if clip.attn_mask is not None else None
        if self.compiled:  # n changes from step to step: one compiled text block for every length
            mark_dynamic(x, 1)
            if mask is not None:
                mark_dynamic(mask, 0)
                mark_dynamic(mask, 1)
        x = clip.transformer(x, attn_mask=mask)
        x = clip.ln_final(x)[torch.arange(x.shape[0], device=x.device), eot]
        proj = clip.text_projection
        x = proj(x) if isinstance(proj, nn.Linear) else (x @ proj if proj is not None else x)
        return F.normalize(x, dim=-1)

    def logits(self, video_emb: torch.Tensor, text_emb: torch.Tensor, num_variants: int) -> torch.Tensor:
        """``[B, E]`` x ``[K*C, E]`` (variant-major) -> ``[B, K, C]`` scaled cosine logits."""
        text = rearrange(text_emb, "(k c) e -> k c e", k=num_variants)
        scale = self.logit_scale
        if self.logit_scale_max is not None:  # CLIP's cap (100): the official release has none
            scale = scale.clamp(max=math.log(self.logit_scale_max))
        scale = scale.exp()
        return scale * torch.einsum("be,kce->bkc", video_emb, text.to(video_emb.dtype))

    def forward(self, video: torch.Tensor, text_tokens: torch.Tensor | None = None, num_variants: int = 1,
                text_features: torch.Tensor | None = None) -> torch.Tensor:
        """Logits ``[B, K, C]`` against ``K*C`` texts (variant-major), given as token ids or,
        when the text tower is frozen, as precomputed normalised ``text_features``."""
        if text_features is None:
            text_features = self.encode_text(text_tokens)
        return self.logits(self.encode_video(video), text_features, num_variants)
