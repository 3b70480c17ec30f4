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
    # split names inside a shard directory's manifest (make_shards.py --split).
    train_split: str = "train"
    val_split: str = "val"
    num_frames: int = 8
    image_size: int = 224
    # per-process micro-batch.
    batch_size: int = 8
    # CPU backend: DataLoader worker processes; DALI backend: DALI CPU threads.
    num_workers: int = 4
    # Unused: the loader draws an exact per-epoch permutation of all samples (needed for
    # exact resumption and disjoint ranks), so there is no streaming shuffle buffer.
    shuffle_buffer: int = 500
    # batches prepared ahead (per CPU worker / in flight in the DALI pipeline).
    prefetch: int = 2
    # check every video's size and crc32 against its metadata before decoding, so that
    # post-build corruption is skipped before a decoder (DALI dies on bad input) sees it.
    verify_checksum: bool = True
    # train augmentation (reference recipe, claver-method.md §3)
    crop_scales: list[float] = field(default_factory=lambda: [1.0, 0.875, 0.75, 0.66])
    # TSN multi-scale crop: at most this many scale steps between crop width and height.
    max_distort: int = 1
    flip_prob: float = 0.5
    color_jitter_prob: float = 0.8
    # brightness, contrast, saturation, hue (hue in turns: 0.1 = +-36 degrees).
    color_jitter: list[float] = field(default_factory=lambda: [0.4, 0.4, 0.4, 0.1])
    grayscale_prob: float = 0.2

    def validate(self) -> None:
        from claver_dist.config import ConfigError

        for name in ("num_frames", "image_size", "batch_size", "prefetch"):
            if getattr(self, name) < 1:
                raise ConfigError(f"data.{name} must be >= 1, got {getattr(self, name)}")
        if self.num_workers < 0:
            raise ConfigError(f"data.num_workers must be >= 0, got {self.num_workers}")
        if not self.crop_scales or any(not 0 < s <= 1 for s in self.crop_scales):
            raise ConfigError(f"data.crop_scales must be in (0, 1], got {self.crop_scales}")
        for name in ("flip_prob", "color_jitter_prob", "grayscale_prob"):
            if not 0 <= getattr(self, name) <= 1:
                raise ConfigError(f"data.{name} must be a probability, got {getattr(self, name)}")
        if len(self.color_jitter) != 4 or any(v < 0 for v in self.color_jitter):
            raise ConfigError(f"data.color_jitter must be 4 non-negative numbers, got {self.color_jitter}")
        if self.max_distort < 0:
            raise ConfigError(f"data.max_distort must be >= 0, got {self.max_distort}")
