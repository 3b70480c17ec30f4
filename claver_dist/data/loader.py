"""The video loader: epoch order, rank partition, resumable position, bad-sample policy.

    loader = build_loader(cfg.data, "train", rank, world_size, seed=cfg.seed, device="cuda")
    loader.load_state_dict(ckpt["data"])            # optional: continue where it stopped
    for epoch in range(loader.epoch, epochs):
        loader.set_epoch(epoch)
        for batch in loader:                         # len(loader) batches, same on every rank
            batch["video"]  # float32 [B, T, 3, S, S] (views != (1, 1): [B, V, T, 3, S, S])
            batch["label"]  # int64 [B]; -1 where not valid
            batch["valid"]  # bool [B]; False only for val padding / bad val samples
            batch["key"]    # list[str]
            ckpt["data"] = loader.state_dict()

Both backends (``cpu.py``: PyAV in DataLoader workers; ``dali.py``: DALI on GPU or CPU)
run the same plan, built here:

- **Order.** Epoch ``e`` of split ``train`` visits all N samples in a permutation drawn
  from ``(seed, e)``; ``val`` keeps the shard order. Shards are read by byte offset
  through their ``.idx`` files, so the order is per sample, not per shard.
- **Ranks.** Rank r takes every ``world``-th sample of the epoch's order (r, r + world,
  ...): ranks are disjoint and their union is the epoch.
- **Drop/pad policy.** ``train``: each rank gets ``N // world`` samples and
  ``N // (world * B)`` full batches; the at most ``world * B - 1`` samples at the end of
  the permutation are dropped *for this epoch only* (the permutation changes every
  epoch). ``val``: nothing is dropped; ranks are padded to ``ceil(ceil(N / world) / B)``
  batches with entries that have ``valid=False``, ``label=-1``, zero video and key "", so
  every sample is evaluated exactly once across ranks. Every rank has the same
  ``len(loader)``.
- **Randomness.** Frame offsets and augmentation come from each sample's own stream
  ``(seed, epoch, key)`` (``sampling.sample_rng``): identical on both backends, and
  independent of workers and batch position.
- **Position.** ``state_dict()`` is ``{epoch, batch, samples, ...}`` counting batches
  handed out. After the last batch of an epoch the position moves to (epoch + 1, 0).
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
import math
from dataclasses import dataclass, field
from typing import Any, Iterator

import numpy as np
import torch

from claver_dist.data.augment import AugmentSpec, ViewParams, draw_params
from claver_dist.data.config import DataConfig
from claver_dist.data.sampling import STREAM_AUGMENT, STREAM_FRAMES, clip_indices, sample_rng
from claver_dist.data.shards import SampleError, ShardError, ShardSet, resolve_shards

logger = logging.getLogger("claver_dist.data")

# A train batch whose every sample is bad looks this far ahead in the rank's order for a
# replacement; more consecutive bad samples than this means the shards are broken.
MAX_LOOKAHEAD = 64


# --------------------------------------------------------------------------- plan


@dataclass(frozen=True)
class SampleContext:
    """Everything needed to turn a sample id into decode + augmentation instructions."""

    seed: int
    train: bool
    num_frames: int
    clips: int
    crops: int
    spec: AugmentSpec
    verify: bool = True


@dataclass
class Prepared:
    """One sample, read and checked, with the frames to decode and the augmentation to apply."""

    gid: int
    key: str
    label: int
    data: bytes
    meta: dict[str, Any]
    indices: list[int]
    params: ViewParams


def prepare(shards: ShardSet, gid: int, epoch: int, ctx: SampleContext) -> Prepared:
    """Read sample ``gid`` and draw its frames/augmentation; raises SampleError if unusable."""
    key = shards.keys[gid]
    data, meta = shards.load(gid, verify=ctx.verify)
    total = int(meta["frames"])
    try:
        width, height = int(meta["width"]), int(meta["height"])
    except (KeyError, ValueError) as e:
        raise SampleError(f"metadata lacks frame size: {e!r}") from e
    rng = sample_rng(ctx.seed, epoch, key, STREAM_FRAMES) if ctx.train else None
    indices = clip_indices(total, ctx.num_frames, ctx.train, ctx.clips, rng)
    arng = sample_rng(ctx.seed, epoch, key, STREAM_AUGMENT) if ctx.train else None
    params = draw_params(ctx.spec, width, height, ctx.train, ctx.crops, arng)
    return Prepared(gid, key, int(meta["label"]), data, meta, indices, params)


@dataclass
class BatchJob:
    """One batch to produce: sample ids (-1 = val padding) and train replacements."""

    epoch: int
    index: int
    gids: list[int]
    lookahead: list[int] = field(default_factory=list)
    known_bad: dict[int, str] = field(default_factory=dict)


class Partition:
    """The epoch plan of one rank (see the module docstring for the policy)."""

    def __init__(self, num_samples: int, batch_size: int, rank: int, world_size: int, train: bool, seed: int):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} out of range for world size {world_size}")
        self.n, self.batch_size, self.rank, self.world, self.train, self.seed = (
            num_samples, batch_size, rank, world_size, train, seed)  # fmt: skip
        if train:
            self.per_rank = num_samples // world_size
            self.num_batches = self.per_rank // batch_size
            if self.num_batches == 0:
                raise ShardError(
                    f"train split has {num_samples} samples: fewer than batch_size x world_size = "
                    f"{batch_size} x {world_size}; lower data.batch_size"
                )
        else:
            self.per_rank = math.ceil(num_samples / world_size)
            self.num_batches = math.ceil(self.per_rank / batch_size)

    def order(self, epoch: int) -> np.ndarray:
        """This rank's sample ids for ``epoch`` (val: padded with -1 to full batches)."""
        if self.train:
            perm = np.random.default_rng(np.random.SeedSequence([self.seed & 0xFFFFFFFF, epoch, 0x5EED])).permutation(self.n)
            return perm[: self.per_rank * self.world][self.rank :: self.world][: self.num_batches * self.batch_size]
        mine = np.arange(self.rank, self.n, self.world)
        return np.concatenate([mine, np.full(self.num_batches * self.batch_size - len(mine), -1)])

    def jobs(self, epoch: int, start: int, known_bad: dict[int, str]) -> Iterator[BatchJob]:
        order = self.order(epoch).tolist()
        B = self.batch_size
        for b in range(start, self.num_batches):
            gids = order[b * B : (b + 1) * B]
            ahead = (order[(b + 1) * B :] + order[: b * B])[:MAX_LOOKAHEAD] if self.train else []
            bad = {g: known_bad[g] for g in gids + ahead if g in known_bad}
            yield BatchJob(epoch, b, gids, ahead, bad)


