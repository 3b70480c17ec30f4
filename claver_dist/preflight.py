"""Preflight: measure the allocation a run will train on, with the run's config, without training.

    python launch/local.py --preflight --nproc 2 configs/debug.yaml [overrides]
    python launch/slurm.py --preflight --nodes 4 configs/k400_l14.yaml [overrides]
    python -m claver_dist.preflight CONFIG [overrides]      # per process, as the launchers run it

Every rank measures, at the same time as the others (as they will run):

- the device: its name, and matmul FLOP/s (bf16 8192^3 GEMMs on a GPU; fp32 1024^3 on a
  CPU, repeated for ~1 s);
- all-reduce bus bandwidth (nccl-tests' busbw: algbw x 2(n-1)/n) at the size of the
  gradient buckets DeepSpeed gets from ``train/engine.py`` (``reduce_bucket_size``), in
  the training dtype on GPUs; on CPU (gloo) in fp32 and capped at ``cpu_allreduce_elements``;
- read MB/s from the train shards: distinct byte ranges of the tar files per rank, each
  pass after ``posix_fadvise(DONTNEED)`` so that the page cache does not answer;
- clips/s decoded and augmented by the configured backend: this rank's real train loader
  (``data.loader.build_loader``), a few batches after a first one (worker start-up);
- free space of the run folder and whether every rank sees the file rank 0 writes there
  (the idea of ``CheckpointManager._check_shared_folder``);
- clock skew against rank 0 (``time.time()`` around a barrier, with its error bound).

Rank 0 gathers the results, prints one table per node (rows = ranks), flags stragglers
(more than ``straggler_fraction`` below the median of a throughput column), estimates the
time per step, epoch and run from the model's FLOP count and the slowest rank's rates,
and writes everything to ``<run_dir>/preflight.json`` (the record, the estimate, the
straggler rule, the checks and the tables: ``claver_dist.preflight_report``). Nothing else
is written: no lock is taken, no checkpoint, no ``metrics.jsonl``.

Exit status: 0 every check passed; 4 a check failed (the line names it: ``shared_folder``,
``free_space``, ``clock_skew``, ``measurements``); 2 refused to start (a bad config, a run
folder that a live launch holds). Stragglers are reported, not failed: a spread of 20%
can be noise on shared nodes; ``preflight.json`` lists them for scripts that gate on them.

Test hook: ``CLAVER_PREFLIGHT_SLOW_RANK=R`` makes rank R sleep inside each of its timed
measurements (``SLOW_FACTOR`` x the time the work took, so its rates fall to a sixth; the
all-reduce is collective, so there every rank sees the slower rate). One machine cannot
otherwise produce a slow rank; the tests use it to check the straggler rule.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import platform
import shutil
import socket
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist

from claver_dist.preflight_report import (CKPT_BYTES_PER_PARAM, EXPORT_BYTES_PER_PARAM, RESULT_FILE,
                                          PreflightOptions, RankResult, estimate, find_stragglers, format_report,
                                          model_cost, run_checks)

log = logging.getLogger("claver_dist.preflight")

EXIT_REFUSED = 2
EXIT_CHECK_FAILED = 4
SLOW_RANK_ENV = "CLAVER_PREFLIGHT_SLOW_RANK"
SLOW_FACTOR = 5


# --------------------------------------------------------------------------- timing helpers


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _stall(opts: PreflightOptions, rank: int, work_s: float) -> None:
    """The test hook: the slow rank sleeps ``SLOW_FACTOR`` x the work's time inside the
    caller's timed region, so that its rate falls to 1 / (1 + SLOW_FACTOR): far enough below
    the other ranks' to stand out from the noise of a busy test machine."""
    if opts.slow_rank == rank and work_s > 0:
        time.sleep(SLOW_FACTOR * work_s)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"CPU {model} ({torch.get_num_threads()} threads)"


