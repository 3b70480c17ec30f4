"""Loader start-up at dataset scale: time and memory from ``build_loader`` to the first batch plan.

    python tools/bench_loader.py                                   # 240k and 10M samples, 8 local ranks
    python tools/bench_loader.py --sizes 240000 --ranks 4 --out /scratch/bench_loader
    python tools/bench_loader.py --old-sizes 240000,10000000       # also the .idx-parsing path at 10M

For every size it writes a synthetic train split the way ``tools/make_shards.py`` lays it
out - ``manifest.json``, the compact index ``train.index/`` (written by the library's
``write_split_index``) and, for the sizes in ``--old-sizes``, a second copy of the set with
``.idx`` text files and no index - under ``--out`` (default ``.cache/bench_loader``; reused
when already there, ``--fresh`` rewrites). Keys look like Kinetics keys
(``class__youtubeid_000010_000020``); shards hold ``--shard-samples`` samples of 0.2-3 MB
videos. The tar files are sparse files of the right size: nothing is decoded, and the
plan needs only the index.

Then it starts ``--ranks`` processes at once (spawn; a barrier after the imports), each
running the real loader code of rank r of ``--ranks``: ``build_loader(cfg, "train", r,
world)`` (CPU backend, workers not started; the modules it imports are imported before the
clock starts) and the first ``BatchJob`` of its epoch order
with the keys of that batch. Each reports the wall time of that and its resident memory
before and after: RSS, USS (pages only it holds) and PSS (shared pages divided among the
processes that map them, which is what shows the index being shared). Prints a markdown
table.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

CLASSES = ["abseiling", "air_drumming", "answering_questions", "applauding", "applying_cream", "archery",
           "arm_wrestling", "arranging_flowers", "assembling_computer", "auctioning", "baby_waking_up",
           "baking_cookies", "balloon_blowing", "bandaging", "barbequing", "bartending", "beatboxing",
           "bee_keeping", "belly_dancing", "bench_pressing", "passing_American_football_not_in_game_",
           "making_a_cake", "riding_mechanical_bull", "tossing_coin", "yoga", "zumba"]  # fmt: skip
YT = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"


def _keys(n: int) -> list[bytes]:
    """Unique Kinetics-style keys: class, an 11-character id from the sample number, a time range."""
    out = []
    for i in range(n):
        x, yt = i * 2654435761 % (1 << 64), []
        for _ in range(11):
            yt.append(YT[x & 63])
            x >>= 6
        start = (i * 7) % 290
        out.append(f"{CLASSES[i % len(CLASSES)]}__{''.join(yt)}_{start:06d}_{start + 10:06d}".encode())
    return out


def _layout(n: int, shard_samples: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[int]]:
    """Tar offsets as ShardWriter lays them out: per sample KEY.mp4, KEY.cls, KEY.json members,
    each a 512-byte header then data padded to 512. Returns (shard [N], offset [N, 3] in the
    index's (video, json, cls) order, size [N, 3], bytes per tar)."""
    rng = np.random.default_rng(seed)
    video = rng.integers(200_000, 3_000_000, n)
    cls = np.full(n, 2)
    meta = rng.integers(280, 360, n)
    members = np.stack([video, cls, meta], 1)  # tar order
    blocks = 512 + (members + 511) // 512 * 512
    shard = np.arange(n) // shard_samples
    flat = blocks.reshape(-1)
    ends = np.cumsum(flat)
    starts = ends - flat
    # restart the running offset at every shard's first member
    first = np.repeat(starts.reshape(n, 3)[::shard_samples, 0], np.bincount(shard) * 3)
    data_off = (starts - first + 512).reshape(n, 3)
    last = np.r_[np.nonzero(np.diff(shard))[0], n - 1]
    tar_bytes = [(int(data_off[i, 2] - 512 + blocks[i, 2]) + 1024 + 10239) // 10240 * 10240 for i in last]
    order = [0, 2, 1]  # tar (mp4, cls, json) -> index (video, json, cls)
    return shard.astype(np.int32), data_off[:, order], members[:, order], tar_bytes


def make_set(folder: Path, n: int, shard_samples: int, compact: bool) -> dict[str, float]:
    """A train split of ``n`` samples: sparse tars, manifest, and the compact index or .idx files."""
    from claver_dist.data.shards import FORMAT, MANIFEST, IndexArrays, write_split_index

    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    t0 = time.perf_counter()
    keys = _keys(n)
    shard, offset, size, tar_bytes = _layout(n, shard_samples)
    entries = []
    for s, nbytes in enumerate(tar_bytes):
        tar = folder / f"train-{s:06d}.tar"
        with open(tar, "wb") as f:
            f.truncate(nbytes)  # sparse: the plan never reads it
        entries.append({"tar": tar.name, "idx": f"train-{s:06d}.idx", "samples": min(shard_samples, n - s * shard_samples),
                        "bytes": nbytes})  # fmt: skip
    made = time.perf_counter() - t0
    split: dict[str, Any] = {"num_samples": n, "num_shards": len(entries), "shards": entries,
                             "per_class": {}, "rejected": [], "seed": 0}  # fmt: skip
    out = {"generate_s": made}
    if compact:
        t0 = time.perf_counter()
        arrays = IndexArrays.from_columns(shard, np.zeros(n, np.uint8), offset, size, keys, ["mp4"], sort_keys=True)
        split["index"] = write_split_index(folder, "train", entries, arrays)
        out["index_s"] = time.perf_counter() - t0
        out["index_mb"] = sum(f.stat().st_size for f in (folder / "train.index").iterdir()) / 2**20
    else:
        t0 = time.perf_counter()
        bounds = np.r_[0, np.cumsum([e["samples"] for e in entries])]
        for s, e in enumerate(entries):
            lines = [f"v1.2 {e['samples']}\n"]
            for i in range(bounds[s], bounds[s + 1]):
                k = keys[i].decode()
                (vo, jo, co), (vs, js, cs) = offset[i].tolist(), size[i].tolist()
                lines.append(f"mp4 {vo} {vs} {k}.mp4 cls {co} {cs} {k}.cls json {jo} {js} {k}.json\n")
            (folder / e["idx"]).write_text("".join(lines))
        out["idx_s"] = time.perf_counter() - t0
        out["idx_mb"] = sum((folder / e["idx"]).stat().st_size for e in entries) / 2**20
    manifest = {"format": FORMAT, "classes": CLASSES, "num_classes": len(CLASSES), "seed": 0,
                "splits": {"train": split}, "rejected": []}  # fmt: skip
    (folder / MANIFEST).write_text(json.dumps(manifest))
    (folder / "bench.json").write_text(json.dumps(out))
    return out


def _memory() -> dict[str, float]:
    import psutil

    m = psutil.Process().memory_full_info()
    return {"rss": m.rss / 2**20, "uss": m.uss / 2**20, "pss": getattr(m, "pss", float("nan")) / 2**20}


def _rank(folder: str, rank: int, world: int, batch: int, barrier: Any, results: Any) -> None:
    """One local rank: the loader's imports first, then (all ranks together) build_loader -> first plan."""
    import claver_dist.data.cpu  # noqa: F401 - the backend build_loader imports: measured apart from the index
    from claver_dist.data.config import DataConfig
    from claver_dist.data.loader import build_loader

    cfg = DataConfig(backend="cpu", train_shards=folder, batch_size=batch, num_workers=min(4, os.cpu_count() or 1))
    before = _memory()
    barrier.wait()
    t0 = time.perf_counter()
    loader = build_loader(cfg, "train", rank, world, seed=0)
    job = next(iter(loader.partition.jobs(loader.epoch, 0, {})))
    keys = [loader.shards.keys[g] for g in job.gids]
    elapsed = time.perf_counter() - t0
    after = _memory()
    results.put({"rank": rank, "s": elapsed, "n": len(loader.shards), "batch": len(keys),
                 **{f"d{k}": after[k] - before[k] for k in before}})  # fmt: skip
    barrier.wait()  # hold the loader until every rank has measured, so PSS sees the sharing
    loader.close()


def run_ranks(folder: Path, ranks: int, batch: int, timeout: float) -> list[dict[str, float]]:
    ctx = mp.get_context("spawn")
    barrier, results = ctx.Barrier(ranks), ctx.Queue()
    procs = [ctx.Process(target=_rank, args=(str(folder), r, ranks, batch, barrier, results)) for r in range(ranks)]
    for p in procs:
        p.start()
    out = []
    try:
        for _ in procs:
            out.append(results.get(timeout=timeout))
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    return sorted(out, key=lambda r: r["rank"])


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="240000,10000000", help="samples per set, comma-separated (default 240k, 10M)")
    p.add_argument("--old-sizes", default="240000",
                   help="sizes also measured through the .idx-parsing path (no compact index; default 240000)")
    p.add_argument("--ranks", type=int, default=8, help="local ranks started at once (default 8)")
    p.add_argument("--batch-size", type=int, default=32, help="data.batch_size (default 32)")
    p.add_argument("--shard-samples", type=int, default=1000, help="samples per shard (default 1000: ~1.6 GB tars)")
    p.add_argument("--out", default=".cache/bench_loader", help="where the sets are written (default .cache/bench_loader)")
    p.add_argument("--fresh", action="store_true", help="rewrite the sets even when they are there")
    p.add_argument("--timeout", type=float, default=900, help="seconds to wait for the ranks of one measurement")
    return p.parse_args(argv)


def _sizes(text: str) -> list[int]:
    return [int(float(x)) for x in text.split(",") if x.strip()]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    rows = []
    for n in _sizes(args.sizes):
        for compact in (True, False) if n in _sizes(args.old_sizes) else (True,):
            folder = out / f"n{n}-{'index' if compact else 'idx'}"
            built = folder / "bench.json"
            if args.fresh or not built.is_file():
                print(f"bench_loader: writing {folder}", file=sys.stderr)
                info = make_set(folder, n, args.shard_samples, compact)
            else:
                info = json.loads(built.read_text())
            print(f"bench_loader: {args.ranks} ranks over {folder}", file=sys.stderr)
            r = run_ranks(folder, args.ranks, args.batch_size, args.timeout)
            assert all(x["n"] == n for x in r)
            col = lambda k: [x[k] for x in r]  # noqa: E731
            rows.append({
                "samples": n, "path": "compact index (mmap)" if compact else ".idx parsing",
                "build": f"{info['index_s']:.1f} s, {info['index_mb']:.0f} MB" if compact else
                         f"(.idx files: {info['idx_mb']:.0f} MB)",
                "max": max(col("s")), "median": statistics.median(col("s")),
                "rss": statistics.median(col("drss")), "rss_max": max(col("drss")),
                "uss": statistics.median(col("duss")), "pss": statistics.median(col("dpss")),
            })  # fmt: skip
            print(json.dumps(rows[-1]), file=sys.stderr)
    print(f"\n{args.ranks} local ranks started together, os.cpu_count() = {os.cpu_count()}; batch {args.batch_size}, "
          f"{args.shard_samples} samples per shard\n")  # fmt: skip
    print("| samples | start-up path | index write (time, size) | to first plan, max / median | "
          "extra RSS per rank, median (max) | extra USS | extra PSS |")
    print("|---:|---|---|---:|---:|---:|---:|")
    for x in rows:
        print(f"| {x['samples']:,} | {x['path']} | {x['build']} | {x['max']:.2f} / {x['median']:.2f} s | "
              f"{x['rss']:.0f} ({x['rss_max']:.0f}) MB | {x['uss']:.0f} MB | {x['pss']:.0f} MB |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
