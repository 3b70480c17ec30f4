"""Training configuration (owned by ``claver_dist.train``; checkpoints: ``claver_dist.checkpoint``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from claver_dist.errors import require


@dataclass
class OptimConfig:
    # reference: base LR 12e-6 at total batch 256 (scaled linearly with batch).
    lr: float = 12e-6
    lr_reference_batch: int = 256
    scale_lr: bool = True
    temporal_lr_mult: float = 10.0
    weight_decay: float = 0.001
    # no weight decay for parameters whose name contains one of these; biases, norms and
    # other 1-D parameters never decay. The official release skips only positional
    # embeddings (so it decays the temporal embedding and the logit scale).
    no_decay_keywords: list[str] = field(default_factory=lambda: ["positional_embedding"])
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-8
    # clip the gradient norm here; 0 = no clipping (the official release).
    grad_clip: float = 0.0
    warmup_epochs: float = 5.0
    # the floor: min_lr_ratio x the base LR, one absolute value for every parameter group
    # (timm's lr_min: the temporal group's 10x LR decays to the same floor).
    min_lr_ratio: float = 0.01
    # false (timm's default, the official release): linear warm-up from 0 over the first
    # steps, the cosine counted from step 0. true: the cosine starts after the warm-up.
    warmup_prefix: bool = False

    def validate(self) -> None:
        require(self.lr > 0, "optim.lr", "> 0", self.lr)
        require(self.lr_reference_batch >= 1, "optim.lr_reference_batch", ">= 1", self.lr_reference_batch)
        require(self.temporal_lr_mult > 0, "optim.temporal_lr_mult", "> 0", self.temporal_lr_mult)
        require(self.weight_decay >= 0, "optim.weight_decay", ">= 0", self.weight_decay)
        require(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), "optim.betas",
                "two numbers in [0, 1)", self.betas)
        require(self.eps > 0, "optim.eps", "> 0", self.eps)
        require(self.grad_clip >= 0, "optim.grad_clip", ">= 0 (0 = no clipping)", self.grad_clip)
        require(self.warmup_epochs >= 0, "optim.warmup_epochs", ">= 0", self.warmup_epochs)
        require(0 <= self.min_lr_ratio <= 1, "optim.min_lr_ratio", "in [0, 1]", self.min_lr_ratio)


@dataclass
class TrainConfig:
    epochs: int = 30
    # stop after this many optimiser steps (null = epochs * steps per epoch).
    max_steps: int | None = None
    grad_accum: int = 1
    precision: Literal["bf16", "fp32"] = "bf16"
    # DeepSpeed ZeRO stage: 0 (plain data parallel), 1 (optimizer state partitioned) or 2
    # (and gradients). Checkpoint export consolidates shards of all three.
    zero_stage: Literal[0, 1, 2] = 2
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
    # a rank that completes no optimiser step for this long dumps its stacks to
    # <run_dir>/hangs/ and exits (the launcher restarts the run); 0 = the longer of 10
    # minutes and 10x the slowest recent step, and 30 minutes for the first step.
    hang_timeout_s: float = 0.0
    # a collective that waits longer than this fails (torch's default is 30 minutes).
    collective_timeout_s: float = 600.0

    def validate(self) -> None:
        require(self.epochs >= 1, "train.epochs", ">= 1", self.epochs)
        require(self.max_steps is None or self.max_steps >= 1, "train.max_steps", ">= 1 or null", self.max_steps)
        require(self.grad_accum >= 1, "train.grad_accum", ">= 1", self.grad_accum)
        require(0 <= self.label_smoothing < 1, "train.label_smoothing", "in [0, 1)", self.label_smoothing)
        for name in ("mixup_alpha", "cutmix_alpha"):
            require(getattr(self, name) >= 0, f"train.{name}", ">= 0", getattr(self, name))
        for name in ("mixup_switch_prob", "mixup_prob"):
            require(0 <= getattr(self, name) <= 1, f"train.{name}", "a probability", getattr(self, name))
        require(self.max_bad_steps >= 0, "train.max_bad_steps", ">= 0", self.max_bad_steps)
        require(self.val_every_epochs >= 1, "train.val_every_epochs", ">= 1", self.val_every_epochs)
        require(self.hang_timeout_s >= 0, "train.hang_timeout_s", ">= 0 (0 = from the step time)",
                self.hang_timeout_s)
        require(self.collective_timeout_s > 0, "train.collective_timeout_s", "> 0", self.collective_timeout_s)


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
    # every rank appends the keys of each step's clips to <run_dir>/samples/rank_NNNNN.jsonl:
    # which clips trained at which step (audits, data-order checks across resumes and resizes).
    sample_keys: bool = False

    def validate(self) -> None:
        require(self.every_steps >= 1, "log.every_steps", ">= 1", self.every_steps)
        require(self.peak_tflops is None or self.peak_tflops > 0, "log.peak_tflops", "> 0 or null",
                self.peak_tflops)
        require(bool(self.wandb_project), "log.wandb_project", "a name", self.wandb_project)
