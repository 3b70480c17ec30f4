"""Kronecker-mask attention (KMA): the temporal attention of CLAVER.

Tokens of one clip are laid out frame-major, ``i = t * L + l`` (T frames, L tokens per
frame, cls included). With ``I`` identity, ``J`` all-ones and ``U`` strictly upper
triangular, the *hidden* entries of the score matrix are

    KMT  (default): I_T (x) (J_L - I_L)                  -- nothing of one's own frame but oneself
    KMCT (causal) : I_T (x) (J_L - I_L) + U_T (x) J_L    -- and nothing of later frames

Two implementations, equal in value:

* ``dense``: ``scaled_dot_product_attention`` with a boolean ``[N, N]`` mask. Runs
  everywhere and has a backward on CPU; on GPU the mask rules out the flash kernel.
* ``flex``: FlexAttention with a ``mask_mod`` turned into a block mask, so fused kernels
  stay usable and KMCT skips every block above the frame diagonal. torch 2.14 has no
  FlexAttention backward on CPU: there, training falls back to ``dense`` (logged once).

Why the mask (paper): a token sees whole other frames (wider temporal receptive field),
and hiding its own frame is a heterogeneity bias against spatiotemporal homogenisation.
"""

from __future__ import annotations

import functools
import logging
from typing import Callable, Literal

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

log = logging.getLogger(__name__)

AttentionImpl = Literal["auto", "dense", "flex"]


def kronecker_mask(num_frames: int, tokens_per_frame: int, causal: bool = False,
                   device: torch.device | str | None = None) -> torch.Tensor:
    """Boolean ``[T*L, T*L]`` mask, True where query row may attend key column."""
    T, L = num_frames, tokens_per_frame
    eye_t = torch.eye(T, dtype=torch.bool, device=device)
    same_frame_other_token = ~torch.eye(L, dtype=torch.bool, device=device)
    hidden = torch.kron(eye_t.to(torch.uint8), same_frame_other_token.to(torch.uint8)).bool()
    if causal:
        later = torch.ones(T, T, dtype=torch.bool, device=device).triu(1)
        hidden |= torch.kron(later.to(torch.uint8), torch.ones(L, L, dtype=torch.uint8, device=device)).bool()
    return ~hidden


def kronecker_mask_mod(tokens_per_frame: int, causal: bool = False) -> Callable:
    """FlexAttention ``mask_mod(b, h, q, kv) -> bool`` with the same meaning as ``kronecker_mask``."""
    L = tokens_per_frame

    def kmt(b, h, q_idx, kv_idx):
        return (q_idx // L != kv_idx // L) | (q_idx == kv_idx)

    def kmct(b, h, q_idx, kv_idx):
        return (kv_idx // L < q_idx // L) | (q_idx == kv_idx)

    return kmct if causal else kmt


def _eager_cache(maxsize: int | None = None) -> Callable:
    """``functools.lru_cache`` for eager callers. Inside ``torch.compile`` (``model.compile``)
    the plain function is traced instead: Dynamo ignores such caches anyway (with a warning),
    and the masks it builds become part of the compiled block."""

    def wrap(fn: Callable) -> Callable:
        cached = functools.lru_cache(maxsize=maxsize)(fn)

        @functools.wraps(fn)
        def call(*args):
            return fn(*args) if torch.compiler.is_compiling() else cached(*args)

        return call

    return wrap


@_eager_cache()
def _flex_module():
    """FlexAttention entry points, or None where this torch has none."""
    try:
        from torch.nn.attention import flex_attention as fa
    except ImportError:  # torch < 2.5
        return None
    return fa


def flex_available() -> bool:
    return _flex_module() is not None


@_eager_cache(maxsize=64)
def _dense_mask(T: int, L: int, causal: bool, device: torch.device) -> torch.Tensor:
    return kronecker_mask(T, L, causal, device=device)


@_eager_cache(maxsize=64)
def _block_mask(T: int, L: int, causal: bool, device: torch.device):
    fa = _flex_module()
    n = T * L
    return fa.create_block_mask(kronecker_mask_mod(L, causal), B=None, H=None, Q_LEN=n, KV_LEN=n,
                                device=str(device))


@functools.lru_cache(maxsize=None)
def _compiled_flex():
    # FlexAttention is only fused when compiled; eager runs a reference implementation.
    # Inside a compiled block the block's own compilation fuses it (kronecker_attention).
    return torch.compile(_flex_module().flex_attention, dynamic=False)


def kronecker_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_frames: int,
                        causal: bool = False, impl: AttentionImpl = "auto") -> torch.Tensor:
    """Masked attention over ``[B, H, T*L, Dh]`` tensors; returns the same shape."""
    n = q.shape[-2]
    if n % num_frames:
        raise ValueError(f"sequence length {n} is not a multiple of num_frames={num_frames}")
    L = n // num_frames
    impl = resolve_impl(impl, q)
    if impl == "flex":
        block_mask = _block_mask(num_frames, L, causal, q.device)
        eager_cuda = q.is_cuda and not torch.compiler.is_compiling()
        flex = _compiled_flex() if eager_cuda else _flex_module().flex_attention
        return flex(q, k, v, block_mask=block_mask)
    mask = _dense_mask(num_frames, L, causal, q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


_warned: set[str] = set()


def _warn_once(msg: str) -> None:
    if msg not in _warned:
        _warned.add(msg)
        log.info(msg)


def resolve_impl(impl: AttentionImpl, q: torch.Tensor) -> Literal["dense", "flex"]:
    """Pick the implementation that can run here: flex needs torch>=2.5, and a GPU for grads."""
    if impl == "dense":
        return "dense"
    if not flex_available():
        _warn_once("FlexAttention is not in this torch: Kronecker-mask attention uses the dense path")
        return "dense"
    if impl == "auto" and not q.is_cuda:
        return "dense"
    if not q.is_cuda and torch.is_grad_enabled() and q.requires_grad:
        _warn_once("FlexAttention has no backward on CPU: Kronecker-mask attention uses the dense "
                   "path for training here")
        return "dense"
    return "flex"


class KroneckerAttention(nn.Module):
    """Multi-head self-attention over a clip's ``T*L`` tokens under the Kronecker mask."""

    def __init__(self, dim: int, num_heads: int, causal: bool = False, impl: AttentionImpl = "auto"):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"width {dim} not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.causal = causal
        self.impl: AttentionImpl = impl
        self.in_proj = nn.Linear(dim, 3 * dim)
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, num_frames: int) -> torch.Tensor:
        qkv = rearrange(self.in_proj(x), "b n (three h d) -> three b h n d", three=3, h=self.num_heads)
        out = kronecker_attention(*qkv.unbind(0), num_frames, self.causal, self.impl)
        return self.out_proj(rearrange(out, "b h n d -> b n (h d)"))
