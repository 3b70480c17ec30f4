"""Streaming shards from object storage: every shard read start to end in one request.

    data.train_shards: s3://bucket/k400      # a shard folder (manifest.json) under any fsspec URL
    loader = build_loader(cfg.data, "train", rank, world, seed=cfg.seed)   # a StreamLoader

The random-access loader (``loader.py``) reads any sample by byte offset, which an object
store turns into one request per sample. Here shards are opened through fsspec
(``s3://``, ``gs://``, ``http(s)://``, local paths), or through a shell command
(``data.stream_command``, webdataset's ``pipe:``), and read sequentially; webdataset
parses the tar stream (``tar_file_iterator``, ``group_by_keys``). What this module adds is
the bookkeeping webdataset lacks for an exact position, and it replaces three of its stages
for that reason: ``split_by_node``/``split_by_worker`` read the calling process's own rank and
worker from its environment, while the plan needs every rank's and stream's shards (equal
batch counts across ranks, a re-split after a layout change), so it applies their rule with
explicit indices (a test checks it against them); ``detshuffle`` seeds with ``seed + epoch``,
so neighbouring seeds share orders; and a rolling ``shuffle`` buffer's contents depend on
everything read before, so it cannot be restored without replaying the epoch. Everything
follows from the manifest's per-shard sample counts, never from what was read:

- **Streams.** Each rank reads through ``max(1, data.num_workers)`` streams, one per
  DataLoader worker. Epoch ``e``'s shard order is a permutation drawn from ``(seed, e)``
  (val: the manifest's order); rank ``r`` takes shards ``r, r + world, ...`` of it and its
  stream ``w`` every ``workers``-th of those (webdataset's ``split_by_node`` then
  ``split_by_worker``): ranks and workers read disjoint shards.
- **Shuffle.** A stream's samples pass a shuffle buffer of ``data.stream_buffer``
  samples: blocks of that many consecutive samples, each permuted by
  ``(seed, epoch, its first shard and offset)``. Unlike a rolling buffer, a block can be
  refilled from its start, which is what makes the position exact.
- **Length.** A stream holding ``c`` shards is planned for the ``c`` smallest shards of
  the split, so every rank has the same number of train batches in every epoch (the
  smallest rank's, rounded down to a multiple of ``grad_accum``): ``len(loader)``. Each
  epoch the streams' batches are cut, largest first, to that count; the samples left over
  are dropped for this epoch. Val: a stream gives ``ceil(n / B)`` batches, the last padded
  with ``valid=False`` slots, and a rank ends with empty batches up to the longest rank.
  A rank's batches take its streams in turn (0, 1, ..., skipping finished ones).
- **Position.** ``state_dict()`` holds the epoch and the batches handed out; stream ``w``
  then stands at sample ``d_w * B`` of its sequence (``state_dict()["streams"]``: shard and
  offset in it). A restored loader reopens each stream's shard at the start of the block
  holding that sample, skips the samples before it (read, not decoded), refills the block
  and goes on with the same samples in the same order.
- **Failures.** Bad samples are skipped and counted as in ``loader.py``. A read that fails
  (a dropped connection, a shard shorter than its manifest entry) is retried
  ``data.stream_retries`` times, each reopening the shard and skipping what was read; then
  the shard's unread samples count as bad (``URL#i``) and the stream goes on. A train
  batch with no good sample takes the first good one of its block.
- **Another layout** (world size, workers, batch) restored mid-epoch: the shards the old
  streams had started are left out for the rest of the epoch (the number of samples is
  logged) and the others are split over the new streams; nothing is read twice.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shlex
import time
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
import torch

from claver_dist.data.config import DataConfig
from claver_dist.data.plan import (MAX_LOOKAHEAD, BatchJob, SampleContext, SampleResult, assemble, empty_shape, finish_pixels,
                                   prepare_loaded)
from claver_dist.data.shards import FORMAT, MANIFEST, VIDEO_EXTS, check_meta, check_video
from claver_dist.errors import SampleError, ShardError, VideoError

logger = logging.getLogger("claver_dist.data")

SCHEMES = ("s3://", "gs://", "gcs://", "http://", "https://", "file://")
# environment variables that configure fsspec and its storage backends (endpoints, credentials)
STORAGE_ENV = ("AWS_", "FSSPEC_", "GOOGLE_", "GCSFS_", "STORAGE_EMULATOR_HOST", "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY",
               "http_proxy", "https_proxy", "no_proxy")


def is_url(spec: str) -> bool:
    """A shard location the streaming loader reads (``data.access: auto``)."""
    return spec.startswith(SCHEMES)


def _open(url: str, command: str = ""):
    """A binary file object reading ``url``: through ``command`` (webdataset's ``pipe:``,
    ``{url}`` replaced by the quoted URL) when one is given, else through fsspec."""
    if command:
        from webdataset.gopen import gopen

        return gopen("pipe:" + command.format(url=shlex.quote(url)), "rb")
    import fsspec

    # HTTP: one streamed GET per shard (fsspec's default issues a range request per block)
    kw = {"block_size": 0} if url.startswith(("http://", "https://")) else {}
    return fsspec.open(url, "rb", **kw).open()


def _join(folder: str, name: str) -> str:
    return folder.rstrip("/") + "/" + name


@dataclass(frozen=True)
class StreamShard:
    url: str
    samples: int


def stream_shards(spec: str, split: str, command: str = "") -> tuple[list[StreamShard], dict[str, Any]]:
    """The shards of ``split`` in the shard folder at URL (or path) ``spec``, from its manifest
    (read through ``command`` when one is given, see ``_open``)."""
    url = _join(spec, MANIFEST)
    try:
        with _open(url, command) as f:
            manifest = json.loads(f.read())
    except Exception as e:  # noqa: BLE001 - fsspec backends raise their own error types
        raise ShardError(f"{url}: cannot read the shard manifest ({type(e).__name__}: {e}); a streamed shard set is "
                         "the folder tools/make_shards.py wrote, copied as it is") from e
    if manifest.get("format") != FORMAT:
        raise ShardError(f"{url}: unknown format {manifest.get('format')!r} (expected {FORMAT!r})")
    splits = manifest.get("splits", {})
    if split not in splits:
        raise ShardError(f"{url}: no split {split!r} (has {sorted(splits)})")
    return [StreamShard(_join(spec, s["tar"]), int(s["samples"])) for s in splits[split]["shards"]], manifest


# --------------------------------------------------------------------------- reading one shard


def read_shard(url: str, expected: int, skip: int, retries: int, command: str = "",
               backoff_s: float = 0.5) -> Iterator[dict[str, Any]]:  # fmt: skip
    """Samples ``skip, ..., expected - 1`` of one shard (webdataset sample dicts), in order.

    A failed read is retried ``retries`` times (reopen, skip what was read); after that
    every unread sample comes as ``{"__key__": "URL#i", "__error__": reason}``."""
    from webdataset.tariterators import group_by_keys, tar_file_iterator

    k, failures = skip, 0
    while k < expected:
        try:
            with _open(url, command) as f:
                files = ({**x, "__url__": url} for x in tar_file_iterator(f))
                for i, sample in enumerate(group_by_keys(files)):
                    if i >= expected:
                        logger.warning("data: %s holds more samples than the manifest's %d; the rest is not read",
                                       url, expected)  # fmt: skip
                        break
                    if i >= k:
                        k = i + 1
                        yield sample
            if k < expected:
                raise OSError(f"the stream ended after {k} of the {expected} samples the manifest lists")
        except Exception as e:  # noqa: BLE001 - network and tar errors come in many types (aiohttp, botocore, tarfile)
            failures += 1
            reason = f"{type(e).__name__}: {e}".splitlines()[0][:300]
            if failures > retries:
                logger.warning("data: %s: giving up after %d retries at sample %d of %d (%s)", url, retries, k,
                               expected, reason)  # fmt: skip
                for i in range(k, expected):
                    yield {"__key__": f"{url}#{i}", "__error__": f"shard unreadable after {retries} retries: {reason}"}
                return
            logger.warning("data: %s: read failed at sample %d of %d (%s); retry %d of %d", url, k, expected, reason,
                           failures, retries)  # fmt: skip
            time.sleep(backoff_s * failures)


def prepare_streamed(sample: dict[str, Any], gid: int, epoch: int, ctx: SampleContext):
    """A webdataset sample dict -> ``plan.Prepared``; raises SampleError if unusable."""
    if "__error__" in sample:
        raise SampleError(sample["__error__"])
    ext = next((e for e in VIDEO_EXTS if e in sample), None)
    if ext is None:
        raise SampleError("no video component")
    if "json" not in sample:
        raise SampleError("no .json component")

    def cls() -> bytes:
        if "cls" not in sample:
            raise SampleError("no .cls component")
        return sample["cls"]

    meta = check_meta(sample["json"], cls)
    check_video(sample[ext], meta, ctx.verify)
    meta["ext"] = ext
    return prepare_loaded(gid, sample["__key__"], sample[ext], meta, epoch, ctx)


# --------------------------------------------------------------------------- the plan


@dataclass
class Layout:
    """One epoch of one rank: its streams' shards, each stream's batches, the batch order."""

    streams: list[list[int]]  # shard ids per stream, in reading order
    quotas: list[int]  # batches per stream this epoch
    schedule: list[int]  # stream of each of the rank's batches (then -1: val padding batches)

    def done_before(self, batch: int) -> list[int]:
        """Batches of each stream among the rank's first ``batch``."""
        done = [0] * len(self.streams)
        for w in self.schedule[:batch]:
            if w >= 0:
                done[w] += 1
        return done


