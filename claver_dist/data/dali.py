"""DALI backend: decode and augment on the GPU ('mixed' NVDEC) or, for VP8/VP9/MJPEG, the CPU.

The shared plan (``plan.py``) decides which samples form each batch, their frame
indices and their augmentation; this module reads each sample's bytes from its shard
(by offset, through the shard's DALI index) and feeds the batch to a DALI pipeline
through ``external_source``:

    encoded bytes --decoders.video(frames=TSN indices)--> [F, H, W, 3] uint8
      --resize(roi=crop box, S x S, linear, antialias)--> --coord_transform(M, o): colour
      --clamp 0..255--> --crop_mirror_normalize(mirror, CLIP mean/std, FCHW)--> [F, 3, S, S]

one resize branch per spatial crop view. Everything after the decoder runs on the
decoder's device. Why ``external_source`` and not ``readers.webdataset``: the reader
shards contiguously and shuffles through a buffer, so it can neither give the exact
per-sample permutation both backends share nor resume at an exact sample, and DALI
kills the whole pipeline on one undecodable sample with no skip option.

Surviving bad samples: every sample's size and crc32 are checked against its metadata
before it is fed (``data.verify_checksum``), which catches corruption after the build
without touching DALI. A sample that still kills the pipeline (e.g. bytes that were bad
when the shard was written) raises a critical error; the pipeline object is then dead.
The backend rebuilds it, re-runs the batches that were in flight one at a time, and
when one fails again it runs that batch's samples one by one in fresh pipelines to find
the culprits. Those are skipped (and remembered, so later epochs never feed them
again); the batch is completed by the plan's policy. Rebuilding a CPU pipeline takes
~10 ms, so this costs nothing until a bad sample appears.
"""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Iterator

import numpy as np
import torch

from claver_dist.data.augment import CLIP_MEAN, CLIP_STD
from claver_dist.data.config import DataConfig
from claver_dist.data import plan
from claver_dist.data.plan import BatchJob, Prepared, SampleResult
from claver_dist.data.shards import ShardSet
from claver_dist.errors import SampleError

try:
    import nvidia.dali.fn as fn
    import nvidia.dali.math as dmath
    import nvidia.dali.types as types
    from nvidia.dali.pipeline import Pipeline
except ImportError as e:  # pragma: no cover - DALI is a core dependency, but keep the message useful
    raise ImportError(
        "the DALI data backend needs NVIDIA DALI: pip install nvidia-dali-cuda120 (or set data.backend=cpu)"
    ) from e

logger = logging.getLogger("claver_dist.data")

CPU_CODECS = ("vp8", "vp9", "mjpeg")


@dataclass(eq=False)
class _Fed:
    """A batch job with its samples read and checked, as fed to the pipeline."""

    job: BatchJob
    slots: list[SampleResult]  # one per job.gids entry; final for pads and pre-check failures
    prepared: list[tuple[int, Prepared]] = field(default_factory=list)  # (slot, sample) fed to DALI


