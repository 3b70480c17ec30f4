"""The demo (`make demo`): CLAVER learns motion that a frame-pooling model cannot see.

    python -m tools.demo                 # everything below, resumable
    python -m tools.demo --nproc 1       # one training process instead of two

1. writes the synthetic size-order dataset (8 classes: a shape growing, shrinking, growing
   then shrinking, growing twice, ...; every class is the same set of frames in another
   order, so only the order tells them apart: ``claver_dist.data.synthetic.SIZE_CLASSES``)
   and packs it with the real shard builder into ``shards/demo``;
2. uses the demo prompt bank ``prompts/demo_motion.json`` (interpretive prompts for the
   synthetic classes, same format as the benchmark banks);
3. trains the debug-size CLAVER (KMT) on CPU with DeepSpeed, 2 processes by default;
4. trains the same model with the temporal blocks removed (mean of frame features);
5. evaluates both on the validation split and prints top-1 and the run folders;
6. classifies one validation video per class with ``tools/predict.py`` and the KMT model.

Every step is skipped when its output is already there, so a re-run is quick.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def demo_parser(prog: str, doc: str, name: str, per_class: int, per_class_help: str) -> argparse.ArgumentParser:
    """The options both demos share; ``name`` names the data, shard and config paths."""
    p = argparse.ArgumentParser(prog=prog, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nproc", type=int, default=2, help="training processes (default 2)")
    p.add_argument("--data", default=str(REPO / ".cache" / name), help="where the raw synthetic videos go")
    p.add_argument("--shards", default=str(REPO / "shards" / name))
    p.add_argument("--runs", default=str(REPO / "runs"))
    p.add_argument("--per-class", type=int, default=per_class, help=per_class_help)
    p.add_argument("--config", default=str(REPO / "configs" / f"{name}.yaml"))
    p.add_argument("overrides", nargs="*", help="extra config overrides for both runs")
    return p


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = demo_parser("claver-demo", __doc__, "demo", 160, "training videos per class")
    p.add_argument("--val-per-class", type=int, default=40)
    return p.parse_args(argv)


def build_data(args: argparse.Namespace) -> Path:
    """Synthetic videos -> shards (train, val) through tools/make_shards.py."""
    from claver_dist.data.synthetic import MotionSpec, write_motion_dataset
    from tools.make_shards import main as make_shards

    data, shards = Path(args.data), Path(args.shards)
    if not (data / "labels.csv").is_file():
        print(f"[demo] writing synthetic size-order videos to {data}")
        write_motion_dataset(data, per_class=args.per_class, val_per_class=args.val_per_class,
                             spec=MotionSpec(), seed=0, workers=os.cpu_count() or 1, progress=True,
                             family="size")
    for split in ("train", "val"):
        rc = make_shards([str(data / f"{split}.txt"), "--labels", str(data / "labels.csv"), "--out", str(shards),
                          "--split", split, "--short-side", "64", "--seed", "0"])
        if rc != 0:
            raise SystemExit(f"[demo] make_shards failed for {split} (exit {rc})")
    (shards / "labels.csv").write_text((data / "labels.csv").read_text())
    return shards


def train(args: argparse.Namespace, name: str, extra: list[str]) -> Path:
    """One run of ``args.config`` on the demo shards (train and val), unless it is exported already."""
    from launch.local import main as launch

    run_dir = Path(args.runs) / name
    if (run_dir / "export" / "model.safetensors").is_file():
        print(f"[demo] {run_dir} is trained already (delete it to train again)")
        return run_dir
    print(f"[demo] training {name} with {args.nproc} process(es) -> {run_dir}")
    rc = launch(["--nproc", str(args.nproc), args.config, f"run_dir={run_dir}", f"data.train_shards={args.shards}",
                 f"data.val_shards={args.shards}", *extra, *args.overrides])  # fmt: skip
    if rc != 0 or not (run_dir / "export" / "model.safetensors").is_file():
        raise SystemExit(f"[demo] training {name} failed")
    return run_dir


def evaluate(args: argparse.Namespace, run_dir: Path) -> float:
    from tools.evaluate import main as evaluate_main

    out = run_dir / "eval" / "val"
    rc = evaluate_main([args.config, "--checkpoint", str(run_dir), "--views", "1x1", "--out", str(out),
                        f"data.val_shards={args.shards}", f"text.labels={Path(args.shards) / 'labels.csv'}",
                        "data.num_workers=1"])
    if rc != 0:
        raise SystemExit(f"[demo] evaluation of {run_dir} failed")
    return json.loads((out / "results.json").read_text())["sets"][0]["top1"]


def predict_examples(args: argparse.Namespace, run_dir: Path) -> None:
    """The first validation video of each class through tools/predict.py (top-1 printed)."""
    from claver_dist.eval.protocols import parse_annotation_line
    from tools.predict import main as predict_main

    data, first = Path(args.data), {}
    for line in filter(str.strip, (data / "val.txt").read_text().splitlines()):
        rel, label = parse_annotation_line(line, str(data / "val.txt"))
        first.setdefault(label, str(data / rel))
    print(f"\n[demo] tools/predict.py --checkpoint {run_dir} --top 1, one validation video per class:")
    predict_main([*(first[c] for c in sorted(first)), "--checkpoint", str(run_dir), "--top", "1"])


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    t0 = time.time()
    build_data(args)
    t_data = time.time() - t0
    labels = f"text.labels={Path(args.shards) / 'labels.csv'}"
    kmt = train(args, "demo_kmt", [labels, "model.temporal=kmt"])
    mean = train(args, "demo_mean", [labels, "model.temporal=none"])
    results = {"kmt": evaluate(args, kmt), "mean": evaluate(args, mean)}
    classes = len((Path(args.shards) / "labels.csv").read_text().strip().splitlines()) - 1
    wall = time.time() - t0
    print("\n[demo] validation top-1 (single view)")
    print(f"  CLAVER, Kronecker-mask temporal blocks (KMT): {100 * results['kmt']:6.2f}%   run: {kmt}")
    print(f"  same model, mean of frame features (none):    {100 * results['mean']:6.2f}%   run: {mean}")
    print(f"  chance: {100 / classes:.2f}% ({classes} classes); data {t_data:.0f}s, total {wall:.0f}s")
    (Path(args.runs) / "demo_results.json").write_text(json.dumps(
        {"top1": results, "classes": classes, "wall_s": wall, "data_s": t_data}, indent=1))
    predict_examples(args, kmt)
    return 0


if __name__ == "__main__":
    sys.exit(main())