def measure_matmul(device: torch.device, opts: PreflightOptions, rank: int) -> tuple[float, str]:
    """(FLOP/s, dtype) of timed square matmuls, bf16 8192 on CUDA, fp32 1024 on CPU: the best
    of ``windows`` windows of ``matmul_s`` in all."""
    n, dtype = (8192, torch.bfloat16) if device.type == "cuda" else (1024, torch.float32)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(2):  # warm-up (kernels, thread pools, clocks)
        torch.matmul(a, b)
    _sync(device)
    t = time.perf_counter()
    torch.matmul(a, b)
    _sync(device)
    one = time.perf_counter() - t
    reps = max(1, min(10_000, math.ceil(opts.matmul_s / opts.windows / max(one, 1e-6))))
    best = 0.0
    for _ in range(opts.windows):
        t = time.perf_counter()
        for _ in range(reps):
            torch.matmul(a, b)
        _sync(device)
        _stall(opts, rank, time.perf_counter() - t)
        best = max(best, 2 * n**3 * reps / (time.perf_counter() - t))
    return best, str(dtype).replace("torch.", "")


def allreduce_plan(bucket_elements: int, device: torch.device, precision: str,
                   opts: PreflightOptions) -> tuple[int, torch.dtype, str]:
    """(elements, dtype, note) of the all-reduce to time."""
    if device.type == "cuda":
        dtype = torch.bfloat16 if precision == "bf16" else torch.float32
        return bucket_elements, dtype, f"{bucket_elements:.3g} elements (reduce_bucket_size) in {dtype}"
    n = min(bucket_elements, opts.cpu_allreduce_elements)
    note = f"{n:.3g} fp32 elements" + (f" (gloo: capped from reduce_bucket_size {bucket_elements:.3g})"
                                       if n < bucket_elements else " (reduce_bucket_size)")
    return n, torch.float32, note


def measure_allreduce(elements: int, dtype: torch.dtype, device: torch.device, world: int, gather,
                      opts: PreflightOptions, rank: int) -> float | None:
    """Bus bandwidth in bytes/s (nccl-tests: algbw x 2(n-1)/n), the best of ``windows``
    windows; None on one rank. Collective: every rank runs the same number of all-reduces
    (agreed from the slowest warm-up)."""
    if world < 2:
        return None
    x = torch.ones(elements, dtype=dtype, device=device)
    dist.all_reduce(x)  # warm-up: connections, buffers
    _sync(device)
    t = time.perf_counter()
    dist.all_reduce(x)
    _sync(device)
    one = max(gather(time.perf_counter() - t))
    reps = max(1, min(1000, math.ceil(opts.allreduce_s / opts.windows / max(one, 1e-6))))
    best = math.inf
    for _ in range(opts.windows):
        dist.barrier()
        t = time.perf_counter()
        for _ in range(reps):
            _stall(opts, rank, one)
            dist.all_reduce(x)
        _sync(device)
        best = min(best, (time.perf_counter() - t) / reps)
    size = elements * x.element_size()
    return size / best * 2 * (world - 1) / world


