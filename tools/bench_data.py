"""Data loading throughput: decode speed per core, and clips/s per loader backend at 224 px.

    python tools/bench_data.py                         # builds a benchmark set once, then measures
    python tools/bench_data.py --h264 shards/k400 --vp9 shards/k400_vp9 --split val --batches 50
    python tools/bench_data.py --backends none --clips 300          # only the per-core table

Per core (one process, one thread: torch and FFmpeg): for each CPU decoder (``pyav``, the
project's ``video.decode_frames``; ``torchcodec``'s CPU ``VideoDecoder`` where it is installed,
which it is not by default: docs/benchmarks.md, "Decode speed per core", says why)
clips/s of decode only (the TSN train indices of one clip, uint8 RGB frames) and of decode
+ crop/resize to ``S x S`` (uint8, ``augment.crop_resize`` with the train geometry of
``augment.draw_params``), and of decode + the whole augmentation to float32 on the CPU
(``augment.apply_views``, what a CPU-device run does), on the H.264 shards. Then the bytes
of one batch crossing to the device: ``B x T x 3 x S x S`` as uint8 (x 1) and as float32 (x 4).

Loader backends: ``cpu`` (PyAV in ``--workers`` DataLoader processes, H.264 shards),
``dali-cpu`` (DALI on the CPU, ``--workers`` threads, VP9 shards) and ``dali-gpu``
(NVDEC + GPU augmentation, H.264 shards) when CUDA is present. Every backend runs the
training path: random TSN offsets, multi-scale crop, flip, colour jitter, normalise,
``B x T x 3 x S x S`` float32 batches.

Without ``--h264``/``--vp9`` it generates Kinetics-like inputs once into ``--data``
(default ``.cache/bench_data``): 10 s synthetic clips at 25 fps, 426x320, packed with
``make_shards.py`` at its defaults (short side 256, keyframe every 12 frames; another
``--short-side`` gets its own folder). Prints markdown tables.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from claver_dist.data.augment import AugmentSpec, apply_views, crop_resize
from claver_dist.data.config import DataConfig
from claver_dist.data.loader import build_loader
from claver_dist.data.plan import Prepared, SampleContext, prepare
from claver_dist.data.shards import ShardSet, resolve_shards
from claver_dist.data.video import EncodeSettings, decode_frames

Decoder = Callable[[bytes, list[int], bool, int], np.ndarray]


def make_data(folder: Path, videos: int, seconds: float, workers: int, short_side: int,
              codecs: tuple[str, ...] = ("h264", "vp9")) -> dict[str, Path]:  # fmt: skip
    """Synthetic 426x320 clips -> shard sets per codec (skipped when already there)."""
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
    for codec in codecs:
        out[codec] = folder / f"{codec}_s{short_side}"
        if not (out[codec] / "manifest.json").is_file():
            rc = make_shards([str(src / "list.txt"), "--labels", str(src / "labels.csv"), "--out", str(out[codec]),
                              "--codec", codec, "--short-side", str(short_side), "--workers", str(workers),
                              "--no-progress"])  # fmt: skip
            if rc != 0:
                raise SystemExit(f"make_shards failed for {codec}")
    return out


# --------------------------------------------------------------------------- per core


def _pyav(data: bytes, indices: list[int], cfr: bool, keyint: int) -> np.ndarray:
    return decode_frames(data, indices, cfr=cfr, keyint=keyint)


def _torchcodec(data: bytes, indices: list[int], cfr: bool, keyint: int) -> np.ndarray:
    """torchcodec's CPU decoder under decode_frames' contract: frames ``indices`` (any order,
    repeats) as uint8 ``[N, H, W, 3]``, one FFmpeg thread. Exact seek mode: frames numbered by
    a scan of the packets, a seek to the keyframe before each far-away index, display
    matrices applied (checked against PyAV below, bitwise equal on the builder's shards)."""
    from torchcodec.decoders import VideoDecoder

    dec = VideoDecoder(data, device="cpu", num_ffmpeg_threads=1, dimension_order="NHWC", seek_mode="exact")
    return dec.get_frames_at(list(indices)).data.numpy()


def decoders(names: list[str]) -> dict[str, Decoder | str]:
    """name -> decode function, or the reason it cannot run here."""
    out: dict[str, Decoder | str] = {}
    for name in names:
        if name == "pyav":
            out[name] = _pyav
        elif name == "torchcodec":
            try:
                from torchcodec.decoders import VideoDecoder  # noqa: F401 - loads its FFmpeg libraries
            except ModuleNotFoundError:
                out[name] = "not installed"
                continue
            except (ImportError, OSError, RuntimeError) as e:  # no FFmpeg libraries, another torch ABI
                out[name] = f"does not load: {type(e).__name__}: {(str(e).splitlines() or [''])[0][:80]}"
                continue
            out[name] = _torchcodec
        else:
            raise SystemExit(f"unknown decoder {name!r} (choose from pyav, torchcodec)")
    return out


def prepare_clips(shards_dir: Path, split: str, frames: int, size: int, clips: int, seed: int = 0) -> list[Prepared]:
    """``clips`` train samples as the loader prepares them (TSN train indices, train crop
    boxes, each from the sample's own stream), cycling over the split's samples epoch by epoch;
    read and checked here, outside the timing."""
    shards = ShardSet(*resolve_shards(str(shards_dir), split))
    ctx = SampleContext(seed=seed, train=True, num_frames=frames, clips=1, crops=1, spec=AugmentSpec(size=size))
    return [prepare(shards, n % len(shards), n // len(shards), ctx) for n in range(clips)]


def per_core(decode: Decoder, clips: list[Prepared], size: int, then: str = "", warmup: int = 5) -> float:
    """clips/s of one thread: decode every clip once, then ``crop`` (crop/resize to uint8
    ``size x size``) or ``float`` (the whole augmentation to normalised float32 on the CPU,
    ``augment.apply_views``: what a CPU-device run does) or nothing."""

    def one(p: Prepared) -> None:
        x = decode(p.data, p.indices, bool(p.meta.get("cfr")), int(p.meta.get("keyint", 0)))
        if then == "crop":
            crop_resize(x, p.params, size)
        elif then == "float":
            apply_views(x, p.params, size)

    for p in clips[:warmup]:
        one(p)
    t = time.perf_counter()
    for p in clips:
        one(p)
    return len(clips) / (time.perf_counter() - t)


# what follows the decode in a per-core measurement -> its name
STEPS = {"": "decode only", "crop": "decode + crop/resize", "float": "decode + float augment"}


def _spread(rates: list[float]) -> str:
    r = sorted(rates)
    return f"{r[len(r) // 2]:.1f}" + (f" ({r[0]:.1f}-{r[-1]:.1f})" if len(r) > 1 else "")


def check_same_frames(decs: dict[str, Decoder], clips: list[Prepared]) -> str:
    """Every decoder against the first (pyav) on a few clips: same indices, pixel difference."""
    names = list(decs)
    notes = []
    for name in names[1:]:
        diffs = []
        for p in clips[:4]:
            args = (p.data, p.indices, bool(p.meta.get("cfr")), int(p.meta.get("keyint", 0)))
            a, b = decs[names[0]](*args), decs[name](*args)
            if a.shape != b.shape:
                return f"{name}: shape {b.shape} != {a.shape}"
            diffs.append(np.abs(a.astype(np.int16) - b.astype(np.int16)))
        d = np.stack(diffs)
        notes.append(f"{name} vs {names[0]}: mean |diff| {d.mean():.3f}, max {d.max()} (grey levels)")
    return "; ".join(notes)


def batch_bytes(batch: int, frames: int, size: int) -> tuple[int, int]:
    """Bytes of one ``B x T x 3 x S x S`` batch as uint8 and as float32."""
    n = batch * frames * 3 * size * size
    return n, 4 * n


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


# --------------------------------------------------------------------------- loader backends


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
    p.add_argument("--h264", default=None, help="H.264 shard folder (per-core table, cpu and dali-gpu backends)")
    p.add_argument("--vp9", default=None, help="VP9 shard folder (dali-cpu backend)")
    p.add_argument("--split", default="train", help="manifest split to read (default train)")
    p.add_argument("--data", default=".cache/bench_data", help="where generated benchmark shards live")
    p.add_argument("--videos", type=int, default=16, help="generated videos (default 16)")
    p.add_argument("--seconds", type=float, default=10.0, help="generated clip length (default 10 s)")
    p.add_argument("--short-side", type=int, default=EncodeSettings().short_side,
                   help=f"generated shards' short side (default {EncodeSettings().short_side}, make_shards' default)")
    p.add_argument("--frames", type=int, nargs="+", default=[8, 16])
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="CPU workers / DALI threads")
    p.add_argument("--batches", type=int, default=20, help="timed batches per measurement")
    p.add_argument("--backends", default="cpu,dali-cpu,dali-gpu", help="comma list; dali-gpu needs CUDA; 'none' skips")
    p.add_argument("--decoders", default="pyav,torchcodec", help="per-core table: comma list; 'none' skips it")
    p.add_argument("--clips", type=int, default=120, help="timed clips per per-core measurement (default 120)")
    p.add_argument("--repeats", type=int, default=3, help="per-core passes; the table gives median (min-max)")
    a = p.parse_args(argv)
    wanted = [b.strip() for b in a.backends.split(",") if b.strip() and b.strip() != "none"]
    unknown = [b for b in wanted if b not in ("cpu", "dali-cpu", "dali-gpu")]
    if unknown:
        p.error(f"unknown backends {unknown} (choose from cpu, dali-cpu, dali-gpu, or none)")
    decs = decoders([d.strip() for d in a.decoders.split(",") if d.strip() and d.strip() != "none"])
    h264, vp9 = a.h264, a.vp9
    need = [c for c, missing in (("h264", h264 is None and (decs or set(wanted) & {"cpu", "dali-gpu"})),
                                 ("vp9", vp9 is None and "dali-cpu" in wanted)) if missing]  # fmt: skip
    if need:
        gen = make_data(Path(a.data), a.videos, a.seconds, a.workers, a.short_side, tuple(need))
        h264, vp9 = h264 or gen.get("h264"), vp9 or gen.get("vp9")

    if decs:
        print_per_core(decs, Path(h264), a)

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
    if rows:
        print(f"\nloader backends: clips/s, {a.size} px, batch {a.batch}, {a.workers} workers/threads, "
              f"{os.cpu_count()} CPU cores{', ' + torch.cuda.get_device_name() if torch.cuda.is_available() else ''}\n")  # fmt: skip
        print("| backend | " + " | ".join(f"{f} frames" for f in a.frames) + " |")
        print("|---|" + "---|" * len(a.frames))
        for name, cells in rows:
            print(f"| {name} | " + " | ".join(cells) + " |")
    return 0


def print_per_core(decs: dict[str, Decoder | str], shards: Path, a: argparse.Namespace) -> None:
    """The per-core table (clips/s of one thread per decoder) and the bytes per batch."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one core: torch's resize; FFmpeg gets one thread from each decoder
    try:
        runnable = {n: d for n, d in decs.items() if not isinstance(d, str)}
        meta = ShardSet(*resolve_shards(str(shards), a.split)).load(0)[1]
        rows, notes = [], []
        for frames in a.frames:
            clips = prepare_clips(shards, a.split, frames, a.size, a.clips)
            if frames == a.frames[0] and len(runnable) > 1:
                notes.append(check_same_frames(runnable, clips))
            # repeats round-robin over decoders and steps, so a slow spell of the machine hits all
            rates: dict[tuple[str, str], list[float]] = {}
            for _ in range(a.repeats):
                for name, dec in runnable.items():
                    for then in STEPS:
                        rates.setdefault((name, then), []).append(per_core(dec, clips, a.size, then))
            for name, dec in decs.items():
                if isinstance(dec, str):
                    rows.append((name, frames, *[dec] * len(STEPS)))
                    continue
                cells = [_spread(rates[name, then]) for then in STEPS]
                print(f"{name} T={frames}: " + ", ".join(f"{STEPS[t]} {c}" for t, c in zip(STEPS, cells))
                      + " clips/s per core", file=sys.stderr, flush=True)  # fmt: skip
                rows.append((name, frames, *cells))
    finally:
        torch.set_num_threads(threads)
    kbps = 8 * meta["bytes"] / meta["duration"] / 1000 if meta.get("duration") else 0.0
    print(f"\nper core (1 process, 1 thread), clips/s, median (min-max) of {a.repeats} passes over {a.clips} train "
          f"clips (TSN train indices) from "
          f"{shards} ({meta['width']}x{meta['height']} {meta['codec']}, keyframe every {meta.get('keyint') or '?'} "
          f"frames, ~{kbps:.0f} kbit/s), crop/resize to {a.size} px uint8\n")  # fmt: skip
    print("| decoder | frames | decode only | decode + crop/resize (uint8) | decode + augment to float32 on the CPU |")
    print("|---|---|---|---|---|")
    for name, frames, *cells in rows:
        print(f"| {name} | {frames} | " + " | ".join(cells) + " |")
    for note in notes:
        print(f"\nsame frames: {note}")
    print(f"\nbytes per batch crossing to the device, batch {a.batch}, {a.size} px (B x T x 3 x S x S):\n")
    print("| frames | uint8 (x 1) | float32 (x 4) |")
    print("|---|---|---|")
    for frames in a.frames:
        u8, f32 = batch_bytes(a.batch, frames, a.size)
        print(f"| {frames} | {_mb(u8)} | {_mb(f32)} |")


if __name__ == "__main__":
    sys.exit(main())
