"""CPU backend: PyAV decoding and torch augmentation in DataLoader worker processes (any codec).

Each DataLoader item is one whole batch (a ``plan.BatchJob``): a worker reads its
samples from the shards by offset, decodes exactly the planned frame indices with PyAV
(``video.decode_frames``), crops and resizes them in uint8 (``augment.crop_resize``) and
assembles the batch with the bad-sample policy (``plan.finish_batch``), so a bad sample is
handled where it is found. Flip, colour and normalisation (``plan.finish_pixels``) run
batched in the worker for a CPU run, or on the GPU after the uint8 batch crossed the bus
(a quarter of float32's bytes) for a GPU run. Batches come back
in job order; the main process only counts and logs what was skipped.

Workers are persistent across epochs and single-threaded (torch and FFmpeg), since
parallelism comes from the workers themselves.
"""

from __future__ import annotations

import logging
import signal
from typing import Any, Iterator

import torch

from claver_dist.data.augment import crop_resize, sample_colors
from claver_dist.data.config import DataConfig
from claver_dist.data.plan import (BatchJob, Prepared, SampleContext, SampleResult, finish_batch, finish_pixels,
                                   prepare, slot_result, to_views)
from claver_dist.data.shards import ShardSet
from claver_dist.data.video import decode_frames
from claver_dist.errors import SampleError, VideoError

logger = logging.getLogger("claver_dist.data")


def decode_sample(shards: ShardSet, gid: int, epoch: int, ctx: SampleContext, size: int) -> SampleResult:
    """One sample -> uint8 ``[T, 3, S, S]`` (or ``[V, T, 3, S, S]``) cropped and resized, with
    its flip and colour still to apply (``plan.finish_pixels``), or a result carrying the error."""
    try:
        p = prepare(shards, gid, epoch, ctx)
    except (SampleError, VideoError) as e:
        return SampleResult(gid, shards.keys[gid], error=str(e))
    return decode_prepared(p, ctx, size)


def decode_prepared(p: Prepared, ctx: SampleContext, size: int) -> SampleResult:
    """``decode_sample`` for a sample already read and prepared (``plan.prepare_loaded``)."""
    try:
        frames = decode_frames(p.data, p.indices, cfr=bool(p.meta.get("cfr")), keyint=int(p.meta.get("keyint", 0)))
        if frames.shape[1:3] != (p.meta["height"], p.meta["width"]):
            raise SampleError(f"decoded {frames.shape[2]}x{frames.shape[1]}, metadata says {p.meta['width']}x{p.meta['height']}")
        v = crop_resize(frames, p.params, size)  # uint8 [crops, clips*T, 3, S, S]
    except (SampleError, VideoError) as e:
        return SampleResult(p.gid, p.key, error=str(e))
    except Exception as e:  # noqa: BLE001 - garbage input can surface anywhere in a decoder stack
        return SampleResult(p.gid, p.key, error=f"unexpected {type(e).__name__}: {e}")
    v = to_views(v[None], ctx.clips, ctx.crops, ctx.num_frames)[0]
    return SampleResult(p.gid, p.key, p.label, v.contiguous(), colors=sample_colors(p.params), caption=p.caption)


class _Batches(torch.utils.data.Dataset):
    """Map-style dataset whose index is a BatchJob and whose item is a finished batch."""

    def __init__(self, shards: ShardSet, ctx: SampleContext, size: int, finish_in_worker: bool):
        self.shards, self.ctx, self.size = shards, ctx, size
        self.finish_in_worker = finish_in_worker

    def __len__(self) -> int:  # not used for sampling; the sampler yields BatchJobs
        return len(self.shards)

    def _one(self, gid: int, job: BatchJob) -> SampleResult:
        return slot_result(self.shards, gid, job) or decode_sample(self.shards, gid, job.epoch, self.ctx, self.size)

    def __getitem__(self, job: BatchJob) -> dict[str, Any]:
        results = [self._one(g, job) for g in job.gids]
        batch = finish_batch(job, results, self.ctx, self.size, "cpu", lambda g: self._one(g, job))
        return finish_pixels(batch) if self.finish_in_worker else batch


class _JobSampler(torch.utils.data.Sampler):
    """Yields the BatchJobs of the current iteration (set by the backend before each epoch)."""

    def __init__(self):
        self.jobs: list[BatchJob] = []

    def __iter__(self) -> Iterator[BatchJob]:
        return iter(self.jobs)

    def __len__(self) -> int:
        return len(self.jobs)


def _identity(x: Any) -> Any:
    return x


def _worker_context():
    # Workers come from a fork server, not from a fork of this process: forking a process
    # that already runs threads (torch/OpenMP pools, DALI, NCCL, gloo) can leave a lock held
    # forever in the child, which showed up as DataLoader hangs. The server preloads torch
    # and this module once, so starting workers stays cheap.
    import multiprocessing as mp

    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "av", "claver_dist.data.cpu"])
    return ctx


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)
    # SLURM signals every process of a job step (scancel, the time-limit warning) and a
    # terminal's Ctrl-C every process of its group: a data worker must not die of them. Its
    # trainer checkpoints and shuts it down.
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(sig, signal.SIG_IGN)


class CpuBackend:
    """``finish_in_worker``: flip, colour and normalise in the workers (float32 batches), the
    default for a CPU device; else the batches carry uint8 pixels and their colours, and the
    loader finishes them on the device (``plan.finish_pixels``): the default for a GPU."""

    def __init__(self, shards: ShardSet, ctx: SampleContext, cfg: DataConfig, device: str,
                 finish_in_worker: bool | None = None):  # fmt: skip
        if finish_in_worker is None:
            finish_in_worker = not str(device).startswith("cuda")
        self.dataset = _Batches(shards, ctx, cfg.image_size, finish_in_worker)
        self.sampler = _JobSampler()
        workers = cfg.num_workers
        self.loader = torch.utils.data.DataLoader(
            self.dataset,
            batch_size=None,
            sampler=self.sampler,
            num_workers=workers,
            collate_fn=_identity,
            pin_memory=str(device).startswith("cuda"),
            worker_init_fn=_worker_init if workers else None,
            persistent_workers=workers > 0,
            prefetch_factor=cfg.prefetch if workers else None,
            multiprocessing_context=_worker_context() if workers else None,
        )

    def run(self, jobs: Iterator[BatchJob], epoch: int) -> Iterator[dict[str, Any]]:
        self.sampler.jobs = list(jobs)
        if not self.sampler.jobs:
            return
        yield from self.loader

    def close(self) -> None:
        it = getattr(self.loader, "_iterator", None)
        if it is not None and hasattr(it, "_shutdown_workers"):
            it._shutdown_workers()
        self.loader._iterator = None