def read_ranges(tars: list[Path], rank: int, world: int, max_range: int = 8 << 20) -> list[tuple[Path, int, int]]:
    """This rank's (file, offset, length) ranges: the shards cut into pieces, every world-th
    piece from ``rank`` on, so that ranks read distinct bytes (shared when there are fewer
    pieces than ranks)."""
    sizes = [(t, t.stat().st_size) for t in tars]
    total = sum(s for _, s in sizes)
    piece = max(64 << 10, min(max_range, total // max(1, world * 8)))
    pieces = [(t, off, min(piece, size - off)) for t, size in sizes for off in range(0, size, piece)]
    if not pieces:
        return []
    mine = pieces[rank::world]
    return mine or [pieces[rank % len(pieces)]]


def measure_read(ranges: list[tuple[Path, int, int]], opts: PreflightOptions, rank: int) -> tuple[float, int, int]:
    """(bytes/s, bytes, passes): this rank's ranges read in turn (again from the first when a
    small shard set runs out) for ``read_s``, each range's cached pages dropped right before
    it is read; the best of ``windows`` windows."""
    fds = {p: os.open(p, os.O_RDONLY) for p in {p for p, _, _ in ranges}}
    chunk = 1 << 20
    try:
        best, total, i = 0.0, 0, 0
        for _ in range(opts.windows):
            done, elapsed = 0, 0.0
            while elapsed < opts.read_s / opts.windows:
                p, off, length = ranges[i % len(ranges)]
                i += 1
                if hasattr(os, "posix_fadvise"):
                    os.posix_fadvise(fds[p], off, length, os.POSIX_FADV_DONTNEED)
                t = time.perf_counter()
                pos = off
                while pos < off + length:
                    data = os.pread(fds[p], min(chunk, off + length - pos), pos)
                    if not data:
                        raise OSError(f"{p}: short read at byte {pos}")
                    pos += len(data)
                _stall(opts, rank, time.perf_counter() - t)
                elapsed += time.perf_counter() - t
                done += length
            best, total = max(best, done / elapsed), total + done
        return best, total, math.ceil(i / len(ranges))
    finally:
        for fd in fds.values():
            os.close(fd)


def measure_stream_read(urls: list[str], opts: PreflightOptions, rank: int, world: int,
                        command: str = "") -> tuple[float, int, int]:  # fmt: skip
    """``measure_read`` for streamed shards: this rank's shards (every world-th) read in
    sequence through fsspec, as the streaming loader reads them, for ``read_s``."""
    from claver_dist.data.stream import _open

    mine = urls[rank::world] or [urls[rank % len(urls)]]
    best, total, i = 0.0, 0, 0
    f = None
    try:
        for _ in range(opts.windows):
            done, elapsed = 0, 0.0
            while elapsed < opts.read_s / opts.windows:
                if f is None:
                    f = _open(mine[i % len(mine)], command)
                    i += 1
                t = time.perf_counter()
                data = f.read(1 << 20)
                _stall(opts, rank, time.perf_counter() - t)
                elapsed += time.perf_counter() - t
                if not data:
                    f.close()
                    f = None
                done += len(data)
            best, total = max(best, done / elapsed), total + done
    finally:
        if f is not None:
            f.close()
    return best, total, math.ceil(i / len(mine))


def measure_loader(loader, opts: PreflightOptions, rank: int, num_workers: int) -> tuple[float, int]:
    """(clips/s, clips timed) of this rank's train loader: after a first batch (worker
    start-up), at least ``loader_batches`` (and 2 x the data workers) batches and
    ``loader_s`` seconds, at most ``loader_max_s``, in ``windows`` windows (the best counts);
    a short epoch goes on into the next."""
    if len(loader) == 0:
        raise ValueError(f"the train loader has no batch for this rank ({loader.num_samples} samples for "
                         f"{loader.partition.world} ranks x batch {loader.batch_size})")

    def batches():
        while True:
            yield from loader  # the loader moves on to the next epoch after its last batch

    it = batches()
    next(it)
    want = math.ceil(max(opts.loader_batches, 2 * num_workers) / opts.windows)
    best, total = 0.0, 0
    for _ in range(opts.windows):
        clips = n = 0
        t = time.perf_counter()
        while n < want or time.perf_counter() - t < opts.loader_s / opts.windows:
            clips += next(it)["video"].shape[0]
            n += 1
            if time.perf_counter() - t > opts.loader_max_s / opts.windows:
                break
        _stall(opts, rank, time.perf_counter() - t)
        best, total = max(best, clips / (time.perf_counter() - t)), total + clips
    return best, total


def measure_clock_skew(gather, barrier, rounds: int) -> tuple[float, float]:
    """(this clock - rank 0's clock, error bound) in seconds. Rank 0's stamp is taken after
    the barrier, which this rank entered at ``e``, and before the gather that returns here
    at ``b``: at a true moment inside [e, b] of this clock. The tightest round wins."""
    best = (0.0, math.inf)
    for _ in range(rounds):
        e = time.time()
        barrier()
        stamps = gather(time.time())
        b = time.time()
        skew, bound = (e + b) / 2 - stamps[0], (b - e) / 2
        if bound < best[1]:
            best = (skew, bound)
    return best


def check_shared(run_dir: Path, is_main: bool, gather, barrier) -> bool:
    """Whether this rank sees the probe rank 0 writes into the run folder."""
    token = gather(f"{socket.gethostname()}-{os.getpid()}-{time.time_ns()}" if is_main else None)[0]
    probe = run_dir / f".preflight-{token}"
    if is_main:
        probe.write_text(token)
    barrier()
    seen = probe.is_file()
    barrier()
    if is_main:
        probe.unlink(missing_ok=True)
    return seen


# --------------------------------------------------------------------------- the run


def _measure(result: RankResult, name: str, fn: Callable[[], Any]) -> Any:
    """Run one local measurement; an error becomes the rank's record, never a crash (the
    collectives after it must still meet)."""
    try:
        return fn()
    except Exception as e:  # noqa: BLE001 - reported in the table and the checks
        result.errors[name] = f"{type(e).__name__}: {e}"[:500]
        log.warning("preflight: rank %d: %s failed: %s", result.rank, name, result.errors[name])
        return None


def run(config: str, overrides: list[str], opts: PreflightOptions | None = None) -> tuple[bool, dict[str, Any]]:
    """Measure on every rank; rank 0 writes the report. Returns (every check passed, report)
    on every rank (the whole report on rank 0; ``passed`` and ``failed`` on the others)."""
    from claver_dist.runlock import RunLock, launch_id
    from claver_dist.config import load_config
    from claver_dist.data.loader import build_loader
    from claver_dist.data.shards import resolve_shards
    from claver_dist.data.stream import is_url, stream_shards
    from claver_dist.distributed import DistEnv
    from claver_dist.text.prompts import load_labels
    from claver_dist.train.engine import deepspeed_config
    from claver_dist.train.metrics import setup_logging

    opts = opts or PreflightOptions()
    cfg = load_config(config, overrides)
    d = DistEnv.from_environ(device=cfg.train.device)
    setup_logging(d.rank)
    run_dir = cfg.resolved_run_dir()
    RunLock(run_dir).check()  # a live run in this folder holds the devices: measure nothing (every rank reads)
    d.init(timeout_s=cfg.train.collective_timeout_s)
    device = d.device
    gather, barrier = d.gather, d.barrier
    host = os.environ.get("SLURMD_NODENAME") or socket.gethostname()
    node = int(os.environ.get("GROUP_RANK", "0") or 0)
    r = RankResult(d.rank, d.local_rank, node, host, device=device_name(device))
    print(f"claver-preflight: rank {d.rank}/{d.world_size} local {d.local_rank} on {host} ({r.device}) "
          f"{d.backend}", flush=True)

    # 1. matmul, all ranks at once (as they will train: sharing the node's power and memory)
    barrier()
    mm = _measure(r, "matmul", lambda: measure_matmul(device, opts, d.rank))
    if mm is not None:
        r.matmul_gflops, r.matmul_dtype = mm[0] / 1e9, mm[1]

    # 2. all-reduce at the size of DeepSpeed's gradient buckets (collective: never skipped)
    bucket = int(deepspeed_config(cfg.train, cfg.optim, cfg.data.batch_size, d.world_size)
                 ["zero_optimization"]["reduce_bucket_size"])
    elements, dtype, ar_note = allreduce_plan(bucket, device, cfg.train.precision, opts)
    bw = measure_allreduce(elements, dtype, device, d.world_size, gather, opts, d.rank)
    r.allreduce_busbw_gbs = None if bw is None else bw / 1e9
    if device.type == "cuda":
        torch.cuda.empty_cache()

    # 3. reads of distinct byte ranges of the train shards (streamed shards: whole shards by URL)
    barrier()
    if cfg.data.access == "stream" or (cfg.data.access == "auto" and is_url(cfg.data.train_shards)):
        tars = None
        rd = _measure(r, "read", lambda: measure_stream_read(
            [s.url for s in stream_shards(cfg.data.train_shards, cfg.data.train_split, cfg.data.stream_command)[0]],
            opts, d.rank, d.world_size, cfg.data.stream_command))
        if rd is not None:
            r.read_mbs, r.read_bytes, r.read_passes = rd[0] / 1e6, rd[1], rd[2]
    else:
        tars = _measure(r, "shards", lambda: resolve_shards(cfg.data.train_shards, cfg.data.train_split)[0])
    if tars is not None:
        rd = _measure(r, "read", lambda: measure_read(read_ranges(tars, d.rank, d.world_size), opts, d.rank))
        if rd is not None:
            r.read_mbs, r.read_bytes, r.read_passes = rd[0] / 1e6, rd[1], rd[2]

    # 4. this rank's real train loader
    barrier()

    def loader_rate() -> tuple[float, int]:
        pretrain = cfg.task == "pretrain"
        num_classes = len(load_labels(cfg.text.labels)) if cfg.text.labels and not pretrain else None
        loader = build_loader(cfg.data, "train", d.rank, d.world_size, cfg.seed, num_classes=num_classes,
                              device=device.type, grad_accum=cfg.train.grad_accum, captions=pretrain)
        try:
            r.steps_per_epoch = len(loader) // cfg.train.grad_accum
            return measure_loader(loader, opts, d.rank, cfg.data.num_workers)
        finally:
            loader.close()

    lr = _measure(r, "loader", loader_rate)
    if lr is not None:
        r.clips_per_s, r.clips_timed = lr

    # 5. the run folder: free space, and one folder for all ranks
    barrier()
    if d.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
    barrier()
    probe = run_dir
    while not probe.exists() and probe != probe.parent:  # a rank that cannot see it: its parent's disk
        probe = probe.parent
    r.free_gb = _measure(r, "free_space", lambda: shutil.disk_usage(probe).free / 2**30)
    r.shared = check_shared(run_dir, d.is_main, gather, barrier)

    # 6. clocks
    r.clock_skew_s, r.clock_skew_bound_s = (0.0, 0.0) if d.is_main else (None, None)
    skew = measure_clock_skew(gather, barrier, opts.skew_rounds)
    if not d.is_main:
        r.clock_skew_s, r.clock_skew_bound_s = skew

    ranks = [RankResult(**x) for x in gather(dataclasses.asdict(r))]
    report: dict[str, Any] = {}
    if d.is_main:
        report = _report(cfg, config, overrides, ranks, d, opts, ar_note, launch_id())
        (run_dir / RESULT_FILE).write_text(json.dumps(report, indent=1) + "\n")
        print(report["text"], flush=True)
    verdict = gather((report["passed"], report["failed"]) if d.is_main else None)[0]
    return verdict[0], {**report, "passed": verdict[0], "failed": verdict[1]}


def _report(cfg, config: str, overrides: list[str], ranks: list[RankResult], d, opts: PreflightOptions,
            ar_note: str, launch: str) -> dict[str, Any]:
    gpu = d.device_type == "cuda"
    cost: dict[str, float] = {}
    try:
        cost = model_cost(cfg)
    except Exception as e:  # noqa: BLE001 - reported; the free-space check then fails
        log.warning("preflight: counting the model's FLOPs failed: %s: %s", type(e).__name__, e)
    required = None
    if cost:
        ckpt = cost["trainable_params"] * CKPT_BYTES_PER_PARAM + cost["params"] * 2
        required = ckpt * (cfg.checkpoint.keep_last + 1) + cost["params"] * EXPORT_BYTES_PER_PARAM
    stragglers = find_stragglers(ranks, opts.straggler_fraction)
    checks = run_checks(ranks, required, opts)
    passes = max((r.read_passes for r in ranks), default=0)
    report = {
        "time": time.time(), "launch": launch, "config": config, "overrides": overrides,
        "run_dir": str(cfg.resolved_run_dir()), "world_size": d.world_size, "backend": d.backend,
        "device_type": d.device_type,
        "columns": {"matmul_gflops": f"GFLOP/s ({'bf16' if gpu else 'fp32'} matmul)",
                    "allreduce_busbw_gbs": "GB/s (bus bandwidth, nccl-tests convention)",
                    "read_mbs": "MB/s (train shard reads)", "clips_per_s": "clips/s (train loader)",
                    "free_gb": "GiB free in the run folder's file system"},
        "matmul": "bf16 8192^3" if gpu else "fp32 1024^3",
        "allreduce": ar_note,
        "read": "distinct byte ranges per rank, page cache dropped (posix_fadvise DONTNEED) before each read"
                + (f"; small shard set: up to {passes} passes over the same ranges" if passes > 1 else ""),
        "windows": f"each rate is the best of {opts.windows} windows",
        "ranks": [dataclasses.asdict(r) for r in ranks],
        "stragglers": stragglers,
        "model": cost,
        "required_free_bytes": required,
        "estimate": estimate(cfg, cost, ranks, d.world_size, opts, d.device_type) if cost else {"error": "no model"},
        "checks": [dataclasses.asdict(c) for c in checks],
        "failed": [c.name for c in checks if not c.ok],
        "options": dataclasses.asdict(opts),
    }
    report["passed"] = not report["failed"]
    text = format_report(report, ranks, gpu)
    verdict = ("claver-preflight: passed" if report["passed"] else
               "claver-preflight: FAILED: " + "; ".join(f"{c.name}: {c.detail}" for c in checks if not c.ok))
    report["text"] = text + "\n" + verdict + f" ({cfg.resolved_run_dir() / RESULT_FILE})"
    return report


# --------------------------------------------------------------------------- entry point


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="claver-preflight", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mfu", type=float, default=PreflightOptions.mfu,
                   help="assumed model FLOP/s as a fraction of the measured matmul rate (default %(default)s)")
    p.add_argument("config", help="the run's YAML recipe")
    p.add_argument("overrides", nargs="*", help="the run's dotted overrides")
    return p.parse_args(argv)


def _fail(code: int, line: str) -> int:
    """One line on stderr, and the same in torch's error file under the elastic agent, so that
    the launcher's summary names it."""
    rank = os.environ.get("RANK", "0")
    print(f"claver-preflight: rank {rank}: {line}", file=sys.stderr, flush=True)
    if os.environ.get("TORCHELASTIC_ERROR_FILE"):
        from torch.distributed.elastic.multiprocessing.errors import ErrorHandler

        try:
            raise RuntimeError(line)
        except RuntimeError as e:
            ErrorHandler().record_exception(e)
    return code


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from claver_dist.errors import BankError, ConfigError, LabelsError, RunLockedError

    slow = os.environ.get(SLOW_RANK_ENV)
    opts = PreflightOptions(mfu=args.mfu, slow_rank=int(slow) if slow else None)
    try:
        passed, report = run(args.config, args.overrides, opts)
    except (ConfigError, LabelsError, BankError, RunLockedError) as e:
        return _fail(EXIT_REFUSED, f"refused to start: {e}")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    if not passed:
        failed = ", ".join(report.get("failed", [])) or "see rank 0's report"
        return _fail(EXIT_CHECK_FAILED, f"preflight failed: {failed}")
    return 0


if __name__ == "__main__":
    from torch.distributed.elastic.multiprocessing.errors import record

    sys.exit(record(main)())
