"""Synthetic videos: motion-defined action classes for the demo, frame-numbered clips for tests.

Two families of action classes, both built so that a model which pools frames without
temporal modelling cannot tell the classes apart, while a temporal model can:

- ``"size"`` (``SIZE_CLASSES``, the demo's): a shape on a textured background changes
  size over time, and the class is the *order* of the sizes: growing, shrinking, growing
  then shrinking, growing twice, ... Every clip is one and the same set of frames (one
  per size, smallest to largest) put in the order of the class's size profile, so the
  unordered set of frames has exactly the same distribution in every class: a frame-mean
  model is at chance (12.5% for 8 classes), whatever it learns. Size is a global cue
  (the area of a bright shape) that a from-scratch ViT reads from a single frame within
  a few dozen steps, so what is left to learn is the temporal part.
- ``"motion"`` (``MOTION_CLASSES``): pairs that differ only in the direction of time:
  "moving up" is a "moving down" clip played backwards, with the same distribution of
  shapes, colours, textures and positions. A frame-pooling model is at chance inside a
  pair (at most 50% over 8 classes). Position-only motion is hard to learn from random
  weights (docs/model.md); the tests use this family.

All "size" classes and the first 8 "motion" classes (down/up, growing/shrinking, fading
in/out, coming together / moving apart) are unchanged by a horizontal flip, so the
reference augmentation keeps their labels true. Motion classes 9-12 (right/left,
clockwise/counter-clockwise) swap under a flip: train on them only with
``data.flip_prob=0``.

    write_motion_dataset("data/synthetic", num_classes=8, per_class=32, val_per_class=8)
    write_motion_dataset("data/sizes", family="size", per_class=160, val_per_class=40)
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
_MOTION_PAIRS = [  # (forward name, time-reversed name, motion kind)
    ("moving down", "moving up", "translate_y"),
    ("growing", "shrinking", "scale"),
    ("fading in", "fading out", "fade"),
    ("coming together", "moving apart", "converge"),
    ("moving right", "moving left", "translate_x"),
    ("rotating clockwise", "rotating counter-clockwise", "rotate"),
]
MOTION_CLASSES = [(name, kind, reverse) for forward, backward, kind in _MOTION_PAIRS
                  for name, reverse in ((forward, False), (backward, True))]
FLIP_SAFE_CLASSES = 8


def _zigzag(s: np.ndarray, pieces: int) -> np.ndarray:
    """Up, down, up, ... in ``pieces`` equal linear pieces, each covering [0, 1] once."""
    x = s * pieces
    k = np.minimum(np.floor(x), pieces - 1)
    f = x - k
    return np.where(k % 2 == 0, f, 1.0 - f)


# (name, size profile over normalised time s in [0, 1]). Every profile visits each size
# equally often (it is a measure-preserving map of [0, 1]), and a clip is the same frames
# sorted by the profile: only the order of the sizes tells the classes apart.
SIZE_CLASSES = [
    ("growing", lambda s: s),
    ("shrinking", lambda s: 1.0 - s),
    ("growing then shrinking", lambda s: _zigzag(s, 2)),
    ("shrinking then growing", lambda s: 1.0 - _zigzag(s, 2)),
    ("growing twice", lambda s: np.where(s < 0.5, 2 * s, 2 * s - 1)),
    ("shrinking twice", lambda s: 1.0 - np.where(s < 0.5, 2 * s, 2 * s - 1)),
    ("growing then shrinking then growing", lambda s: _zigzag(s, 3)),
    ("shrinking then growing then shrinking", lambda s: 1.0 - _zigzag(s, 3)),
]

# family -> (class names, default number of classes)
CLASS_FAMILIES = {
    "motion": ([c[0] for c in MOTION_CLASSES], FLIP_SAFE_CLASSES),
    "size": ([c[0] for c in SIZE_CLASSES], len(SIZE_CLASSES)),
}

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


def _colours(rng: np.random.Generator, w: int, h: int) -> tuple[np.ndarray, np.ndarray]:
    """A static colour-textured background (no motion cue) ``[h, w, 3]`` and a contrasting
    foreground colour ``[3]``."""
    bg = rng.integers(0, 110, 3)
    tex = rng.normal(0, 12, (h // 8 + 1, w // 8 + 1, 3)).repeat(8, 0).repeat(8, 1)[:h, :w]
    return np.clip(bg + tex, 0, 255), rng.integers(150, 256, 3).astype(np.float64)


def motion_frames(label: int, rng: np.random.Generator, spec: MotionSpec = MotionSpec()) -> np.ndarray:
    """One ``[T, H, W, 3]`` uint8 clip of class ``label`` (index into MOTION_CLASSES)."""
    _, kind, reverse = MOTION_CLASSES[label]
    w, h = spec.width, spec.height
    t = int(rng.integers(spec.min_frames, spec.max_frames + 1))
    size = min(w, h)
    background, fg = _colours(rng, w, h)
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


def size_order_frames(label: int, rng: np.random.Generator, spec: MotionSpec = MotionSpec(),
                      colour: str | None = None) -> np.ndarray:  # fmt: skip
    """One ``[T, H, W, 3]`` uint8 clip of class ``label`` (index into SIZE_CLASSES).

    The random draws do not depend on the label: with the same ``rng`` state every class
    gets the same frames (one per size, from small to large), in its own order.
    ``colour`` (a ``NAMED_COLOURS`` key) paints the shape in that colour instead of a drawn one."""
    _, profile = SIZE_CLASSES[label]
    w, h = spec.width, spec.height
    t = int(rng.integers(spec.min_frames, spec.max_frames + 1))
    size = min(w, h)
    background, fg = _colours(rng, w, h)
    if colour is not None:
        fg = np.array(NAMED_COLOURS[colour], np.float64)
    shape = str(rng.choice(["square", "disk", "triangle"]))
    angle = rng.uniform(0, 2 * math.pi)
    cx, cy = w / 2 + rng.uniform(-0.1, 0.1) * w, h / 2 + rng.uniform(-0.1, 0.1) * h
    r0, r1 = size * rng.uniform(0.06, 0.1), size * rng.uniform(0.32, 0.4)
    radii = r0 + (r1 - r0) * np.linspace(0.0, 1.0, t)  # sorted: frame k has the k-th smallest size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64) + 0.5
    frames = np.empty((t, h, w, 3), np.uint8)
    for k, r in enumerate(radii):
        pts = _shape_points(shape, cx, cy, r, angle)
        mask = (xx - cx) ** 2 + (yy - cy) ** 2 <= r**2 if pts is None else _polygon_mask(xx, yy, pts)
        img = background.copy()
        img[mask] = fg
        frames[k] = img.astype(np.uint8)
    # frame i shows the size ranked where the profile puts time i (stable for ties)
    rank = np.argsort(np.argsort(profile(np.linspace(0.0, 1.0, t)), kind="stable"), kind="stable")
    return frames[rank]


def class_frames(family: str, label: int, rng: np.random.Generator, spec: MotionSpec = MotionSpec()) -> np.ndarray:
    """One clip of class ``label`` of ``family`` ("motion" or "size")."""
    if family == "motion":
        return motion_frames(label, rng, spec)
    if family == "size":
        return size_order_frames(label, rng, spec)
    raise ValueError(f"unknown class family {family!r} (known: {', '.join(CLASS_FAMILIES)})")


def _write_one(args: tuple) -> str:
    path, label, seed, index, spec, codec, family = args
    rng = np.random.default_rng([seed, label, index])
    write_video(path, class_frames(family, label, rng, spec), spec.fps, codec=codec, crf=14)
    return str(path)


def write_motion_dataset(
    out: str | Path,
    num_classes: int | None = None,
    per_class: int = 32,
    val_per_class: int = 8,
    spec: MotionSpec = MotionSpec(),
    seed: int = 0,
    codec: str = "h264",
    workers: int = 1,
    progress: bool = False,
    family: str = "motion",
) -> dict[str, Path]:
    """Write videos + ``train.txt``/``val.txt`` annotations + ``labels.csv`` under ``out``.

    ``family``: "motion" (``MOTION_CLASSES``; default 8 classes, the flip-safe ones) or
    "size" (``SIZE_CLASSES``, all 8 by default); the first ``num_classes`` are written."""
    if family not in CLASS_FAMILIES:
        raise ValueError(f"unknown class family {family!r} (known: {', '.join(CLASS_FAMILIES)})")
    names, default = CLASS_FAMILIES[family]
    num_classes = default if num_classes is None else num_classes
    if not 2 <= num_classes <= len(names):
        raise ValueError(f"num_classes must be in [2, {len(names)}] for the {family} family, got {num_classes}")
    out = Path(out)
    ext = {"h264": "mp4", "vp9": "webm", "mjpeg": "avi"}[codec]
    jobs, lines = [], {"train": [], "val": []}
    for label in range(num_classes):
        name = names[label].replace(" ", "_")
        for split, count, offset in (("train", per_class, 0), ("val", val_per_class, 1_000_000)):
            for i in range(count):
                rel = f"videos/{name}/{split}_{i:05d}.{ext}"
                jobs.append((out / rel, label, seed, offset + i, spec, codec, family))
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
    paths["labels"].write_text("id,name\n" + "".join(f"{i},{names[i]}\n" for i in range(num_classes)))
    return paths


# --------------------------------------------------------------------------- captioned clips

# shape colours a caption names: far apart, and bright against the dark backgrounds
NAMED_COLOURS = {"red": (235, 45, 45), "green": (50, 205, 70), "blue": (60, 100, 250), "yellow": (240, 220, 40)}
_VERBS = {"growing": "grows", "shrinking": "shrinks"}
# several ways to say one clip (a caption is drawn per clip per epoch)
CAPTION_FORMS = ["a {colour} shape {events}", "the {colour} shape {events}, in that order",
                 "{colour} shape: {name}"]


def size_caption(label: int, colour: str, form: int = 0) -> str:
    """A caption of a size-order clip: its colour and its events in order, e.g. "a red shape
    grows then shrinks" for "growing then shrinking"."""
    name = SIZE_CLASSES[label][0]
    events = " ".join(_VERBS.get(word, word) for word in name.split())
    return CAPTION_FORMS[form].format(colour=colour, events=events, name=name)


