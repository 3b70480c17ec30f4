"""Training configuration (owned by ``claver_dist.train``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass
class OptimConfig:
    # reference: base LR 12e-6 at total batch 256 (scaled linearly with batch).
    lr: float = 12e-6
    lr_reference_batch: int = 256
    scale_lr: bool = True
    temporal_lr_mult: float = 10.0
    weight_decay: float = 0.001
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-8
    grad_clip: float = 1.0
    warmup_epochs: float = 5.0
    min_lr_ratio: float = 0.01


@dataclass
class TrainConfig:
    epochs: int = 30
    # stop after this many optimiser steps (null = epochs * steps per epoch).
    max_steps: int | None = None
    grad_accum: int = 1
    precision: Literal["bf16", "fp32"] = "bf16"
    zero_stage: int = 2
    label_smoothing: float = 0.1
    mixup_alpha: float = 0.8
    cutmix_alpha: float = 1.0
    mixup_switch_prob: float = 0.5
    mixup_prob: float = 1.0
    # what a NaN/inf loss does: stop with an error naming the step, or skip the step
    # (at most max_bad_steps in a row).
    on_nonfinite: Literal["error", "skip"] = "error"
    max_bad_steps: int = 10
    val_every_epochs: int = 1
    device: Literal["auto", "cpu", "cuda"] = "auto"


@dataclass
class CheckpointConfig:
    every_steps: int = 1000
    keep_last: int = 3
    # auto-resume from the run folder's latest complete checkpoint on start.
    auto_resume: bool = True
    # or resume from this checkpoint directory explicitly.
    resume: str | None = None


@dataclass
class LogConfig:
    every_steps: int = 10
    wandb: bool = False
    wandb_project: str = "claver-dist"
    # offline unless the user configured wandb (WANDB_MODE/API key).
    wandb_mode: Literal["offline", "online", "disabled"] = "offline"
    progress_bar: bool = True
    # device peak for MFU in TFLOP/s (null = known GPU table; unknown devices report no MFU).
    peak_tflops: float | None = None
    # count model FLOPs once at start (for MFU); costs one forward+backward of one clip.
    count_flops: bool = True