# --------------------------------------------------------------------------- assembly


@dataclass
class SampleResult:
    gid: int
    key: str
    label: int = -1
    video: torch.Tensor | None = None  # [T, 3, S, S] or [V, T, 3, S, S]
    error: str | None = None


def assemble(job: BatchJob, results: list[SampleResult], train: bool, sample_shape: tuple[int, ...],
             device: torch.device | str = "cpu", fetch_more=None) -> dict[str, Any]:  # fmt: skip
    """The batch dict from per-slot results (aligned with ``job.gids``), applying the bad-sample policy.

    Train: a bad slot takes the next good sample of the batch (cyclically); if none is
    good, ``fetch_more()`` returns good results from ``job.lookahead``. Val: a bad or
    padding slot is a zero video with ``valid=False`` and ``label=-1``.
    """
    skipped = [(r.gid, r.key, r.error) for r in results if r.gid >= 0 and r.error is not None]
    good = [i for i, r in enumerate(results) if r.video is not None]
    if train and not good:
        extra, more_skipped = fetch_more() if fetch_more is not None else ([], [])
        skipped += more_skipped
        if not extra:
            first = f"{skipped[0][1]}: {skipped[0][2]}" if skipped else "?"
            raise RuntimeError(
                f"epoch {job.epoch} batch {job.index}: its {len(results)} samples and the next "
                f"{len(job.lookahead)} are all unusable (first: {first}); the shards look broken"
            )
        results, good = [extra[0]] + results[1:], [0]
    slots = []
    for i, r in enumerate(results):
        if r.video is None and train:
            later = [j for j in good if j > i]
            r = results[later[0] if later else good[0]]
        slots.append(r)
    ref = next((r.video for r in slots if r.video is not None), None)
    zeros = torch.zeros(sample_shape, device=device) if ref is None else torch.zeros_like(ref)
    return {
        "video": torch.stack([r.video if r.video is not None else zeros for r in slots]),
        "label": torch.tensor([r.label if r.video is not None else -1 for r in slots], dtype=torch.int64),
        "key": [r.key for r in slots],
        "valid": torch.tensor([r.video is not None for r in slots], dtype=torch.bool),
        "skipped": skipped,
    }


