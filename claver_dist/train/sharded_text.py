"""Text features for a training step, with the text tower's work split over ranks.

Every rank needs the features of all ``K*C`` prompts, and every rank would otherwise
encode all of them (2,000 sequences per step on Kinetics-400 with K=5). Here rank r
encodes only its slice and the slices are all-gathered with autograd
(``torch.distributed.nn.functional.all_gather``: its backward sums each slice's
gradient over ranks), so text work per rank falls by the world size while loss and
gradients stay those of the plain path.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn


def encode_text_sharded(model, tokens: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``[N, ctx]`` token ids -> ``[N, E]`` features; each rank encodes ``ceil(N / W)`` of them."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    if world == 1:
        return model.encode_text(tokens.to(device, non_blocking=True))
    rank = dist.get_rank()
    n = tokens.shape[0]
    per = math.ceil(n / world)
    if per * world > n:  # equal slices for all_gather; the padding rows are dropped below
        tokens = torch.cat([tokens, tokens[-1:].expand(per * world - n, -1)])
    local = model.encode_text(tokens[rank * per:(rank + 1) * per].to(device, non_blocking=True))
    return torch.cat(dist_fn.all_gather(local))[:n]