class DaliBackend:
    def __init__(self, shards: ShardSet, ctx: plan.SampleContext, cfg: DataConfig, device: str):
        self.shards, self.ctx = shards, ctx
        self.size = cfg.image_size
        self.batch_size = cfg.batch_size
        self.threads = max(1, cfg.num_workers)
        self.depth = max(1, cfg.prefetch)
        dev = torch.device(device)
        self.gpu = dev.type == "cuda"
        if self.gpu and not torch.cuda.is_available():
            raise RuntimeError(f"data backend dali on {device}: CUDA is not available")
        self.device = dev if self.gpu else torch.device("cpu")
        self.device_id = (dev.index if dev.index is not None else torch.cuda.current_device()) if self.gpu else None
        if not self.gpu:
            self._check_cpu_codec()
        self._pipe: Pipeline | None = None
        self.rebuilds = 0

    # -- pipeline
    def _check_cpu_codec(self) -> None:
        for i in range(min(len(self.shards), 8)):
            try:
                _, meta = self.shards.load(i, verify=False)
            except SampleError:
                continue
            codec = str(meta.get("codec", "")).lower()
            if codec and codec not in CPU_CODECS:
                raise ValueError(
                    f"DALI decodes only {'/'.join(CPU_CODECS)} on the CPU, but {self.shards.where(i)} is {codec}: "
                    "rebuild the shards with `make_shards.py --codec vp9`, run on a GPU, or set data.backend=cpu"
                )
            return

    def _build(self) -> Pipeline:
        crops, train = self.ctx.crops, self.ctx.train
        size = self.size
        pipe = Pipeline(
            batch_size=self.batch_size,
            num_threads=self.threads,
            device_id=self.device_id,
            # depth 1: with deeper queues DALI's first schedule_run runs `depth` iterations at
            # once, and a failure could not be pinned to one batch; read-ahead is done in Python.
            prefetch_queue_depth=1,
            seed=self.ctx.seed,
        )
        mean = [255 * m for m in CLIP_MEAN]
        std = [255 * s for s in CLIP_STD]
        with pipe:
            enc = fn.external_source(name="encoded", dtype=types.UINT8, ndim=1, no_copy=False)
            frames = fn.external_source(name="frames", dtype=types.INT32, ndim=1)
            video = fn.decoders.video(enc, device="mixed" if self.gpu else "cpu", frames=frames)
            outs = []
            for c in range(crops):
                lo = fn.external_source(name=f"roi_start{c}", dtype=types.FLOAT, ndim=1)
                hi = fn.external_source(name=f"roi_end{c}", dtype=types.FLOAT, ndim=1)
                v = fn.resize(video, size=[size, size], roi_start=lo, roi_end=hi, roi_relative=False,
                              interp_type=types.INTERP_LINEAR, antialias=True, dtype=types.FLOAT)  # fmt: skip
                mirror = 0
                if train:
                    color = fn.external_source(name="color", dtype=types.FLOAT, ndim=2)
                    offset = fn.external_source(name="offset", dtype=types.FLOAT, ndim=1)
                    mirror = fn.external_source(name="mirror", dtype=types.INT32, ndim=0)
                    v = fn.coord_transform(v, M=color, T=offset)
                v = dmath.clamp(v, 0.0, 255.0)
                v = fn.crop_mirror_normalize(v, mirror=mirror, mean=mean, std=std, output_layout="FCHW", dtype=types.FLOAT)
                outs.append(v)
            pipe.set_outputs(fn.stack(*outs) if crops > 1 else outs[0])
        pipe.build()
        return pipe

    def _pipeline(self) -> Pipeline:
        if self._pipe is None:
            self._pipe = self._build()
        return self._pipe

    def _reset(self) -> None:
        self._pipe = None  # a pipeline that raised is dead; drop it and build a new one lazily
        self.rebuilds += 1

    def _feed(self, pipe: Pipeline, samples: list[Prepared]) -> None:
        pipe.feed_input("encoded", [np.frombuffer(p.data, np.uint8) for p in samples])
        pipe.feed_input("frames", [np.asarray(p.indices, np.int32) for p in samples])
        for c in range(self.ctx.crops):
            # DALI's roi is in the order of the spatial dims of the layout: (y, x) for FHWC
            pipe.feed_input(f"roi_start{c}", [np.array([p.params.boxes[c][1], p.params.boxes[c][0]], np.float32) for p in samples])
            pipe.feed_input(f"roi_end{c}", [np.array([p.params.boxes[c][1] + p.params.boxes[c][3],
                                                      p.params.boxes[c][0] + p.params.boxes[c][2]], np.float32)
                                            for p in samples])  # fmt: skip
        if self.ctx.train:
            pipe.feed_input("color", [p.params.color for p in samples])
            pipe.feed_input("offset", [p.params.offset for p in samples])
            pipe.feed_input("mirror", [np.array(int(p.params.flip), np.int32) for p in samples])

    def _to_torch(self, out) -> torch.Tensor:
        tl = out[0].as_tensor()
        if self.gpu:
            from nvidia.dali.plugin.pytorch import feed_ndarray

            t = torch.empty(tl.shape(), dtype=torch.float32, device=self.device)
            feed_ndarray(tl, t, cuda_stream=torch.cuda.current_stream(self.device))
            return t
        return torch.from_numpy(np.array(tl))

    def _views(self, x: torch.Tensor) -> torch.Tensor:
        return plan.to_views(x, self.ctx.clips, self.ctx.crops, self.ctx.num_frames)

    # -- running batches
    def _read(self, job: BatchJob, epoch: int) -> _Fed:
        fed = _Fed(job, [])
        for slot, gid in enumerate(job.gids):
            final = plan.slot_result(self.shards, gid, job)
            if final is not None:
                fed.slots.append(final)
                continue
            key = self.shards.keys[gid]
            try:
                p = plan.prepare(self.shards, gid, epoch, self.ctx)
                if int(p.meta.get("rotation", 0)):
                    raise SampleError(f"stored with a display rotation of {p.meta['rotation']} degrees (make_shards "
                                      "--copy), which DALI's decoder does not apply: rebuild without --copy")
            except SampleError as e:
                fed.slots.append(SampleResult(gid, key, error=str(e)))
                continue
            fed.slots.append(SampleResult(gid, key, p.label, caption=p.caption))
            fed.prepared.append((slot, p))
        return fed

    def _run_isolated(self, fed: _Fed) -> None:
        """Run one batch in its own fresh pipeline; if it fails, find its bad samples one by one.

        Never the main pipeline: it may have the next batch in flight.
        """
        samples = [p for _, p in fed.prepared]
        try:
            pipe = self._build()
            self._feed(pipe, samples)
            pipe.schedule_run()
            self._fill(fed, self._views(self._to_torch(pipe.outputs())))
            return
        except Exception:  # noqa: BLE001 - any DALI failure means "find the bad sample"
            self.rebuilds += 1
        for slot, p in fed.prepared:
            try:
                pipe = self._build()
                self._feed(pipe, [p])
                pipe.schedule_run()
                fed.slots[slot].video = self._views(self._to_torch(pipe.outputs()))[0]
            except Exception as e:  # noqa: BLE001
                self.rebuilds += 1
                msg = str(e).strip().splitlines()
                detail = next((m for m in msg if "rror" in m and "Critical" not in m), msg[0] if msg else "")
                fed.slots[slot].error = f"DALI decode failed: {detail.strip()[:200]}"
        fed.prepared = []

    def _fill(self, fed: _Fed, x: torch.Tensor) -> None:
        for k, (slot, _) in enumerate(fed.prepared):
            fed.slots[slot].video = x[k]
        fed.prepared = []

    def _finish(self, fed: _Fed, epoch: int) -> dict[str, Any]:
        def load_one(gid: int) -> SampleResult:
            extra = self._read(BatchJob(epoch, -1, [gid], known_bad=fed.job.known_bad), epoch)
            if extra.prepared:
                self._run_isolated(extra)
            return extra.slots[0]

        return plan.finish_batch(fed.job, fed.slots, self.ctx, self.size, self.device, load_one)

    def run(self, jobs: Iterator[BatchJob], epoch: int) -> Iterator[dict[str, Any]]:
        # One batch runs in DALI while the consumer works on the previous one; `prefetch`
        # more are read and checked ahead. A single batch in flight keeps failures
        # attributable: when the pipeline dies, the culprit is in the batch it was running.
        jobs = iter(jobs)
        pending: deque[_Fed] = deque()  # read, in job order
        flying: _Fed | None = None  # fed and scheduled, outputs not taken yet

        def top_up() -> None:
            while len(pending) <= self.depth:
                job = next(jobs, None)
                if job is None:
                    return
                pending.append(self._read(job, epoch))

        def launch() -> None:
            nonlocal flying
            if flying is not None:
                return
            for fed in pending:
                if not fed.prepared:
                    continue
                try:
                    pipe = self._pipeline()
                    self._feed(pipe, [p for _, p in fed.prepared])
                    pipe.schedule_run()
                    flying = fed
                    return
                except Exception:  # noqa: BLE001
                    self._recover(fed)

        while True:
            top_up()
            if not pending:
                return
            launch()
            head = pending.popleft()
            if head.prepared:  # it is the batch in flight
                try:
                    self._fill(head, self._views(self._to_torch(self._pipeline().outputs())))
                except Exception:  # noqa: BLE001
                    self._recover(head)
                flying = None
            top_up()
            launch()  # start the next batch before handing this one out
            yield self._finish(head, epoch)

    def _recover(self, fed: _Fed) -> None:
        """The pipeline died on ``fed``: rebuild, and re-run it sample by sample if needed."""
        self._reset()
        logger.warning("data: DALI pipeline failed on epoch %d batch %d; rebuilding it and isolating the bad sample",
                       fed.job.epoch, fed.job.index)  # fmt: skip
        self._run_isolated(fed)

    def close(self) -> None:
        self._pipe = None
