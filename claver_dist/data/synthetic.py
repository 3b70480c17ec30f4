"""Synthetic videos: motion-defined action classes for the demo, frame-numbered clips for tests.

Motion classes come in pairs that differ only in the direction of time: "moving up" is
a "moving down" clip played backwards, with the same distribution of shapes, colours,
textures and positions. Every single frame, and the average of all frames, therefore
has the same distribution in both classes of a pair: a model that pools frames without
temporal modelling cannot beat chance inside a pair (at most 50% over 8 classes), while a
temporal model can learn all of them from 8 frames at 64 px.

The default 8 classes (down/up, growing/shrinking, fading in/out, coming together /
moving apart) are unchanged by a horizontal flip, so the reference augmentation keeps
their labels true. Classes 9-12 (right/left, clockwise/counter-clockwise) swap under a
flip: train on them only with ``data.flip_prob=0``.

    write_motion_dataset("data/synthetic", num_classes=8, per_class=32, val_per_class=8)
    # -> videos/*.mp4, train.txt / val.txt ("relative/path.mp4 label"), labels.csv

Frame-numbered videos paint each frame's index in binary as horizontal bands, which
survive compression, resizing and centre/horizontal cropping, so tests can read back
which frames a loader decoded (``read_frame_number``).

Everything is deterministic given the seed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np

# (name, motion kind, reversed): the two classes of a pair share one trajectory generator
# and differ only in the direction of time. The first 8 classes are unchanged by a
# horizontal flip, so the reference augmentation (flip p=0.5) keeps their labels true;
# the last 4 are mirror images of each other (a flipped "moving right" clip is a "moving
# left" clip): use them only with data.flip_prob=0.
MOTION_CLASSES = [
    ("moving down", "translate_y", False),
    ("moving up", "translate_y", True),
    ("growing", "scale", False),
    ("shrinking", "scale", True),
    ("fading in", "fade", False),
    ("fading out", "fade", True),
    ("coming together", "converge", False),
    ("moving apart", "converge", True),
    ("moving right", "translate_x", False),
    ("moving left", "translate_x", True),
    ("rotating clockwise", "rotate", False),
    ("rotating counter-clockwise", "rotate", True),
]
FLIP_SAFE_CLASSES = 8

FRAME_NUMBER_BITS = 8


def write_video(path: str | Path, frames: np.ndarray, fps: float = 25.0, codec: str = "h264", crf: int = 12) -> None:
    """Encode uint8 ``[T, H, W, 3]`` RGB frames (H, W even) to ``path`` with PyAV."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    t, h, w, _ = frames.shape
    lib, opts = {
        "h264": ("libx264", {"crf": str(crf), "preset": "ultrafast", "g": "8", "bf": "0"}),
        "vp9": ("libvpx-vp9", {"crf": "24", "b": "0", "deadline": "realtime", "cpu-used": "8", "g": "8"}),
        "mjpeg": ("mjpeg", {"q:v": "3"}),
    }[codec]
    from fractions import Fraction

    fmt = {"h264": "mp4", "vp9": "webm", "mjpeg": "avi"}[codec]
    with av.open(str(path), "w", format=fmt) as out:
        stream = out.add_stream(lib, rate=Fraction(fps).limit_denominator(1001))
        stream.width, stream.height = w, h
        stream.pix_fmt = "yuvj420p" if codec == "mjpeg" else "yuv420p"
        stream.options = opts
        stream.codec_context.thread_count = 1
        for f in frames:
            out.mux(stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(f), format="rgb24")))
        out.mux(stream.encode(None))


# --------------------------------------------------------------------------- frame numbers


def frame_number_frames(num_frames: int, width: int = 64, height: int = 48) -> np.ndarray:
    """``[T, H, W, 3]`` frames whose horizontal bands spell the frame index in binary (MSB on top)."""
    if num_frames > 2**FRAME_NUMBER_BITS:
        raise ValueError(f"at most {2**FRAME_NUMBER_BITS} frames")
    out = np.zeros((num_frames, height, width, 3), np.uint8)
    band = height / FRAME_NUMBER_BITS
    for t in range(num_frames):
        for b in range(FRAME_NUMBER_BITS):
            if (t >> (FRAME_NUMBER_BITS - 1 - b)) & 1:
                out[t, int(round(b * band)) : int(round((b + 1) * band))] = 255
    return out


