"""CLAVER's training loss: soft-target cross-entropy over K prompt variants.

``logits`` are ``[B, K, C]`` (one row of class logits per sampled text variant); every
(video, variant) row is scored against the video's soft target ``[B, C]``, which carries
label smoothing and mixup/cutmix mass (``claver_dist.data.augment.build_mixup``, or
``smooth_one_hot`` there for plain labels).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def soft_target_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean over videos and variants of ``-sum_c target_c * log softmax(logits)_c``.

    Computed in fp32: the log-softmax over C classes is where bf16 loses most."""
    if logits.dim() == 2:
        logits = logits[:, None]
    if targets.shape != (logits.shape[0], logits.shape[2]):
        raise ValueError(f"targets {tuple(targets.shape)} do not match logits {tuple(logits.shape)} (B, K, C)")
    logp = F.log_softmax(logits.float(), dim=-1)
    return -(targets.float()[:, None, :] * logp).sum(-1).mean()

