"""Evaluation configuration (owned by ``claver_dist.eval``)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class EvalConfig:
    # views for the final/standalone evaluation: temporal clips x spatial crops.
    num_clips: int = 4
    num_crops: int = 3
    batch_size: int = 8
    # write per-class accuracy, confusion matrix and a plot into the run folder.
    save_per_class: bool = True