def read_frame_number(frame: np.ndarray) -> int:
    """Inverse of ``frame_number_frames`` for one frame ``[H, W, 3]`` or ``[H, W]`` (any scale)."""
    gray = frame.mean(-1) if frame.ndim == 3 else frame
    h = gray.shape[0]
    band = h / FRAME_NUMBER_BITS
    n = 0
    for b in range(FRAME_NUMBER_BITS):
        lo, hi = int(b * band + band / 4), int(math.ceil((b + 1) * band - band / 4))
        bit = gray[lo : max(hi, lo + 1)].mean() > gray.min() + (gray.max() - gray.min()) / 2 if gray.max() > gray.min() else False
        n = n * 2 + int(bit)
    return n


# --------------------------------------------------------------------------- motion classes


@dataclass
class MotionSpec:
    width: int = 128
    height: int = 96
    min_frames: int = 16
    max_frames: int = 32
    fps: float = 25.0


def _polygon_mask(xx: np.ndarray, yy: np.ndarray, pts: np.ndarray) -> np.ndarray:
    """Points inside a convex polygon given counter-clockwise (in image coordinates)."""
    inside = np.ones_like(xx, dtype=bool)
    n = len(pts)
    for i in range(n):
        (x0, y0), (x1, y1) = pts[i], pts[(i + 1) % n]
        inside &= (x1 - x0) * (yy - y0) - (y1 - y0) * (xx - x0) >= 0
    return inside


def _shape_points(kind: str, cx: float, cy: float, r: float, angle: float) -> np.ndarray | None:
    if kind == "disk":
        return None
    if kind == "square":
        base = [(-1, -1), (-1, 1), (1, 1), (1, -1)]
        base = [(x * 0.8, y * 0.8) for x, y in base]
    else:  # elongated triangle: no rotational symmetry, so rotation direction is visible
        base = [(1.2, 0.0), (-0.8, -0.55), (-0.8, 0.55)]
        base = [(x, -y) for x, y in base]
    c, s = math.cos(angle), math.sin(angle)
    pts = [(cx + r * (x * c - y * s), cy + r * (x * s + y * c)) for x, y in base]
    arr = np.array(pts)
    # orient counter-clockwise for _polygon_mask
    area = sum(arr[i, 0] * arr[(i + 1) % len(arr), 1] - arr[(i + 1) % len(arr), 0] * arr[i, 1] for i in range(len(arr)))
    return arr if area > 0 else arr[::-1]


