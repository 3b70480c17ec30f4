"""Evaluation configuration (owned by ``claver_dist.eval``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from claver_dist.errors import require


@dataclass
class EvalConfig:
    # views for the final/standalone evaluation: temporal clips x spatial crops.
    num_clips: int = 4
    # 1: the centre square; 3: three squares along the long side.
    num_crops: Literal[1, 3] = 3
    batch_size: int = 8
    # write per-class accuracy, confusion matrix and a plot into the run folder.
    save_per_class: bool = True

    def validate(self) -> None:
        require(self.num_clips >= 1, "eval.num_clips", ">= 1", self.num_clips)
        require(self.batch_size >= 1, "eval.batch_size", ">= 1", self.batch_size)
