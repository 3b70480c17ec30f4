"""The batch plan both loader backends share: which samples form each batch of a rank, how
each is read and augmented, and how a batch is assembled when some of its samples are bad.

    partition = Partition(num_samples, batch_size, rank, world_size, train=True, seed=0)
    for job in partition.jobs(epoch, start_batch, known_bad):   # BatchJob: sample ids + lookahead
        results = [slot_result(shards, g, job) or load_one(g) for g in job.gids]  # load_one: the backend's
        batch = finish_batch(job, results, ctx, size, device, load_one)          # the bad-sample policy

A backend (``cpu.py``, ``dali.py``) only turns :class:`Prepared` samples into pixels; the
order, the per-sample randomness and the bad-sample policy live here, so both backends
produce the same batches (see ``loader.py`` for the policy in words).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Protocol

import numpy as np
import torch
from einops import rearrange

from claver_dist.data.augment import AugmentSpec, ViewParams, draw_params, finish_views
from claver_dist.data.sampling import STREAM_AUGMENT, STREAM_FRAMES, clip_indices, pick_caption, sample_rng
from claver_dist.data.shards import ShardSet
from claver_dist.errors import SampleError, ShardError

# A train batch whose every sample is bad looks this far ahead in the rank's order for a
# replacement; more consecutive bad samples than this means the shards are broken.
MAX_LOOKAHEAD = 64

Skipped = tuple[int, str, str]  # (sample id, key, reason)


# --------------------------------------------------------------------------- per sample


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
    caption: str | None = None  # captioned shards: this epoch's caption (sampling.pick_caption)


def prepare(shards: ShardSet, gid: int, epoch: int, ctx: SampleContext) -> Prepared:
    """Read sample ``gid`` and draw its frames/augmentation; raises SampleError if unusable."""
    data, meta = shards.load(gid, verify=ctx.verify)
    return prepare_loaded(gid, shards.keys[gid], data, meta, epoch, ctx)


def prepare_loaded(gid: int, key: str, data: bytes, meta: dict[str, Any], epoch: int, ctx: SampleContext) -> Prepared:
    """A sample already read and checked (``shards.check_meta``/``check_video``): draw its
    frames, augmentation and caption from its own streams (``sampling.sample_rng``)."""
    total = int(meta["frames"])
    try:
        width, height = int(meta["width"]), int(meta["height"])
    except (KeyError, ValueError) as e:
        raise SampleError(f"metadata lacks frame size: {e!r}") from e
    rng = sample_rng(ctx.seed, epoch, key, STREAM_FRAMES) if ctx.train else None
    indices = clip_indices(total, ctx.num_frames, ctx.train, ctx.clips, rng)
    arng = sample_rng(ctx.seed, epoch, key, STREAM_AUGMENT) if ctx.train else None
    params = draw_params(ctx.spec, width, height, ctx.train, ctx.crops, arng)
    caption = pick_caption(meta["captions"], ctx.seed, epoch, key, ctx.train) if "captions" in meta else None
    return Prepared(gid, key, int(meta["label"]), data, meta, indices, params, caption)


@dataclass
class SampleResult:
    gid: int
    key: str
    label: int = -1
    video: torch.Tensor | None = None  # [T, 3, S, S] or [V, T, 3, S, S]: float, or uint8 with colors
    error: str | None = None
    # a uint8 video's flip and colour (augment.sample_colors), applied by finish_pixels
    colors: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
    caption: str | None = None


def to_views(x: torch.Tensor, clips: int, crops: int, num_frames: int) -> torch.Tensor:
    """Decoded views ``[n, crops, clips*T, 3, S, S]`` (crop axis optional when ``crops == 1``)
    -> ``[n, T, 3, S, S]`` for one view, else ``[n, clips*crops, T, 3, S, S]`` clip-major."""
    if x.dim() == 5:
        x = x[:, None]
    if (clips, crops) == (1, 1):
        return x[:, 0]
    return rearrange(x, "n crop (clip t) c h w -> n (clip crop) t c h w", crop=crops, t=num_frames)


def empty_shape(ctx: SampleContext, size: int) -> tuple[int, ...]:
    """Shape of one sample's video: ``[T, 3, S, S]``, or ``[V, T, 3, S, S]`` with several views."""
    shape = (ctx.num_frames, 3, size, size)
    return shape if (ctx.clips, ctx.crops) == (1, 1) else (ctx.clips * ctx.crops,) + shape