def motion_frames(label: int, rng: np.random.Generator, spec: MotionSpec = MotionSpec()) -> np.ndarray:
    """One ``[T, H, W, 3]`` uint8 clip of class ``label`` (index into MOTION_CLASSES)."""
    _, kind, reverse = MOTION_CLASSES[label]
    w, h = spec.width, spec.height
    t = int(rng.integers(spec.min_frames, spec.max_frames + 1))
    size = min(w, h)
    # background: a static colour texture (no motion cue), foreground: a contrasting colour
    bg = rng.integers(0, 110, 3)
    tex = rng.normal(0, 12, (h // 8 + 1, w // 8 + 1, 3)).repeat(8, 0).repeat(8, 1)[:h, :w]
    background = np.clip(bg + tex, 0, 255)
    fg = rng.integers(150, 256, 3).astype(np.float64)
    shape = str(rng.choice(["triangle"] if kind == "rotate" else ["square", "disk", "triangle"]))
    r = size * rng.uniform(0.12, 0.2)
    angle0 = rng.uniform(0, 2 * math.pi)
    cx0, cy0 = w / 2 + rng.uniform(-0.1, 0.1) * w, h / 2 + rng.uniform(-0.1, 0.1) * h
    s = np.linspace(0.0, 1.0, t)
    # per frame: list of (cx, cy, radius, angle) shapes, and the foreground opacity
    cx, cy, rad, ang = np.full(t, cx0), np.full(t, cy0), np.full(t, r), np.full(t, angle0)
    alpha = np.ones(t)
    offsets = [0.0]  # horizontal offsets of the shape copies from cx
    if kind == "translate_x":
        span = rng.uniform(0.35, 0.5) * w
        cx = cx0 - span / 2 + span * s
    elif kind == "translate_y":
        span = rng.uniform(0.35, 0.5) * h
        cy = cy0 - span / 2 + span * s
    elif kind == "rotate":
        total = rng.uniform(0.6, 1.0) * math.pi
        ang = angle0 + total * s  # image y points down: increasing angle turns clockwise on screen
        cx, cy, rad = np.full(t, w / 2.0), np.full(t, h / 2.0), np.full(t, size * 0.3)
    elif kind == "scale":
        r0, r1 = size * rng.uniform(0.08, 0.12), size * rng.uniform(0.3, 0.38)
        rad = r0 + (r1 - r0) * s
    elif kind == "fade":
        alpha = rng.uniform(0.0, 0.15) + rng.uniform(0.75, 0.85) * s
    else:  # converge: two copies, mirror-symmetric about cx, from far apart to nearly touching
        rad = np.full(t, size * rng.uniform(0.1, 0.14))
        far, near = w * rng.uniform(0.3, 0.38), rad[0] * 1.2
        d = far + (near - far) * s
        offsets = [-1.0, 1.0]
        cx = np.full(t, w / 2 + rng.uniform(-0.03, 0.03) * w)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64) + 0.5
    frames = np.empty((t, h, w, 3), np.uint8)
    for i in range(t):
        mask = np.zeros((h, w), bool)
        for o in offsets:
            x = cx[i] + (o * d[i] if kind == "converge" else 0.0)
            pts = _shape_points(shape, x, cy[i], rad[i], ang[i] if o <= 0 else math.pi - ang[i])
            if pts is None:
                mask |= (xx - x) ** 2 + (yy - cy[i]) ** 2 <= rad[i] ** 2
            else:
                mask |= _polygon_mask(xx, yy, pts)
        img = background.copy()
        img[mask] = background[mask] + alpha[i] * (fg - background[mask])
        frames[i] = img.astype(np.uint8)
    return frames[::-1].copy() if reverse else frames


def _write_one(args: tuple) -> str:
    path, label, seed, index, spec, codec = args
    rng = np.random.default_rng([seed, label, index])
    write_video(path, motion_frames(label, rng, spec), spec.fps, codec=codec, crf=14)
    return str(path)


def write_motion_dataset(
    out: str | Path,
    num_classes: int = FLIP_SAFE_CLASSES,
    per_class: int = 32,
    val_per_class: int = 8,
    spec: MotionSpec = MotionSpec(),
    seed: int = 0,
    codec: str = "h264",
    workers: int = 1,
    progress: bool = False,
) -> dict[str, Path]:
    """Write videos + ``train.txt``/``val.txt`` annotations + ``labels.csv`` under ``out``."""
    if not 2 <= num_classes <= len(MOTION_CLASSES):
        raise ValueError(f"num_classes must be in [2, {len(MOTION_CLASSES)}], got {num_classes}")
    out = Path(out)
    ext = {"h264": "mp4", "vp9": "webm", "mjpeg": "avi"}[codec]
    jobs, lines = [], {"train": [], "val": []}
    for label in range(num_classes):
        name = MOTION_CLASSES[label][0].replace(" ", "_")
        for split, count, offset in (("train", per_class, 0), ("val", val_per_class, 1_000_000)):
            for i in range(count):
                rel = f"videos/{name}/{split}_{i:05d}.{ext}"
                jobs.append((out / rel, label, seed, offset + i, spec, codec))
                lines[split].append(f"{rel} {label}")
    if workers > 1:
        import multiprocessing as mp

        with mp.get_context("spawn").Pool(workers) as pool:  # never fork a threaded caller
            it = pool.imap_unordered(_write_one, jobs, chunksize=4)
            _drain(it, len(jobs), progress)
    else:
        _drain(map(_write_one, jobs), len(jobs), progress)
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for split in ("train", "val"):
        paths[split] = out / f"{split}.txt"
        paths[split].write_text("\n".join(lines[split]) + "\n" if lines[split] else "")
    paths["labels"] = out / "labels.csv"
    paths["labels"].write_text("id,name\n" + "".join(f"{i},{MOTION_CLASSES[i][0]}\n" for i in range(num_classes)))
    return paths


def _drain(it, total: int, progress: bool) -> None:
    if progress:
        from tqdm import tqdm

        it = tqdm(it, total=total, desc="videos", unit="video")
    for _ in it:
        pass
