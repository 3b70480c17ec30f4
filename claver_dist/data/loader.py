"""The video loader: the factory, the one resumable data position, bad-sample accounting.

    loader = build_loader(cfg.data, "train", rank, world_size, seed=cfg.seed, device="cuda")
    loader.load_state_dict(ckpt["data"])            # optional: continue where it stopped
    for epoch in range(loader.epoch, epochs):
        loader.set_epoch(epoch)
        for batch in loader:                         # len(loader) batches, same on every rank
            batch["video"]  # float32 [B, T, 3, S, S] on device (views != (1, 1): [B, V, T, 3, S, S])
            batch["label"]  # int64 [B]; -1 where not valid
            batch["valid"]  # bool [B]; False only for val padding / bad val samples
            batch["key"]    # list[str]
            ckpt["data"] = loader.state_dict()

Both backends (``cpu.py``: PyAV in DataLoader workers; ``dali.py``: DALI on GPU or CPU)
run the same plan (``plan.py``); this module picks the backend, owns the position and
records what was skipped. The policy:

- **Order.** Epoch ``e`` of split ``train`` visits all N samples in a permutation drawn
  from ``(seed, e)``; ``val`` keeps the shard order. Shards are read by byte offset
  through their ``.idx`` files, so the order is per sample, not per shard.
- **Ranks.** Rank r takes every ``world``-th sample of the epoch's order (r, r + world,
  ...): ranks are disjoint and their union is the epoch.
- **Drop/pad policy.** ``train``: each rank gets ``N // world`` samples and
  ``N // (world * B)`` full batches, rounded down to a multiple of ``grad_accum`` so that
  an epoch ends on an optimiser step; the at most ``world * B * grad_accum - 1`` samples
  at the end of the permutation are dropped *for this epoch only* (the permutation
  changes every epoch). ``val``: nothing is dropped; ranks are padded to
  ``ceil(ceil(N / world) / B)`` batches with entries that have ``valid=False``,
  ``label=-1``, zero video and key "", so every sample is evaluated exactly once across
  ranks. Every rank has the same ``len(loader)``.
- **Randomness.** Frame offsets and augmentation come from each sample's own stream
  ``(seed, epoch, key)`` (``sampling.sample_rng``): identical on both backends, and
  independent of workers and batch position.
- **Position.** The loader is the run's only epoch counter: ``position`` is
  ``(epoch, positions of the epoch's permutation consumed by all ranks)`` and
  ``state_dict()`` is ``{epoch, batch, start, consumed, ...}``. After the last batch of an
  epoch the position moves to ``(epoch + 1, 0)``. Restored under another world size or
  batch, the epoch continues at the consumed position with the new layout: the samples
  before and after together visit the permutation once (up to the drop at its end).
  ``load_state_dict`` + iterating yields exactly the batches an uninterrupted run would
  have yielded next. ``set_epoch(e)`` resets the position unless ``e`` is the current
  epoch, so calling it after a restore keeps the restored position.
- **Bad samples** (failed size/crc check, missing metadata, not decodable, too short)
  never stop an epoch: the sample is skipped, logged with its key, shard and reason, and
  recorded in ``loader.skipped`` (key -> reason; ``loader.skip_events`` counts every
  occurrence). In a train batch its slot is filled with another sample of the same batch
  (the next good one), so batch shapes and step counts stay fixed on every rank; in a
  val batch the slot is marked ``valid=False``.
"""

from __future__ import annotations

import logging
from typing import Any, Iterator

from claver_dist.data.augment import AugmentSpec
from claver_dist.data.config import DataConfig
from claver_dist.data.plan import Backend, Partition, SampleContext, finish_pixels
from claver_dist.data.shards import ShardError, ShardSet, resolve_shards
from claver_dist.data.stream import StreamLoader, build_stream_loader, is_url

logger = logging.getLogger("claver_dist.data")


# --------------------------------------------------------------------------- loader