class StreamPlan:
    """Which shards each stream of each rank reads in an epoch, and how many batches it gives."""

    def __init__(self, shards: list[StreamShard], batch_size: int, rank: int, world: int, workers: int, train: bool,
                 seed: int, buffer: int, multiple_of: int = 1, command: str = ""):  # fmt: skip
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} out of range for world size {world}")
        self.command = command  # data.stream_command: how shards are opened (see _open)
        self.shards, self.batch_size, self.rank, self.world, self.workers = shards, batch_size, rank, world, workers
        self.train, self.seed, self.buffer, self.multiple_of = train, seed, buffer if train else 1, multiple_of
        self.counts = np.array([s.samples for s in shards], np.int64)
        self.num_batches = self._rank_batches()
        if train and self.num_batches == 0:
            raise ShardError(
                f"train split has {len(shards)} shards of {int(self.counts.sum())} samples: too few for "
                f"{world} ranks x {workers} streams x batch {batch_size}"
                f"{f' x grad_accum {multiple_of}' if multiple_of > 1 else ''} (every stream reads whole shards); "
                "write smaller shards (tools/make_shards.py --shard-size) or lower data.num_workers / data.batch_size")

    @property
    def key(self) -> tuple[int, int, int, int]:
        """What a saved position depends on besides the shards and the seed."""
        return self.world, self.workers, self.batch_size, self.multiple_of

    def _slots(self, n: int, rank: int) -> list[list[int]]:
        """Positions (in an epoch's shard order of length n) read by each stream of ``rank``."""
        mine = list(range(rank, n, self.world))
        return [mine[w :: self.workers] for w in range(self.workers)]

    def _rank_batches(self) -> int:
        """Train: batches per rank in every epoch (each stream planned for its smallest shards)."""
        if not self.train:
            return 0  # per epoch (layout), val pads ranks to the longest
        smallest = np.sort(self.counts)
        per_rank = []
        for r in range(self.world):
            per_rank.append(sum(int(smallest[: len(s)].sum()) // self.batch_size for s in self._slots(len(smallest), r)))
        total = min(per_rank)
        return total // self.multiple_of * self.multiple_of

    def order(self, epoch: int, exclude: frozenset[int] = frozenset()) -> list[int]:
        """The epoch's shard order (train: a permutation of (seed, epoch)), without ``exclude``."""
        ids = np.arange(len(self.shards))
        if self.train:
            rng = np.random.default_rng(np.random.SeedSequence([self.seed & 0xFFFFFFFF, epoch, 0x5AD5]))
            ids = rng.permutation(len(self.shards))
        return [int(i) for i in ids if int(i) not in exclude]

    def layout(self, epoch: int, exclude: frozenset[int] = frozenset(), rank: int | None = None) -> Layout:
        rank = self.rank if rank is None else rank
        order = self.order(epoch, exclude)
        B = self.batch_size
        streams = [[order[i] for i in slot] for slot in self._slots(len(order), rank)]
        sizes = [int(self.counts[s].sum()) for s in streams]
        if self.train:
            quotas = [n // B for n in sizes]
            want = self.num_batches if not exclude else self._excluded_total(order)
            # cut the largest first (lowest stream on ties) down to the rank's count
            for _ in range(sum(quotas) - want):
                w = max(range(len(quotas)), key=lambda i: (quotas[i], -i))
                quotas[w] -= 1
            schedule = _round_robin(quotas)
        else:
            quotas = [math.ceil(n / B) for n in sizes]
            longest = max(sum(math.ceil(int(self.counts[s].sum()) / B) for s in slots_streams)
                          for slots_streams in ([[order[i] for i in slot] for slot in self._slots(len(order), r)]
                                                for r in range(self.world)))  # fmt: skip
            schedule = _round_robin(quotas)
            schedule += [-1] * (longest - len(schedule))
        return Layout(streams, quotas, schedule)

    def _excluded_total(self, order: list[int]) -> int:
        """Train batches per rank for the rest of an epoch that lost shards to a layout change."""
        per_rank = []
        for r in range(self.world):
            per_rank.append(sum(int(self.counts[[order[i] for i in s]].sum()) // self.batch_size
                                for s in self._slots(len(order), r)))  # fmt: skip
        total = min(per_rank)
        return total // self.multiple_of * self.multiple_of

    def position(self, layout: Layout, w: int, batch: int) -> tuple[int, int]:
        """(index in stream ``w``'s shard list, offset in that shard) after ``batch`` of its batches."""
        pos = batch * self.batch_size
        for i, sid in enumerate(layout.streams[w]):
            n = int(self.counts[sid])
            if pos < n:
                return i, pos
            pos -= n
        return len(layout.streams[w]), 0

    def started(self, layout: Layout, done: list[int]) -> set[int]:
        """Shards of ``layout`` its streams had begun reading after ``done[w]`` batches each
        (every shard up to the end of the current shuffle block)."""
        out: set[int] = set()
        for w, shards in enumerate(layout.streams):
            pos = done[w] * self.batch_size
            if pos == 0:
                continue
            end = -(-pos // self.buffer) * self.buffer
            seen = 0
            for sid in shards:
                if seen >= end:
                    break
                out.add(sid)
                seen += int(self.counts[sid])
        return out


def _round_robin(quotas: list[int]) -> list[int]:
    """Stream of each batch: streams in turn, skipping those whose batches are all given."""
    left, out = list(quotas), []
    while any(left):
        for w in range(len(left)):
            if left[w]:
                out.append(w)
                left[w] -= 1
    return out


# --------------------------------------------------------------------------- one stream's batches


class _Stream:
    """Batches of one stream from its ``first``-th on: reads its shards, fills shuffle blocks,
    decodes and assembles (the bad-sample policy of ``plan.assemble``)."""

    def __init__(self, plan: StreamPlan, layout: Layout, w: int, epoch: int, first: int, ctx: SampleContext,
                 size: int, finish: bool, retries: int):  # fmt: skip
        self.plan, self.w, self.epoch, self.ctx, self.size, self.finish = plan, w, epoch, ctx, size, finish
        self.shards = layout.streams[w]
        self.length = int(plan.counts[self.shards].sum()) if self.shards else 0
        self.first, self.last = first, layout.quotas[w]
        self.retries = retries
        self.blocks: dict[int, list[dict[str, Any]]] = {}
        self.perms: dict[int, np.ndarray] = {}
        start = min(first * plan.batch_size // plan.buffer * plan.buffer, self.length)
        self._source = self._sequence(start)
        self._next_block = start // plan.buffer

    def _sequence(self, start: int) -> Iterator[dict[str, Any]]:
        """The stream's samples from position ``start``."""
        pos = 0
        for sid in self.shards:
            n = int(self.plan.counts[sid])
            if pos + n > start:
                yield from read_shard(self.plan.shards[sid].url, n, max(0, start - pos), self.retries, self.plan.command)
            pos += n

    def _block(self, k: int) -> list[dict[str, Any]]:
        K = self.plan.buffer
        while self._next_block <= k:  # blocks are read in order
            b = self._next_block
            n = min(K, self.length - b * K)
            items = [next(self._source) for _ in range(n)]
            self.blocks[b] = items
            if self.plan.train:
                head = self._where(b * K)
                rng = np.random.default_rng(np.random.SeedSequence(
                    [self.plan.seed & 0xFFFFFFFF, self.epoch, 0xB10C, head[0], head[1]]))  # fmt: skip
                self.perms[b] = rng.permutation(n)
            else:
                self.perms[b] = np.arange(n)
            self._next_block += 1
        return self.blocks[k]

    def _where(self, pos: int) -> tuple[int, int]:
        for sid in self.shards:
            n = int(self.plan.counts[sid])
            if pos < n:
                return sid, pos
            pos -= n
        return -1, 0

    def _sample(self, pos: int) -> tuple[dict[str, Any], int]:
        K = self.plan.buffer
        k = pos // K
        block = self._block(k)
        i = int(self.perms[k][pos - k * K])
        return block[i], k * K + i

    def _decode(self, sample: dict[str, Any], gid: int) -> SampleResult:
        from claver_dist.data.cpu import decode_prepared

        try:
            p = prepare_streamed(sample, gid, self.epoch, self.ctx)
        except (SampleError, VideoError) as e:
            return SampleResult(gid, sample["__key__"], error=str(e))
        return decode_prepared(p, self.ctx, self.size)

    def _replacement(self, k: int, used: set[int]) -> tuple[list[SampleResult], list[tuple[int, str, str]]]:
        """A good sample for a train batch with none: the first of block ``k`` outside the
        batch, else of the blocks after it (read ahead; a restored run reads the same ones)."""
        skipped = []
        K, last = self.plan.buffer, (self.length - 1) // self.plan.buffer
        for block in range(k, min(last, k + max(1, MAX_LOOKAHEAD // K)) + 1):
            for i, sample in enumerate(self._block(block)):
                gid = block * K + i
                if gid in used:
                    continue
                r = self._decode(sample, gid)
                if r.video is not None:
                    return [r], skipped
                skipped.append((gid, r.key, r.error or "?"))
        return [], skipped

    def __iter__(self) -> Iterator[dict[str, Any]]:
        B, K = self.plan.batch_size, self.plan.buffer
        for b in range(self.first, self.last):
            results, gids = [], set()
            for pos in range(b * B, (b + 1) * B):
                if pos >= self.length:  # val: the stream's last batch is padded
                    results.append(SampleResult(-1, ""))
                    continue
                sample, gid = self._sample(pos)
                gids.add(gid)
                results.append(self._decode(sample, gid))
            job = BatchJob(self.epoch, b, [r.gid for r in results])
            last_block = (min((b + 1) * B, self.length) - 1) // K
            batch = assemble(job, results, self.plan.train, empty_shape(self.ctx, self.size), "cpu",
                             lambda: self._replacement(last_block, gids))
            for k in [k for k in self.blocks if k < (b + 1) * B // K]:
                del self.blocks[k], self.perms[k]  # blocks behind the next batch are done
            batch["stream"] = self.w
            yield finish_pixels(batch) if self.finish else batch


class _StreamDataset(torch.utils.data.IterableDataset):
    """The rank's streams: DataLoader worker ``w`` runs stream ``w``; without workers the
    process runs them all in the rank's batch order."""

    def __init__(self, plan: StreamPlan, layout: Layout, epoch: int, done: list[int], ctx: SampleContext,
                 size: int, finish: bool, retries: int):  # fmt: skip
        self.plan, self.layout, self.epoch, self.done = plan, layout, epoch, done
        self.ctx, self.size, self.finish, self.retries = ctx, size, finish, retries
        # workers come from a fork server, which keeps the environment of the moment it
        # started: they get the storage settings and credentials the trainer has now
        self.env = {k: v for k, v in os.environ.items() if k.startswith(STORAGE_ENV)}

    def stream(self, w: int) -> _Stream:
        return _Stream(self.plan, self.layout, w, self.epoch, self.done[w], self.ctx, self.size, self.finish,
                       self.retries)  # fmt: skip

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = torch.utils.data.get_worker_info()
        if info is not None:
            os.environ.update(self.env)
            yield from self.stream(info.id)
            return
        streams = [iter(self.stream(w)) for w in range(len(self.layout.streams))]
        for w in self.layout.schedule[sum(self.done):]:
            if w >= 0:
                yield next(streams[w])


# --------------------------------------------------------------------------- the loader


class StreamLoader:
    """``VideoLoader``'s contract (``loader.py``) over streamed shards; see the module docstring."""

    def __init__(self, plan: StreamPlan, ctx: SampleContext, cfg: DataConfig, split: str, num_classes: int | None,
                 views: tuple[int, int], device: str = "cpu", captions: bool = False):  # fmt: skip
        self.captions = captions
        self.plan, self.ctx, self.cfg, self.split, self.num_classes, self.views = plan, ctx, cfg, split, num_classes, views
        self.device = device
        self.backend_name = "stream"
        self.batch_size = plan.batch_size
        self.finish_in_worker = not str(device).startswith("cuda")
        self.epoch = 0
        self._batch = 0
        self._exclude: frozenset[int] = frozenset()
        self._layout: tuple[tuple[int, frozenset[int]], Layout] | None = None
        self.skipped: dict[str, str] = {}
        self.skip_events = 0
        self._iterator = None

    # -- sizes
    def __len__(self) -> int:
        return len(self.layout().schedule)

    @property
    def num_samples(self) -> int:
        return int(self.plan.counts.sum())

    @property
    def samples_per_epoch(self) -> int:
        return len(self) * self.batch_size

    def layout(self) -> Layout:
        key = (self.epoch, self._exclude)
        if self._layout is None or self._layout[0] != key:
            self._layout = (key, self.plan.layout(self.epoch, self._exclude))
        return self._layout[1]

    # -- position
    @property
    def position(self) -> tuple[int, int]:
        """(epoch, batches of it handed out by this rank)."""
        return self.epoch, self._batch

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch, self._batch, self._exclude = epoch, 0, frozenset()

    def state_dict(self) -> dict[str, Any]:
        layout = self.layout()
        done = layout.done_before(self._batch)
        streams = {}
        for w, d in enumerate(done):
            i, offset = self.plan.position(layout, w, d)
            url = self.plan.shards[layout.streams[w][i]].url if i < len(layout.streams[w]) else None
            streams[w] = {"shard": url, "offset": offset, "batches": d}
        world, workers, batch_size, multiple_of = self.plan.key
        return {
            "mode": "stream",
            "epoch": self.epoch,
            "batch": self._batch,
            "seed": self.ctx.seed,
            "world_size": world,
            "workers": workers,
            "batch_size": batch_size,
            "grad_accum": multiple_of,
            "num_samples": self.num_samples,
            "num_shards": len(self.plan.shards),
            "exclude": sorted(self._exclude),
            "rank0_streams": streams if self.plan.rank == 0 else None,  # for people: what rank 0 was reading
            "skipped": dict(self.skipped),
        }

    def load_state_dict(self, d: dict[str, Any]) -> None:
        if d.get("mode") != "stream":
            raise ValueError("the saved data position is the random-access loader's (shards read by offset); this run "
                             "streams its shards (data.access): resume with the same shard location and data.access, "
                             "or start a new run folder")
        if (int(d["num_samples"]), int(d["num_shards"])) != (self.num_samples, len(self.plan.shards)):
            raise ValueError(f"loader state is for {d['num_shards']} shards of {d['num_samples']} samples, this split "
                             f"has {len(self.plan.shards)} of {self.num_samples}")
        if int(d["seed"]) != self.ctx.seed:
            logger.warning("data: restoring a position saved with seed %s under seed %s", d["seed"], self.ctx.seed)
        self.epoch, self._batch = int(d["epoch"]), int(d["batch"])
        self._exclude = frozenset(int(i) for i in d.get("exclude", []))
        self.skipped.update(d.get("skipped", {}))
        old = (int(d["world_size"]), int(d["workers"]), int(d["batch_size"]), int(d.get("grad_accum", 1)))
        if old != self.plan.key and self._batch > 0:
            self._relayout(old)
        if self._batch >= len(self):
            self.epoch, self._batch, self._exclude = self.epoch + 1, 0, frozenset()

    def _relayout(self, old: tuple[int, int, int, int]) -> None:
        """The rest of the epoch under another layout: without the shards the old streams had started."""
        world, workers, batch_size, multiple_of = old
        before = StreamPlan(self.plan.shards, batch_size, 0, world, workers, True, self.plan.seed,
                            self.plan.buffer, multiple_of, self.plan.command)  # fmt: skip
        started: set[int] = set()
        for r in range(world):
            lay = before.layout(self.epoch, self._exclude, rank=r)
            started |= before.started(lay, lay.done_before(self._batch))
        lost = int(self.plan.counts[sorted(started)].sum()) if started else 0
        logger.warning("data: the position was saved with %d ranks x %d streams x batch %d, this run has %d x %d x %d: "
                       "epoch %d goes on with the %d shards no stream had started (%d samples of started shards are not "
                       "read again this epoch)", world, workers, batch_size, self.plan.world, self.plan.workers,
                       self.batch_size, self.epoch, len(self.plan.shards) - len(self._exclude | started), lost)  # fmt: skip
        self._exclude = frozenset(self._exclude | started)
        self._batch = 0

    # -- iteration
    def __iter__(self) -> Iterator[dict[str, Any]]:
        epoch, layout = self.epoch, self.layout()
        done = layout.done_before(self._batch)
        dataset = _StreamDataset(self.plan, layout, epoch, done, self.ctx, self.cfg.image_size, self.finish_in_worker,
                                 self.cfg.stream_retries)  # fmt: skip
        source = iter(self._workers(dataset)) if any(q > d for q, d in zip(layout.quotas, done)) else iter(())
        pending: dict[int, list[dict[str, Any]]] = {w: [] for w in range(len(layout.streams))}
        try:
            yield from self._batches(epoch, layout, source, pending)
        finally:
            self._shutdown()

    def _batches(self, epoch: int, layout: Layout, source, pending) -> Iterator[dict[str, Any]]:
        total = len(layout.schedule)
        for b in range(self._batch, total):
            w = layout.schedule[b]
            if w < 0:
                batch = self._padding()
            else:
                while not pending[w]:  # workers may answer out of the rank's order; keep it
                    got = next(source)
                    pending[got.pop("stream")].append(got)
                batch = pending[w].pop(0)
            self._record(batch.pop("skipped"))
            batch = finish_pixels(batch, self.device)
            if b + 1 >= total:
                self.epoch, self._batch, self._exclude = epoch + 1, 0, frozenset()
            else:
                self._batch = b + 1
            yield batch
            if self.epoch != epoch:
                break

    def _workers(self, dataset: _StreamDataset):
        from claver_dist.data.cpu import _identity, _worker_context, _worker_init

        n = self.plan.workers if self.cfg.num_workers > 0 else 0
        if n == 0:
            return dataset
        # a fresh set of workers per pass: each gets this epoch's layout and position
        self._iterator = iter(torch.utils.data.DataLoader(
            dataset, batch_size=None, num_workers=n, collate_fn=_identity,
            pin_memory=str(self.device).startswith("cuda"), worker_init_fn=_worker_init,
            prefetch_factor=self.cfg.prefetch, multiprocessing_context=_worker_context()))  # fmt: skip
        return self._iterator

    def _padding(self) -> dict[str, Any]:
        job = BatchJob(self.epoch, self._batch, [-1] * self.batch_size)
        batch = assemble(job, [SampleResult(-1, "") for _ in job.gids], False,
                         empty_shape(self.ctx, self.cfg.image_size))  # fmt: skip
        if self.captions:
            batch["caption"] = [""] * self.batch_size
        return batch

    def _record(self, skipped: list[tuple[int, str, str]]) -> None:
        for _, key, reason in skipped:
            self.skip_events += 1
            if key not in self.skipped:
                logger.warning("data: skipping bad sample %s (rank %d, %s split): %s", key, self.plan.rank,
                               self.split, reason)  # fmt: skip
            self.skipped[key] = reason

    def _shutdown(self) -> None:
        it, self._iterator = self._iterator, None
        if it is not None and hasattr(it, "_shutdown_workers"):
            it._shutdown_workers()

    def close(self) -> None:
        self._shutdown()


def build_stream_loader(cfg: DataConfig, split: str, spec: str, split_name: str, rank: int, world_size: int, seed: int,
                        num_classes: int | None, device: str, views: tuple[int, int], grad_accum: int,
                        captions: bool, ctx: SampleContext) -> StreamLoader:  # fmt: skip
    """``build_loader`` for shards read as streams (``data.access``)."""
    shards, manifest = stream_shards(spec, split_name, cfg.stream_command)
    if captions and manifest.get("annotation") != "captions":
        raise ShardError(f"{spec}: a labelled shard set; video-text pretraining needs captioned shards "
                         "(tools/make_shards.py with caption annotations, docs/data.md)")
    if num_classes is not None and manifest.get("annotation") == "captions":
        raise ShardError(f"{spec}: a captioned shard set (videos with captions, no class labels, "
                         "tools/make_shards.py); classification needs labelled shards")
    if num_classes is not None and manifest.get("num_classes") not in (None, num_classes):
        raise ShardError(f"{spec}: shards have {manifest['num_classes']} classes, the run expects {num_classes}")
    train = split == "train"
    workers = max(1, cfg.num_workers)
    plan = StreamPlan(shards, cfg.batch_size, rank, world_size, workers, train, seed, cfg.stream_buffer,
                      multiple_of=grad_accum if train else 1, command=cfg.stream_command)  # fmt: skip
    if len(shards) < world_size * workers:
        logger.warning("data: %s split %r has %d shards for %d ranks x %d streams: some streams read nothing",
                       spec, split_name, len(shards), world_size, workers)  # fmt: skip
    return StreamLoader(plan, ctx, cfg, split, num_classes, views, device, captions)
