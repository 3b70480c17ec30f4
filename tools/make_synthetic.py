"""Write a synthetic action dataset: short videos whose class only shows over time.

    python tools/make_synthetic.py data/synthetic --classes 8 --per-class 32 --val-per-class 8
    python tools/make_synthetic.py data/sizes --family size     # the demo's classes
    python tools/make_shards.py data/synthetic/train.txt --labels data/synthetic/labels.csv \\
        --out shards/demo --split train --short-side 64
    python tools/make_shards.py data/synthetic/val.txt --labels data/synthetic/labels.csv \\
        --out shards/demo --split val --short-side 64

Classes come in time-reversed pairs (moving down/up, growing/shrinking, fading in/out,
coming together / moving apart; with ``--classes`` above 8 also moving right/left and
rotating clockwise / counter-clockwise, which need ``data.flip_prob=0``) with identical
distributions of single frames, so only temporal modelling separates a pair. ``--family
size``: 8 classes that are orders of one set of frames (a shape growing, shrinking,
growing then shrinking, growing twice, ...), so a frame-pooling model is at chance over
all 8 (the demo's; see ``claver_dist.data.synthetic``).
Writes ``OUT/videos/<class>/*.mp4``, ``OUT/train.txt`` and ``OUT/val.txt`` (``path
label`` lines, the format make_shards reads) and ``OUT/labels.csv`` (``id,name``).
Deterministic given ``--seed``.
"""

from __future__ import annotations

import argparse
import os
import sys

from claver_dist.data.synthetic import CLASS_FAMILIES, MotionSpec, write_motion_dataset


def _size(text: str) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"size must be WIDTHxHEIGHT, got {text!r}") from None
    if w < 16 or h < 16 or w % 2 or h % 2:
        raise argparse.ArgumentTypeError(f"size must be even and >= 16 on both sides, got {text!r}")
    return w, h


def _frames(text: str) -> tuple[int, int]:
    lo, _, hi = text.partition("-")
    try:
        a, b = int(lo), int(hi or lo)
    except ValueError:
        raise argparse.ArgumentTypeError(f"frames must be N or MIN-MAX, got {text!r}") from None
    if not 2 <= a <= b:
        raise argparse.ArgumentTypeError(f"frames must satisfy 2 <= MIN <= MAX, got {text!r}")
    return a, b


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", help="output folder")
    p.add_argument("--family", choices=sorted(CLASS_FAMILIES), default="motion",
                   help="motion: time-reversed motion pairs (default); size: orders of sizes (the demo's)")
    p.add_argument("--classes", type=int, default=None,
                   help=f"number of classes (motion: 2..{len(CLASS_FAMILIES['motion'][0])}, default "
                   f"{CLASS_FAMILIES['motion'][1]}, above that classes swap under a horizontal flip; "
                   f"size: 2..{len(CLASS_FAMILIES['size'][0])}, default all)")  # fmt: skip
    p.add_argument("--per-class", type=int, default=32, help="training videos per class (default 32)")
    p.add_argument("--val-per-class", type=int, default=8, help="validation videos per class (default 8)")
    p.add_argument("--size", type=_size, default=(128, 96), help="WIDTHxHEIGHT (default 128x96)")
    p.add_argument("--frames", type=_frames, default=(16, 32), help="frames per video, N or MIN-MAX (default 16-32)")
    p.add_argument("--fps", type=float, default=25.0)
    p.add_argument("--codec", choices=["h264", "vp9", "mjpeg"], default="h264", help="codec of the source videos")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    names, default = CLASS_FAMILIES[a.family]
    a.classes = default if a.classes is None else a.classes
    if not 2 <= a.classes <= len(names):
        p.error(f"--classes must be in [2, {len(names)}] for --family {a.family}")
    spec = MotionSpec(width=a.size[0], height=a.size[1], min_frames=a.frames[0], max_frames=a.frames[1], fps=a.fps)
    paths = write_motion_dataset(a.out, a.classes, a.per_class, a.val_per_class, spec, a.seed, a.codec,
                                 a.workers, progress=not a.no_progress, family=a.family)  # fmt: skip
    print(f"{a.out}: {a.classes} classes x ({a.per_class} train + {a.val_per_class} val) videos; "
          f"annotations {paths['train']}, {paths['val']}; labels {paths['labels']}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
