"""DeepSpeed engine: parameter groups, AdamW, the LR schedule and the DeepSpeed config.

ZeRO stage 2 (optimizer state and gradients partitioned over ranks), bf16 with fp32
master weights, gradient clipping and accumulation are DeepSpeed's; the optimizer is a
plain ``torch.optim.AdamW`` handed to it (works on CPU and GPU alike), and the schedule a
per-step ``LambdaLR`` that DeepSpeed steps at every optimiser step and checkpoints.

Parameter groups follow the reference recipe: no weight decay on biases, norms, other
1-D parameters and positional/temporal embeddings; the parameters CLAVER adds to CLIP
(temporal embedding and blocks) at ``temporal_lr_mult`` x the base LR.
"""

from __future__ import annotations

import math
import os
from typing import Any

import torch
from torch import nn

from claver_dist.train.config import OptimConfig, TrainConfig


def param_groups(model: nn.Module, base_lr: float, weight_decay: float, temporal_lr_mult: float) -> list[dict]:
    """Four groups: {CLIP, temporal} x {decay, no decay}; empty groups dropped."""
    temporal = set(getattr(model, "temporal_parameter_names", lambda: [])())
    no_decay_names = set(getattr(model, "no_weight_decay_names", lambda: set())())
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    names: dict[tuple[bool, bool], list[str]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        is_temporal = name in temporal
        decay = p.ndim >= 2 and name not in no_decay_names and not name.endswith(".bias")
        groups.setdefault((is_temporal, decay), []).append(p)
        names.setdefault((is_temporal, decay), []).append(name)
    out = []
    for (is_temporal, decay), params in sorted(groups.items()):
        out.append({"params": params, "names": names[(is_temporal, decay)],
                    "lr": base_lr * (temporal_lr_mult if is_temporal else 1.0),
                    "weight_decay": weight_decay if decay else 0.0,
                    "group_name": f"{'temporal' if is_temporal else 'clip'}_{'decay' if decay else 'no_decay'}"})
    return out


def scaled_lr(cfg: OptimConfig, total_batch: int) -> float:
    """Linear LR scaling from the reference batch (12e-6 at 256) to this run's total batch."""
    return cfg.lr * total_batch / cfg.lr_reference_batch if cfg.scale_lr else cfg.lr


def cosine_with_warmup(warmup_steps: int, total_steps: int, min_ratio: float):
    """Multiplier for LambdaLR: linear 0 -> 1 over warm-up, cosine 1 -> ``min_ratio`` after."""

    def fn(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return fn


def deepspeed_config(train: TrainConfig, optim: OptimConfig, micro_batch: int, world_size: int,
                     load_universal: bool = False) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": train.grad_accum,
        "train_batch_size": micro_batch * train.grad_accum * world_size,
        "gradient_clipping": optim.grad_clip,
        "zero_optimization": {"stage": train.zero_stage, "overlap_comm": False,
                              "contiguous_gradients": True, "reduce_bucket_size": 5e8},
        "bf16": {"enabled": train.precision == "bf16"},
        "steps_per_print": 1 << 30,  # our own metrics log instead
        "wall_clock_breakdown": False,
        # our client optimizer: DeepSpeed must not swap it for its fused CPU Adam
        "zero_allow_untested_optimizer": True,
    }
    if load_universal:
        cfg["checkpoint"] = {"load_universal": True}
    return cfg


def build_engine(model: nn.Module, train: TrainConfig, optim: OptimConfig, micro_batch: int, world_size: int,
                 total_steps: int, warmup_steps: int, load_universal: bool = False):
    """``deepspeed.initialize`` with AdamW and the cosine schedule; returns (engine, scheduler)."""
    # DeepSpeed picks its accelerator at import time
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")
    import deepspeed  # imported here: importing the library must stay cheap and side-effect free

    lr = scaled_lr(optim, micro_batch * train.grad_accum * world_size)
    groups = param_groups(model, lr, optim.weight_decay, optim.temporal_lr_mult)
    # DeepSpeed keeps unknown group keys; the names are only for our logs
    for g in groups:
        g.pop("names")
    optimizer = torch.optim.AdamW(groups, lr=lr, betas=tuple(optim.betas), eps=optim.eps,
                                  weight_decay=optim.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, cosine_with_warmup(warmup_steps, total_steps, optim.min_lr_ratio))
    engine, _, _, scheduler = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler,
        config=deepspeed_config(train, optim, micro_batch, world_size, load_universal))
    return engine, scheduler
