"""Data configuration (owned by ``claver_dist.data``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from claver_dist.errors import require


@dataclass
class DataConfig:
    # dali: GPU decode + augment ('mixed' on CUDA, 'cpu' for VP8/VP9/MJPEG);
    # cpu: webdataset + PyAV in DataLoader workers (any codec); auto: dali on CUDA.
    backend: Literal["auto", "cpu", "dali"] = "auto"
    # shard directory (holding manifest.json) or a brace pattern of .tar files; a shard
    # directory may be a URL (s3://, gs://, http(s)://, file://): its shards are streamed.
    train_shards: str = ""
    val_shards: str = ""
    # split names inside a shard directory's manifest (make_shards.py --split).
    train_split: str = "train"
    val_split: str = "val"
    # task=pretrain: a labelled shard set scored zero-shot at every validation (with
    # text.labels and text.bank), beside retrieval on val_shards; "" = none.
    zeroshot_shards: str = ""
    zeroshot_split: str = "val"
    # random: read samples by byte offset (local shards, exact per-sample shuffle); stream:
    # read whole shards in sequence through fsspec (object storage, data/stream.py);
    # auto: stream URLs, random-access paths.
    access: Literal["auto", "random", "stream"] = "auto"
    # stream: samples per shuffle block of each stream (held in memory, encoded).
    stream_buffer: int = 128
    # stream: reopen a shard this many times after a failed read before its unread
    # samples count as bad.
    stream_retries: int = 3
    # stream: a shell command that writes the file at {url} to stdout (webdataset's pipe:),
    # e.g. "aws s3 cp {url} -"; the manifest and the shards are read through it instead
    # of fsspec. "" = fsspec.
    stream_command: str = ""
    num_frames: int = 8
    image_size: int = 224
    # per-process micro-batch.
    batch_size: int = 8
    # CPU backend: DataLoader worker processes; DALI backend: DALI CPU threads.
    num_workers: int = 4
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
        for name in ("num_frames", "image_size", "batch_size", "prefetch"):
            require(getattr(self, name) >= 1, f"data.{name}", ">= 1", getattr(self, name))
        require(self.num_workers >= 0, "data.num_workers", ">= 0", self.num_workers)
        require(self.stream_buffer >= 1, "data.stream_buffer", ">= 1", self.stream_buffer)
        require(self.stream_retries >= 0, "data.stream_retries", ">= 0", self.stream_retries)
        require(not self.stream_command or "{url}" in self.stream_command, "data.stream_command",
                "a command holding {url}", self.stream_command)
        require(bool(self.crop_scales) and all(0 < s <= 1 for s in self.crop_scales), "data.crop_scales",
                "in (0, 1]", self.crop_scales)
        for name in ("flip_prob", "color_jitter_prob", "grayscale_prob"):
            require(0 <= getattr(self, name) <= 1, f"data.{name}", "a probability", getattr(self, name))
        require(len(self.color_jitter) == 4 and all(v >= 0 for v in self.color_jitter), "data.color_jitter",
                "4 non-negative numbers", self.color_jitter)
        require(self.max_distort >= 0, "data.max_distort", ">= 0", self.max_distort)
