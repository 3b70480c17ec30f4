"""CPU backend: PyAV decoding and torch augmentation in DataLoader worker processes (any codec).

Each DataLoader item is one whole batch (a ``loader.BatchJob``): a worker reads its
samples from the shards by offset, decodes exactly the planned frame indices with PyAV
(``video.decode_frames``), applies the shared augmentation contract
(``augment.apply_views``) and assembles the batch with the bad-sample policy
(``loader.assemble``), so a bad sample is handled where it is found. Batches come back
in job order; the main process only counts and logs what was skipped.

Workers are persistent across epochs and single-threaded (torch and FFmpeg), since
parallelism comes from the workers themselves.
"""

from __future__ import annotations

import logging
from typing import Any, Iterator

import torch

from claver_dist.data.augment import apply_views
from claver_dist.data.config import DataConfig
from claver_dist.data.loader import BatchJob, SampleContext, SampleResult, assemble, empty_shape, prepare
from claver_dist.data.shards import SampleError, ShardSet
from claver_dist.data.video import VideoError, decode_frames

logger = logging.getLogger("claver_dist.data")


def decode_sample(shards: ShardSet, gid: int, epoch: int, ctx: SampleContext, size: int) -> SampleResult:
    """One sample -> ``[T, 3, S, S]`` (or ``[V, T, 3, S, S]``), or a result carrying the error."""
    key = shards.keys[gid]
    try:
        p = prepare(shards, gid, epoch, ctx)
        frames = decode_frames(p.data, p.indices, cfr=bool(p.meta.get("cfr")), keyint=int(p.meta.get("keyint", 0)))
        if frames.shape[1:3] != (p.meta["height"], p.meta["width"]):
            raise SampleError(f"decoded {frames.shape[2]}x{frames.shape[1]}, metadata says {p.meta['width']}x{p.meta['height']}")
        v = apply_views(frames, p.params, size)  # [crops, clips*T, 3, S, S]
    except (SampleError, VideoError) as e:
        return SampleResult(gid, key, error=str(e))
    except Exception as e:  # noqa: BLE001 - garbage input can surface anywhere in a decoder stack
        return SampleResult(gid, key, error=f"unexpected {type(e).__name__}: {e}")
    clips, crops, t = ctx.clips, ctx.crops, ctx.num_frames
    if (clips, crops) == (1, 1):
        v = v[0]
    else:
        s = v.shape[-1]
        v = v.reshape(crops, clips, t, 3, s, s).transpose(0, 1).reshape(clips * crops, t, 3, s, s)
    return SampleResult(gid, key, p.label, v.contiguous())


class _Batches(torch.utils.data.Dataset):
    """Map-style dataset whose index is a BatchJob and whose item is a finished batch."""

    def __init__(self, shards: ShardSet, ctx: SampleContext, size: int):
        self.shards, self.ctx, self.size = shards, ctx, size

    def __len__(self) -> int:  # not used for sampling; the sampler yields BatchJobs
        return len(self.shards)

    def _one(self, gid: int, job: BatchJob) -> SampleResult:
        if gid < 0:
            return SampleResult(gid, "")
        if gid in job.known_bad:
            return SampleResult(gid, self.shards.keys[gid], error=job.known_bad[gid])
        return decode_sample(self.shards, gid, job.epoch, self.ctx, self.size)

    def __getitem__(self, job: BatchJob) -> dict[str, Any]:
        results = [self._one(g, job) for g in job.gids]

        def fetch_more():
            skipped = []
            for g in job.lookahead:
                r = self._one(g, job)
                if r.video is not None:
                    return [r], skipped
                skipped.append((r.gid, r.key, r.error))
            return [], skipped

        return assemble(job, results, self.ctx.train, empty_shape(self.ctx, self.size), "cpu", fetch_more)


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


class CpuBackend:
    def __init__(self, shards: ShardSet, ctx: SampleContext, cfg: DataConfig, device: str):
        self.dataset = _Batches(shards, ctx, cfg.image_size)
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