class VideoLoader:
    """One epoch per ``iter()``; resumable; see the module docstring for the contract."""

    def __init__(self, shards: ShardSet, partition: Partition, ctx: SampleContext, backend: Backend,
                 split: str, num_classes: int | None, views: tuple[int, int], backend_name: str,
                 device: str = "cpu"):  # fmt: skip
        self.shards = shards
        self.partition = partition
        self.ctx = ctx
        self.backend = backend
        self.backend_name = backend_name
        self.device = device
        self.split = split
        self.num_classes = num_classes
        self.views = views
        self.batch_size = partition.batch_size
        self.epoch = 0
        # the layout of this epoch begins at this position of its permutation (not 0 after a
        # resume on another world size or batch), and self._batch of its batches are handed out
        self._start = 0
        self._batch = 0
        self.skipped: dict[str, str] = {}
        self.skip_events = 0
        self._bad: dict[int, str] = {}

    # -- sizes
    def __len__(self) -> int:
        return self.partition.num_batches

    @property
    def num_samples(self) -> int:
        """Samples in the split (all ranks together)."""
        return len(self.shards)

    @property
    def samples_per_epoch(self) -> int:
        """Sample slots this rank hands out per epoch (``len(self) * batch_size``)."""
        return len(self) * self.batch_size

    # -- position
    @property
    def position(self) -> tuple[int, int]:
        """(epoch, samples of its permutation consumed by all ranks so far)."""
        return self.epoch, self.consumed

    @property
    def consumed(self) -> int:
        """Positions of this epoch's permutation handed out, all ranks together."""
        return self._start + self._batch * self.partition.world * self.batch_size

    def _end(self) -> int:
        """Batches in this epoch's current layout."""
        return self.partition.batches_from(self._start)

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch, self._start, self._batch = epoch, 0, 0

    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "batch": self._batch,
            "start": self._start,
            "consumed": self.consumed,
            "samples": self._batch * self.batch_size,
            "seed": self.ctx.seed,
            "world_size": self.partition.world,
            "batch_size": self.batch_size,
            "num_samples": self.num_samples,
            "bad": {self.shards.keys[g]: r for g, r in self._bad.items()},
        }

    def load_state_dict(self, d: dict[str, Any]) -> None:
        if d.get("mode") == "stream":
            raise ValueError("the saved data position is a streamed one (data/stream.py); this run reads its shards by "
                             "offset: resume with the same shard location and data.access, or start a new run folder")
        self.epoch = int(d["epoch"])
        batch, start = int(d["batch"]), int(d.get("start", 0))
        if int(d.get("num_samples", self.num_samples)) != self.num_samples:
            raise ValueError(f"loader state is for {d['num_samples']} samples, this split has {self.num_samples}")
        if int(d.get("seed", self.ctx.seed)) != self.ctx.seed:
            logger.warning("data: restoring a position saved with seed %s under seed %s", d["seed"], self.ctx.seed)
        old = (int(d.get("world_size", self.partition.world)), int(d.get("batch_size", self.batch_size)))
        if old != (self.partition.world, self.batch_size):
            # another layout: it begins where the old one stopped in the epoch's permutation,
            # so the epoch still visits every position once (see Partition.batches_from)
            consumed = int(d.get("consumed", start + batch * old[0] * old[1]))
            logger.info("data: %d ranks x batch %d -> %d x %d: epoch %d continues at position %d of %d of its "
                        "permutation", *old, self.partition.world, self.batch_size, self.epoch, consumed,
                        self.num_samples)  # fmt: skip
            start, batch = consumed, 0
        self._start, self._batch = start, batch
        if batch >= self._end():
            self.epoch, self._start, self._batch = self.epoch + 1, 0, 0
        index = self.shards.ids_of(d.get("bad", {}))
        for key, reason in d.get("bad", {}).items():
            if key in index:
                self._bad[index[key]] = reason
                self.skipped[key] = reason

    # -- iteration
    def __iter__(self) -> Iterator[dict[str, Any]]:
        epoch = self.epoch
        jobs = self.partition.jobs(epoch, self._batch, dict(self._bad), start=self._start)
        for batch in self.backend.run(jobs, epoch):
            self._record(batch.pop("skipped"))
            batch = finish_pixels(batch, self.device)
            b = self._batch + 1
            if b >= self._end():
                self.epoch, self._start, self._batch = epoch + 1, 0, 0
            else:
                self._batch = b
            yield batch
            if self.epoch != epoch:
                return

    def _record(self, skipped: list[tuple[int, str, str]]) -> None:
        for gid, key, reason in skipped:
            self.skip_events += 1
            new = gid not in self._bad
            self._bad[gid] = reason
            self.skipped[key] = reason
            if new:
                logger.warning("data: skipping bad sample %s (rank %d, %s split): %s",
                               self.shards.where(gid), self.partition.rank, self.split, reason)  # fmt: skip

    def close(self) -> None:
        self.backend.close()
        self.shards.close()


