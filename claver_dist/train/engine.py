"""DeepSpeed engine: parameter groups, AdamW, the LR schedule and the DeepSpeed config.

ZeRO stage 2 (optimizer state and gradients partitioned over ranks), bf16 with fp32
master weights, gradient clipping (off by default, as in the official release) and
accumulation are DeepSpeed's; the optimizer is a plain ``torch.optim.AdamW`` handed to it
(works on CPU and GPU alike), and the schedule a per-step ``LambdaLR`` that DeepSpeed
steps at every optimiser step and checkpoints: timm's ``CosineLRScheduler`` as the
official release configures it, one value per optimiser step.

Parameter groups follow the official release: no weight decay on biases, norms, other
1-D parameters and names with a ``optim.no_decay_keywords`` entry (positional
embeddings); the parameters CLAVER adds to CLIP (temporal embedding and blocks) at
``temporal_lr_mult`` x the base LR.

With ``model.compile`` (compiled blocks) on CUDA the AdamW is the fused one and TF32
matmuls are allowed, and the compile time is logged after the second step (``CompileClock``).
"""

from __future__ import annotations

import math
import os
from typing import Any

import torch
from torch import nn

from claver_dist.model.compile import CompileClock
from claver_dist.train.config import OptimConfig, TrainConfig


def param_groups(model: nn.Module, base_lr: float, weight_decay: float, temporal_lr_mult: float,
                 no_decay_keywords: list[str] | tuple[str, ...] = ("positional_embedding",)) -> list[dict]:
    """Four groups: {CLIP, temporal} x {decay, no decay}; empty groups dropped.

    No decay: biases, 1-D parameters (norms, class embedding) and names containing a
    ``no_decay_keywords`` entry. Scalars stored with shape [1] (the logit scale) count as
    scalars, not as 1-D: the official release decays its 0-dim logit scale."""
    temporal = set(getattr(model, "temporal_parameter_names", lambda: [])())
    scalars = set(getattr(model, "scalar_parameter_names", lambda: set())())
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    names: dict[tuple[bool, bool], list[str]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        is_temporal = name in temporal
        decay = ((p.ndim >= 2 or name in scalars) and not name.endswith(".bias")
                 and not any(k in name for k in no_decay_keywords))
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


def timm_cosine(base_lr: float, floor: float, warmup_steps: int, total_steps: int):
    """LambdaLR multiplier of a group with LR ``base_lr``: timm's ``CosineLRScheduler(t_initial=
    total_steps, lr_min=floor, warmup_t=warmup_steps, warmup_lr_init=0)`` at update ``t``.

    Warm-up ``base * t / W`` for ``t < W``; then ``floor + (base - floor) (1 + cos(pi t / T)) / 2``
    with ``t`` counted from 0, not from the end of the warm-up (timm's ``warmup_prefix=False``);
    ``floor`` from ``T`` on. ``floor`` is absolute: the same for every group."""

    def fn(t: int) -> float:
        if t < warmup_steps:
            return t / warmup_steps
        if t >= total_steps:
            return floor / base_lr
        return (floor + (base_lr - floor) * 0.5 * (1 + math.cos(math.pi * t / total_steps))) / base_lr

    return fn


def cosine_after_warmup(warmup_steps: int, total_steps: int, min_ratio: float):
    """Multiplier with ``optim.warmup_prefix``: linear 0 -> 1 over warm-up, then a cosine
    1 -> ``min_ratio`` over the remaining steps."""

    def fn(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return fn


def lr_multipliers(groups: list[dict], base_lr: float, optim: OptimConfig, warmup_steps: int,
                   total_steps: int) -> list:
    """One LambdaLR function per parameter group."""
    if optim.warmup_prefix:
        return [cosine_after_warmup(warmup_steps, total_steps, optim.min_lr_ratio) for _ in groups]
    return [timm_cosine(g["lr"], optim.min_lr_ratio * base_lr, warmup_steps, total_steps) for g in groups]


def deepspeed_config(train: TrainConfig, optim: OptimConfig, micro_batch: int, world_size: int,
                     load_universal: bool = False) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": train.grad_accum,
        "train_batch_size": micro_batch * train.grad_accum * world_size,
        "gradient_clipping": optim.grad_clip,
        "zero_optimization": {"stage": train.zero_stage, "overlap_comm": False,
                              "contiguous_gradients": True, "reduce_bucket_size": 5e8},
        # ZeRO 1/2 under bf16: the trainer checks the reduced gradients itself, inside the one
        # agreement per step (Trainer._agree), instead of DeepSpeed's extra all-reduce + read
        "bf16": {"enabled": train.precision == "bf16", "check_grad_overflow": train.zero_stage not in (1, 2)},
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
    groups = param_groups(model, lr, optim.weight_decay, optim.temporal_lr_mult, optim.no_decay_keywords)
    # DeepSpeed keeps unknown group keys; the names are only for our logs
    for g in groups:
        g.pop("names")
    # model.compile (the model's blocks are compiled): on CUDA also TF32 for the fp32 matmuls
    # that remain and one fused AdamW kernel; CPU runs are unchanged
    compiled = getattr(model, "compiled", False)
    fused = compiled and os.environ["DS_ACCELERATOR"] == "cuda" and torch.cuda.is_available()
    if fused:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    optimizer = torch.optim.AdamW(groups, lr=lr, betas=tuple(optim.betas), eps=optim.eps,
                                  weight_decay=optim.weight_decay, **({"fused": True} if fused else {}))
    if compiled:
        CompileClock(model, optimizer)  # logs the compile time after the second step
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_multipliers(groups, lr, optim, warmup_steps,
                                                                            total_steps))
    engine, _, _, scheduler = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler,
        config=deepspeed_config(train, optim, micro_batch, world_size, load_universal))
    return engine, scheduler
