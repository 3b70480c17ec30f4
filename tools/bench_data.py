"""Data loading throughput: clips/s per loader backend, for 8 and 16 frames at 224 px.

    python tools/bench_data.py                         # builds a benchmark set once, then measures
    python tools/bench_data.py --h264 shards/k400 --vp9 shards/k400_vp9 --split val --batches 50

Backends measured: ``cpu`` (PyAV in ``--workers`` DataLoader processes, H.264 shards),
``dali-cpu`` (DALI on the CPU, ``--workers`` threads, VP9 shards) and ``dali-gpu``
(NVDEC + GPU augmentation, H.264 shards) when CUDA is present. Every backend runs the
training path: random TSN offsets, multi-scale crop, flip, colour jitter, normalise,
``B x T x 3 x S x S`` float32 batches.

Without ``--h264``/``--vp9`` it generates Kinetics-like inputs once into ``--data``
(default ``.cache/bench_data``): 10 s synthetic clips at 25 fps, packed with
``make_shards.py`` at the default settings (short side 320, keyframe every 12 frames).
Prints a markdown table.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

from claver_dist.data.config import DataConfig
from claver_dist.data.loader import build_loader


def make_data(folder: Path, videos: int, seconds: float, workers: int) -> tuple[Path, Path]:
    """Synthetic 426x320 clips -> H.264 and VP9 shard sets (skipped when already there)."""
    from claver_dist.data.synthetic import MotionSpec, motion_frames, write_video
    from tools.make_shards import main as make_shards

    src = folder / "src"
    frames = int(round(seconds * 25))
    if not (src / "list.txt").is_file():
        spec = MotionSpec(width=426, height=320, min_frames=frames, max_frames=frames)
        lines = []
        for i in range(videos):
            write_video(src / f"v{i:03d}.mp4", motion_frames(i % 8, np.random.default_rng(i), spec), crf=20)
            lines.append(f"v{i:03d}.mp4 {i % 8}")
        (src / "labels.csv").write_text("id,name\n" + "".join(f"{i},class{i}\n" for i in range(8)))
        (src / "list.txt").write_text("\n".join(lines) + "\n")
    out = {}
    for codec in ("h264", "vp9"):
        out[codec] = folder / codec
        if not (out[codec] / "manifest.json").is_file():
            rc = make_shards([str(src / "list.txt"), "--labels", str(src / "labels.csv"), "--out", str(out[codec]),
                              "--codec", codec, "--workers", str(workers), "--no-progress"])  # fmt: skip
            if rc != 0:
                raise SystemExit(f"make_shards failed for {codec}")
    return out["h264"], out["vp9"]


def measure(shards: Path, split: str, backend: str, device: str, frames: int, size: int, batch: int,
            workers: int, batches: int) -> float:  # fmt: skip
    cfg = DataConfig(backend=backend, train_shards=str(shards), train_split=split, num_frames=frames,
                     image_size=size, batch_size=batch, num_workers=workers)  # fmt: skip
    loader = build_loader(cfg, "train", device=device)
    try:
        it, epoch = iter(loader), 0

        def next_batch():
            nonlocal it, epoch
            while True:
                try:
                    return next(it)
                except StopIteration:
                    epoch += 1
                    loader.set_epoch(epoch)
                    it = iter(loader)

        for _ in range(min(3, batches)):  # warm-up: workers / pipeline start, first decodes
            next_batch()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        n, t = 0, time.perf_counter()
        for _ in range(batches):
            b = next_batch()
            n += b["video"].shape[0]
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        return n / (time.perf_counter() - t)
    finally:
        loader.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--h264", default=None, help="H.264 shard folder (cpu and dali-gpu backends)")
    p.add_argument("--vp9", default=None, help="VP9 shard folder (dali-cpu backend)")
    p.add_argument("--split", default="train", help="manifest split to read (default train)")
    p.add_argument("--data", default=".cache/bench_data", help="where generated benchmark shards live")
    p.add_argument("--videos", type=int, default=16, help="generated videos (default 16)")
    p.add_argument("--seconds", type=float, default=10.0, help="generated clip length (default 10 s)")
    p.add_argument("--frames", type=int, nargs="+", default=[8, 16])
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="CPU workers / DALI threads")
    p.add_argument("--batches", type=int, default=20, help="timed batches per measurement")
    p.add_argument("--backends", default="cpu,dali-cpu,dali-gpu", help="comma list; dali-gpu needs CUDA")
    a = p.parse_args(argv)
    wanted = [b.strip() for b in a.backends.split(",") if b.strip()]
    unknown = [b for b in wanted if b not in ("cpu", "dali-cpu", "dali-gpu")]
    if unknown:
        p.error(f"unknown backends {unknown} (choose from cpu, dali-cpu, dali-gpu)")
    h264, vp9 = a.h264, a.vp9
    if (h264 is None and set(wanted) & {"cpu", "dali-gpu"}) or (vp9 is None and "dali-cpu" in wanted):
        gen_h264, gen_vp9 = make_data(Path(a.data), a.videos, a.seconds, a.workers)
        h264, vp9 = h264 or gen_h264, vp9 or gen_vp9
    runs = {"cpu": ("cpu", "cpu", h264), "dali-cpu": ("dali", "cpu", vp9), "dali-gpu": ("dali", "cuda", h264)}
    rows = []
    for name in wanted:
        backend, device, shards = runs[name]
        if device == "cuda" and not torch.cuda.is_available():
            rows.append((name, ["n/a (no CUDA)"] * len(a.frames)))
            continue
        cells = []
        for frames in a.frames:
            rate = measure(Path(shards), a.split, backend, device, frames, a.size, a.batch, a.workers, a.batches)
            cells.append(f"{rate:.1f}")
            print(f"{name} T={frames}: {rate:.1f} clips/s", file=sys.stderr, flush=True)
        rows.append((name, cells))
    print(f"\nclips/s, {a.size} px, batch {a.batch}, {a.workers} workers/threads, {os.cpu_count()} CPU cores"
          f"{', ' + torch.cuda.get_device_name() if torch.cuda.is_available() else ''}\n")  # fmt: skip
    print("| backend | " + " | ".join(f"{f} frames" for f in a.frames) + " |")
    print("|---|" + "---|" * len(a.frames))
    for name, cells in rows:
        print(f"| {name} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