def build_loader(
    cfg: DataConfig,
    split: str,
    rank: int = 0,
    world_size: int = 1,
    seed: int = 0,
    num_classes: int | None = None,
    device: str = "cpu",
    views: tuple[int, int] = (1, 1),
    grad_accum: int = 1,
    captions: bool = False,
) -> VideoLoader | StreamLoader:
    """A loader for ``split`` ("train" or "val") of this rank.

    ``views`` = (temporal clips, spatial crops) for val; train always uses one random
    view. ``backend="auto"`` picks DALI when ``device`` is CUDA, else the CPU backend.
    ``num_classes`` is checked against the shard manifest when both are known.
    ``grad_accum`` (train): an epoch holds a multiple of this many batches.
    Shards named by URL (or ``data.access=stream``) are read as streams (``stream.py``).
    ``captions``: the shards must be captioned (video-text pretraining); batches then hold
    one caption per sample (``batch["caption"]``, drawn per epoch by ``sampling.pick_caption``).
    """
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    train = split == "train"
    clips, crops = views
    if train and views != (1, 1):
        raise ValueError(f"training uses one random view per sample, got views={views}")
    if clips < 1 or crops not in (1, 3):
        raise ValueError(f"views must be (clips >= 1, crops in {{1, 3}}), got {views}")
    spec_str = cfg.train_shards if train else cfg.val_shards
    split_name = cfg.train_split if train else cfg.val_split
    spec = AugmentSpec(
        size=cfg.image_size,
        crop_scales=tuple(cfg.crop_scales),
        max_distort=cfg.max_distort,
        flip_prob=cfg.flip_prob,
        color_jitter_prob=cfg.color_jitter_prob,
        color_jitter=tuple(cfg.color_jitter),
        grayscale_prob=cfg.grayscale_prob,
    )
    ctx = SampleContext(seed, train, cfg.num_frames, clips, crops, spec, cfg.verify_checksum)
    if cfg.access == "stream" or (cfg.access == "auto" and is_url(spec_str)):
        if cfg.backend == "dali":
            raise ValueError("data.backend=dali reads shards by offset; streamed shards (data.access) decode with "
                             "data.backend=cpu or auto")
        return build_stream_loader(cfg, split, spec_str, split_name, rank, world_size, seed, num_classes, device,
                                   views, grad_accum, captions, ctx)  # fmt: skip
    if is_url(spec_str):
        raise ShardError(f"{spec_str}: a URL is read as a stream; set data.access to stream or auto")
    tars, manifest = resolve_shards(spec_str, split_name)
    shards = ShardSet(tars, manifest)
    if manifest is not None and captions and manifest.get("annotation") != "captions":
        raise ShardError(f"{spec_str}: a labelled shard set; video-text pretraining needs captioned shards "
                         "(tools/make_shards.py with caption annotations, docs/data.md)")
    if manifest is not None and num_classes is not None and manifest.get("annotation") == "captions":
        raise ShardError(f"{spec_str}: a captioned shard set (videos with captions, no class labels, "
                         "tools/make_shards.py); classification needs labelled shards")
    if manifest is not None and num_classes is not None and manifest.get("num_classes") not in (None, num_classes):
        raise ShardError(f"{spec_str}: shards have {manifest['num_classes']} classes, the run expects {num_classes}")
    partition = Partition(len(shards), cfg.batch_size, rank, world_size, train, seed,
                          multiple_of=grad_accum if train else 1)
    name = cfg.backend
    if name == "auto":
        name = "dali" if str(device).startswith("cuda") else "cpu"
    if name == "cpu":
        from claver_dist.data.cpu import CpuBackend

        backend: Backend = CpuBackend(shards, ctx, cfg, device)
    elif name == "dali":
        from claver_dist.data.dali import DaliBackend

        backend = DaliBackend(shards, ctx, cfg, device)
    else:
        raise ValueError(f"unknown data backend {name!r}")
    return VideoLoader(shards, partition, ctx, backend, split, num_classes, views, name, device)
