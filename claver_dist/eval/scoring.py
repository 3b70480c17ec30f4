"""Scoring for evaluation: class probabilities averaged over prompt variants, then views.

The official release computed top-1 from logits summed over variants in a way that
breaks when a class has many variants; here each variant gets its own softmax over the
classes and the probabilities are averaged, which is invariant to the number of variants.
"""

from __future__ import annotations

import torch


def variant_probs(logits: torch.Tensor) -> torch.Tensor:
    """``[..., A, C]`` logits -> ``[..., C]``: softmax over classes per variant, mean over variants."""
    return logits.float().softmax(dim=-1).mean(dim=-2)


def view_probs(logits: torch.Tensor) -> torch.Tensor:
    """``[B, V, A, C]`` logits (views x variants) -> ``[B, C]`` probabilities."""
    return variant_probs(logits).mean(dim=1)


def topk_correct(probs: torch.Tensor, labels: torch.Tensor, ks: tuple[int, ...] = (1, 5)) -> dict[int, torch.Tensor]:
    """Per-sample booleans: is the label among the top-k classes?"""
    top = probs.topk(min(max(ks), probs.shape[-1]), dim=-1).indices
    hits = top == labels[:, None]
    return {k: hits[:, :k].any(dim=-1) for k in ks}