# --------------------------------------------------------------------------- per rank and epoch


@dataclass
class BatchJob:
    """One batch to produce: sample ids (-1 = val padding) and train replacements."""

    epoch: int
    index: int
    gids: list[int]
    lookahead: list[int] = field(default_factory=list)
    known_bad: dict[int, str] = field(default_factory=dict)


class Partition:
    """The epoch plan of one rank (see ``loader.py`` for the policy).

    ``multiple_of`` (train): the batch count per epoch is rounded down to a multiple of it,
    the gradient accumulation, so that an epoch ends on an optimiser-step boundary."""

    def __init__(self, num_samples: int, batch_size: int, rank: int, world_size: int, train: bool, seed: int,
                 multiple_of: int = 1):  # fmt: skip
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} out of range for world size {world_size}")
        if multiple_of < 1:
            raise ValueError(f"multiple_of must be >= 1, got {multiple_of}")
        self.n, self.batch_size, self.rank, self.world, self.train, self.seed = (
            num_samples, batch_size, rank, world_size, train, seed)  # fmt: skip
        self.multiple_of = multiple_of
        if train:
            self.per_rank = num_samples // world_size
            self.num_batches = self.batches_from(0)
            if self.num_batches == 0:
                accum = f" x grad_accum = {batch_size} x {world_size} x {multiple_of}" if multiple_of > 1 else \
                    f" = {batch_size} x {world_size}"
                raise ShardError(
                    f"train split has {num_samples} samples: fewer than batch_size x world_size{accum}; "
                    "lower data.batch_size"
                )
        else:
            self.per_rank = math.ceil(num_samples / world_size)
            self.num_batches = math.ceil(self.per_rank / batch_size)

    def batches_from(self, start: int) -> int:
        """Train batches of this rank from position ``start`` of the epoch's permutation to its end.

        Batch b of every rank together takes positions ``[start + b*W*B, start + (b+1)*W*B)``
        of the permutation (ranks interleave), so the first k batches of all ranks are a
        prefix of it: a run resumed at another world size or batch continues from the
        position where the old layout stopped (``start``) and covers the rest of the
        epoch exactly once, up to the drop at its end."""
        if not self.train:
            return self.num_batches
        return (self.n - start) // self.world // self.batch_size // self.multiple_of * self.multiple_of

    def order(self, epoch: int, start: int = 0) -> np.ndarray:
        """This rank's sample ids for ``epoch`` from position ``start`` of the epoch's
        permutation (train), or its val slice padded with -1 to full batches."""
        if self.train:
            perm = np.random.default_rng(np.random.SeedSequence([self.seed & 0xFFFFFFFF, epoch, 0x5EED])).permutation(self.n)
            return perm[start:][self.rank :: self.world][: self.batches_from(start) * self.batch_size]
        mine = np.arange(self.rank, self.n, self.world)
        return np.concatenate([mine, np.full(self.num_batches * self.batch_size - len(mine), -1)])

    def jobs(self, epoch: int, first: int, known_bad: dict[int, str], start: int = 0) -> Iterator[BatchJob]:
        """Batches ``first``, ``first + 1``, ... of the layout that begins at permutation position ``start``."""
        order = self.order(epoch, start).tolist()
        B = self.batch_size
        for b in range(first, len(order) // B):
            gids = order[b * B : (b + 1) * B]
            ahead = (order[(b + 1) * B :] + order[: b * B])[:MAX_LOOKAHEAD] if self.train else []
            bad = {g: known_bad[g] for g in gids + ahead if g in known_bad}
            yield BatchJob(epoch, b, gids, ahead, bad)


# --------------------------------------------------------------------------- bad-sample policy


def slot_result(shards: ShardSet, gid: int, job: BatchJob) -> SampleResult | None:
    """The final result of a slot that needs no decoding (val padding, a sample known to be
    bad from an earlier epoch), else None."""
    if gid < 0:
        return SampleResult(gid, "")
    if gid in job.known_bad:
        return SampleResult(gid, shards.keys[gid], error=job.known_bad[gid])
    return None


def fetch_replacement(lookahead: list[int], load_one: Callable[[int], SampleResult]) -> tuple[list[SampleResult], list[Skipped]]:
    """The first good sample along ``lookahead`` (for a train batch with no good sample left),
    and every bad one passed on the way."""
    skipped: list[Skipped] = []
    for gid in lookahead:
        r = load_one(gid)
        if r.video is not None:
            return [r], skipped
        skipped.append((r.gid, r.key, r.error or "?"))
    return [], skipped


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
    batch = {
        "video": torch.stack([r.video if r.video is not None else zeros for r in slots]),
        "label": torch.tensor([r.label if r.video is not None else -1 for r in slots], dtype=torch.int64),
        "key": [r.key for r in slots],
        "valid": torch.tensor([r.video is not None for r in slots], dtype=torch.bool),
        "skipped": skipped,
    }
    if any(r.caption is not None for r in slots):  # captioned shards: one caption per slot
        batch["caption"] = [r.caption if r.video is not None and r.caption is not None else "" for r in slots]
    if ref is not None and ref.dtype == torch.uint8:  # pixels still to finish (finish_pixels)
        plain = (torch.eye(3), torch.zeros(3), torch.tensor(False))
        colors = [r.colors if r.video is not None and r.colors is not None else plain for r in slots]
        batch["color"], batch["offset"], batch["flip"] = (torch.stack(c) for c in zip(*colors))
    return batch


def finish_pixels(batch: dict[str, Any], device: torch.device | str | None = None) -> dict[str, Any]:
    """A batch of uint8 pixels (``assemble`` with ``color``/``offset``/``flip``) -> float32
    video on ``device`` (flip, colour, normalisation: ``augment.finish_views``), slots that
    are not valid zero as ever. A float batch is only moved. Moving uint8 and finishing
    there sends a quarter of the bytes to the GPU and no host synchronisation is needed."""
    video = batch["video"].to(device, non_blocking=True) if device is not None else batch["video"]
    if "color" in batch:
        video = finish_views(video, batch.pop("color"), batch.pop("offset"), batch.pop("flip"))
        valid = batch["valid"].to(video.device, non_blocking=True)
        video = video * valid.view(-1, *[1] * (video.ndim - 1))
    batch["video"] = video
    return batch


def finish_batch(job: BatchJob, results: list[SampleResult], ctx: SampleContext, size: int,
                 device: torch.device | str, load_one: Callable[[int], SampleResult]) -> dict[str, Any]:
    """``assemble`` with the plan's replacement: ``load_one(gid)`` reads and decodes one sample
    of ``job.lookahead`` (the backend's own way) when a train batch has no good sample left."""
    return assemble(job, results, ctx.train, empty_shape(ctx, size), device,
                    lambda: fetch_replacement(job.lookahead, load_one))


class Backend(Protocol):
    """What a loader backend provides: finished batches for a sequence of jobs, in job order."""

    def run(self, jobs: Iterator[BatchJob], epoch: int) -> Iterator[dict[str, Any]]:
        """One batch dict (``assemble``'s, with ``skipped``) per job."""
        ...

    def close(self) -> None:
        """Stop workers and free pipelines."""
        ...
