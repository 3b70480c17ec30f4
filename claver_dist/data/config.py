"""Data configuration (owned by ``claver_dist.data``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


@dataclass
class DataConfig:
    # dali: GPU decode + augment ('mixed' on CUDA, 'cpu' for VP8/VP9/MJPEG);
    # cpu: webdataset + PyAV in DataLoader workers (any codec); auto: dali on CUDA.
    backend: Literal["auto", "cpu", "dali"] = "auto"
    # shard directory (holding manifest.json) or a brace pattern of .tar files.
    train_shards: str = ""
    val_shards: str = ""
    num_frames: int = 8
    image_size: int = 224
    # per-process micro-batch.
    batch_size: int = 8
    num_workers: int = 4
    shuffle_buffer: int = 500
    # train augmentation (reference recipe, claver-method.md §3)
    crop_scales: list[float] = field(default_factory=lambda: [1.0, 0.875, 0.75, 0.66])
    flip_prob: float = 0.5
    color_jitter_prob: float = 0.8
    grayscale_prob: float = 0.2
