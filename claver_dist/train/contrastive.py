"""Video-text pretraining loss: symmetric InfoNCE whose negatives are the global batch.

Every rank holds ``B`` videos and one caption per video. The embeddings of all ranks are
all-gathered with autograd (``torch.distributed.nn.functional.all_gather``: its backward
hands each rank the sum of the gradients every rank's loss sends to its slice), so each
video is scored against the captions of every rank and each caption against every video.

Two ways to compute it, equal in value and in gradient once the data-parallel engine
averages gradients over ranks (open_clip's ``ClipLoss`` offers the same two):

- ``local_loss=True`` (default): rank ``r`` scores only its own ``B`` rows against the
  ``W*B`` columns, ``[B, W*B]`` logits per direction. The mean over ranks of these losses
  is the global loss; memory and FLOPs per rank grow with ``W*B``, not ``(W*B)^2``.
- ``local_loss=False``: every rank computes the whole ``[W*B, W*B]`` loss. Each rank's
  gradient is then ``W`` times its share, and the engine's average over ranks brings it
  back to the global loss's gradient.

Either way the global loss is exactly the single-process loss on the concatenated batch
(tests/test_contrastive.py checks value and gradients on 2 gloo processes).
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn
import torch.nn.functional as F


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """``[B, E]`` on every rank -> ``[W*B, E]`` in rank order, differentiable (every rank must
    hold the same ``B``: the loaders' drop/pad policy gives equal batches)."""
    _, world = _world()
    if world == 1:
        return x
    return torch.cat(dist_fn.all_gather(x.contiguous()))


def contrastive_loss(video: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor,
                     logit_scale_max: float | None = 100.0, local_loss: bool = True) -> torch.Tensor:
    """Symmetric InfoNCE of ``video`` ``[B, E]`` against ``text`` ``[B, E]`` (row i of each is a
    pair), over the global batch of all ranks: ``(CE(video -> text) + CE(text -> video)) / 2``.

    ``logit_scale`` is the log of the temperature's inverse (the model's parameter); it is
    capped at ``log(logit_scale_max)`` as CLIP pretraining does (``None``: no cap). The
    softmax runs in fp32.
    """
    if video.shape != text.shape or video.dim() != 2:
        raise ValueError(f"video {tuple(video.shape)} and text {tuple(text.shape)} must both be [B, E]")
    scale = logit_scale.float()
    if logit_scale_max is not None:
        scale = scale.clamp(max=math.log(logit_scale_max))
    scale = scale.exp().reshape(())
    rank, world = _world()
    video, text = video.float(), text.float()
    all_video, all_text = gather_with_grad(video), gather_with_grad(text)
    if local_loss:
        b = video.shape[0]
        targets = torch.arange(rank * b, (rank + 1) * b, device=video.device)
        per_video = scale * video @ all_text.T   # [B, W*B]
        per_text = scale * text @ all_video.T    # [B, W*B]
    else:
        targets = torch.arange(all_video.shape[0], device=video.device)
        per_video = scale * all_video @ all_text.T       # [W*B, W*B]
        per_text = per_video.T
    return (F.cross_entropy(per_video, targets) + F.cross_entropy(per_text, targets)) / 2