def empty_shape(ctx: SampleContext, size: int) -> tuple[int, ...]:
    """Shape of one sample's video: ``[T, 3, S, S]``, or ``[V, T, 3, S, S]`` with several views."""
    shape = (ctx.num_frames, 3, size, size)
    return shape if (ctx.clips, ctx.crops) == (1, 1) else (ctx.clips * ctx.crops,) + shape


# --------------------------------------------------------------------------- loader


class VideoLoader:
    """One epoch per ``iter()``; resumable; see the module docstring for the contract."""

    def __init__(self, shards: ShardSet, partition: Partition, ctx: SampleContext, backend: Any,
                 split: str, num_classes: int | None, views: tuple[int, int], backend_name: str):  # fmt: skip
        self.shards = shards
        self.partition = partition
        self.ctx = ctx
        self.backend = backend
        self.backend_name = backend_name
        self.split = split
        self.num_classes = num_classes
        self.views = views
        self.batch_size = partition.batch_size
        self.epoch = 0
        self._batch = 0  # next batch of self.epoch to hand out
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
    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch, self._batch = epoch, 0

    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "batch": self._batch,
            "samples": self._batch * self.batch_size,
            "seed": self.ctx.seed,
            "world_size": self.partition.world,
            "batch_size": self.batch_size,
            "num_samples": self.num_samples,
            "bad": {self.shards.keys[g]: r for g, r in self._bad.items()},
        }

    def load_state_dict(self, d: dict[str, Any]) -> None:
        self.epoch = int(d["epoch"])
        batch = int(d["batch"])
        if int(d.get("num_samples", self.num_samples)) != self.num_samples:
            raise ValueError(f"loader state is for {d['num_samples']} samples, this split has {self.num_samples}")
        if int(d.get("seed", self.ctx.seed)) != self.ctx.seed:
            logger.warning("data: restoring a position saved with seed %s under seed %s", d["seed"], self.ctx.seed)
        old = (int(d.get("world_size", self.partition.world)), int(d.get("batch_size", self.batch_size)))
        if old != (self.partition.world, self.batch_size):
            # a different partition: continue after the same number of samples, not the same ones
            consumed = batch * old[0] * old[1]
            batch = consumed // (self.partition.world * self.batch_size)
            logger.warning("data: world size x batch changed %s -> %s; epoch %d continues at batch %d (approximate)",
                           old, (self.partition.world, self.batch_size), self.epoch, batch)  # fmt: skip
        if batch >= len(self):
            self.epoch, batch = self.epoch + 1, 0
        self._batch = batch
        index = {k: i for i, k in enumerate(self.shards.keys)} if d.get("bad") else {}
        for key, reason in d.get("bad", {}).items():
            if key in index:
                self._bad[index[key]] = reason
                self.skipped[key] = reason

    # -- iteration
    def __iter__(self) -> Iterator[dict[str, Any]]:
        epoch, start = self.epoch, self._batch
        jobs = self.partition.jobs(epoch, start, dict(self._bad))
        for batch in self.backend.run(jobs, epoch):
            self._record(batch.pop("skipped"))
            b = self._batch + 1
            if b >= len(self):
                self.epoch, self._batch = epoch + 1, 0
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
        close = getattr(self.backend, "close", None)
        if close is not None:
            close()
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
) -> VideoLoader:
    """A loader for ``split`` ("train" or "val") of this rank.

    ``views`` = (temporal clips, spatial crops) for val; train always uses one random
    view. ``backend="auto"`` picks DALI when ``device`` is CUDA, else the CPU backend.
    ``num_classes`` is checked against the shard manifest when both are known.
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
    tars, manifest = resolve_shards(spec_str, cfg.train_split if train else cfg.val_split)
    shards = ShardSet(tars, manifest)
    if manifest is not None and num_classes is not None and manifest.get("num_classes") not in (None, num_classes):
        raise ShardError(f"{spec_str}: shards have {manifest['num_classes']} classes, the run expects {num_classes}")
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
    partition = Partition(len(shards), cfg.batch_size, rank, world_size, train, seed)
    name = cfg.backend
    if name == "auto":
        name = "dali" if str(device).startswith("cuda") else "cpu"
    if name == "cpu":
        from claver_dist.data.cpu import CpuBackend

        backend = CpuBackend(shards, ctx, cfg, device)
    elif name == "dali":
        from claver_dist.data.dali import DaliBackend

        backend = DaliBackend(shards, ctx, cfg, device)
    else:
        raise ValueError(f"unknown data backend {name!r}")
    return VideoLoader(shards, partition, ctx, backend, split, num_classes, views, name)