def _write_captioned(args: tuple) -> str:
    path, label, colour, seed, index, spec = args
    rng = np.random.default_rng([seed, label, index])
    write_video(path, size_order_frames(label, rng, spec, colour), spec.fps, crf=14)
    return str(path)


def write_caption_dataset(out: str | Path, per_class: int = 120, val_per_pair: int = 1, spec: MotionSpec = MotionSpec(),
                          seed: int = 0, workers: int = 1, progress: bool = False) -> dict[str, Path]:  # fmt: skip
    """Size-order clips with captions (video-text pretraining demo): every clip a shape of a
    named colour whose size changes in the order of its ``SIZE_CLASSES`` class; its captions
    (``CAPTION_FORMS``) name the colour and the events in order. A frame-pooling model can
    read the colour but not the order, so a caption matches 1 of the 8 clips of its colour
    for it. Train: ``per_class`` clips per order, colours in turn; val: ``val_per_pair``
    clips per (order, colour), so with 1 every val caption is unique.
    Writes ``videos/``, ``train.csv`` and ``val.csv`` (``path,caption``, one row per caption)."""
    import csv

    out = Path(out)
    colours = list(NAMED_COLOURS)
    jobs, rows = [], {"train": [], "val": []}
    for label in range(len(SIZE_CLASSES)):
        name = SIZE_CLASSES[label][0].replace(" ", "_")
        clips = [("train", i, colours[i % len(colours)], i) for i in range(per_class)]
        clips += [("val", i, c, 1_000_000 + i * len(colours) + k) for i in range(val_per_pair)
                  for k, c in enumerate(colours)]  # fmt: skip
        for split, i, colour, index in clips:
            rel = f"videos/{name}/{split}_{colour}_{i:05d}.mp4"
            jobs.append((out / rel, label, colour, seed, index, spec))
            rows[split] += [(rel, size_caption(label, colour, f)) for f in range(len(CAPTION_FORMS))]
    if workers > 1:
        import multiprocessing as mp

        with mp.get_context("spawn").Pool(workers) as pool:  # never fork a threaded caller
            _drain(pool.imap_unordered(_write_captioned, jobs, chunksize=4), len(jobs), progress)
    else:
        _drain(map(_write_captioned, jobs), len(jobs), progress)
    paths = {}
    for split in ("train", "val"):
        paths[split] = out / f"{split}.csv"
        with open(paths[split], "w", newline="") as f:
            csv.writer(f).writerows([("path", "caption"), *rows[split]])
    return paths


def _drain(it, total: int, progress: bool) -> None:
    if progress:
        from tqdm import tqdm

        it = tqdm(it, total=total, desc="videos", unit="video")
    for _ in it:
        pass
