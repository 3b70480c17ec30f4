"""Evaluate a trained CLAVER: multi-view top-1/top-5, per-class accuracy, confusion matrix,
zero-shot on other label sets and class splits.

    # Kinetics-400 val, 4 clips x 3 crops (the default), on 8 GPUs
    torchrun --nproc_per_node 8 tools/evaluate.py configs/k400_b16_8f.yaml --checkpoint runs/k400_b16_8f
    # single view, one process
    python tools/evaluate.py configs/debug.yaml --checkpoint runs/demo_kmt --views 1x1
    # zero-shot: another label set + bank, three test splits, mean +- std
    python tools/evaluate.py configs/zeroshot_ucf101.yaml --checkpoint runs/k400 \\
        --shards shards/ucf101/test1 shards/ucf101/test2 shards/ucf101/test3
    # zero-shot on the 220 new Kinetics-600 classes in three seeded 160-class splits
    python tools/evaluate.py configs/zeroshot_k600.yaml --checkpoint runs/k400 --class-splits 3 --split-size 160

CONFIG supplies the evaluation data (``data.val_shards``) and text (``text.labels``,
``text.bank``); the model architecture comes from the checkpoint's own config. Results
go to ``--out`` (default ``<checkpoint run>/eval/<config name>``): ``results.json``,
``per_class.csv``, ``confusion.csv`` and ``per_class.png``.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import sys
from pathlib import Path


log = logging.getLogger("claver_dist.evaluate")


def parse_views(text: str) -> tuple[int, int]:
    try:
        clips, crops = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--views {text!r}: expected CLIPSxCROPS, e.g. 4x3") from None
    if clips < 1 or crops not in (1, 3):
        raise argparse.ArgumentTypeError(f"--views {text!r}: clips >= 1 and crops 1 or 3")
    return clips, crops


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="claver-evaluate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", help="evaluation data + text config (YAML)")
    p.add_argument("--checkpoint", required=True, help="export folder, run folder or DeepSpeed checkpoint")
    p.add_argument("--views", type=parse_views, default=None, help="CLIPSxCROPS (default: eval.num_clips x eval.num_crops)")
    p.add_argument("--shards", nargs="+", default=None, help="evaluate each shard set (e.g. three test splits)")
    p.add_argument("--class-splits", type=int, default=0, help="also score N seeded random class subsets")
    p.add_argument("--split-size", type=int, default=160)
    p.add_argument("--split-seed", type=int, default=0)
    p.add_argument("--out", default=None, help="output folder")
    p.add_argument("overrides", nargs="*", help="dotted overrides of CONFIG (data.*, text.*, eval.*)")
    return p.parse_intermixed_args(argv)  # overrides may come after the options


def write_reports(out: Path, result: dict, class_names: list[str]) -> None:
    """per_class.csv, confusion.csv and a per-class accuracy plot from gathered predictions."""
    from claver_dist.eval.protocols import per_class_accuracy

    acc, conf = per_class_accuracy(result["predictions"], len(class_names))
    with open(out / "per_class.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "name", "samples", "top1"])
        for i, name in enumerate(class_names):
            w.writerow([i, name, int(conf[i].sum()), "" if acc[i] != acc[i] else f"{acc[i]:.4f}"])
    with open(out / "confusion.csv", "w", newline="") as f:
        csv.writer(f).writerows(conf.tolist())
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    order = sorted(range(len(class_names)), key=lambda i: (acc[i] if acc[i] == acc[i] else -1))
    fig, ax = plt.subplots(figsize=(8, max(3, 0.18 * len(class_names))))
    ax.barh([class_names[i] for i in order], [0 if acc[i] != acc[i] else 100 * acc[i] for i in order])
    ax.set_xlabel("top-1 (%)")
    ax.set_xlim(0, 100)
    ax.set_title(f"per-class top-1, overall {100 * result['top1']:.2f}%")
    ax.tick_params(axis="y", labelsize=6)
    fig.tight_layout()
    fig.savefig(out / "per_class.png", dpi=120)
    plt.close(fig)


def run(args: argparse.Namespace) -> dict:
    from claver_dist.config import load_config
    from claver_dist.data.loader import build_loader
    from claver_dist.distributed import DistEnv
    from claver_dist.eval.evaluate import class_text_features, evaluate
    from claver_dist.eval.load import load_trained
    from claver_dist.eval.protocols import class_splits, mean_std
    from claver_dist.text.prompts import load_bank
    from claver_dist.train.metrics import setup_logging

    ev = load_config(args.config, args.overrides)
    dist_env = DistEnv.from_environ(device=ev.train.device)
    setup_logging(dist_env.rank)
    if dist_env.world_size > 1:
        dist_env.init()
    model, trained = load_trained(args.checkpoint, device=dist_env.device)
    # the evaluation's own frame count and size; the model's temporal embedding follows them
    if (ev.data.num_frames, ev.data.image_size) != (trained.data.num_frames, trained.data.image_size):
        overrides = [f"data.num_frames={ev.data.num_frames}", f"data.image_size={ev.data.image_size}"]
        model, trained = load_trained(args.checkpoint, overrides, device=dist_env.device)
    bank = load_bank(ev.text.labels, ev.text.bank, ev.text.kinds, ev.text.use_templates)
    text = class_text_features(model, bank, dist_env.device)
    views = args.views or (ev.eval.num_clips, ev.eval.num_crops)
    subsets = class_splits(bank.num_classes, args.split_size, args.class_splits, args.split_seed) \
        if args.class_splits else None
    data = ev.data
    data.batch_size = ev.eval.batch_size
    results = []
    for shards in args.shards or [data.val_shards]:
        data.val_shards = shards
        loader = build_loader(data, "val", dist_env.rank, dist_env.world_size, ev.seed,
                              num_classes=bank.num_classes, device=dist_env.device.type, views=views)
        try:
            r = evaluate(model, loader, text, dist_env.device, progress=dist_env.is_main, keep_predictions=True,
                         class_subsets=subsets)
        finally:
            loader.close()  # its workers ignore job signals: an exit would wait on them
        r["shards"] = shards
        r["skipped"] = getattr(loader, "skipped", None) and len(loader.skipped)
        log.info("%s: top-1 %.2f%% top-5 %.2f%% on %d videos (%dx%d views)", shards, 100 * r["top1"],
                 100 * r["top5"], r["num_samples"], *views)
        results.append(r)
    summary = {"checkpoint": str(args.checkpoint), "views": list(views), "labels": ev.text.labels,
               "bank": ev.text.bank, "sets": [{k: v for k, v in r.items() if k != "predictions"} for r in results]}
    if len(results) > 1:
        summary["top1_mean"], summary["top1_std"] = mean_std([r["top1"] for r in results])
    if subsets:
        split_top1 = [s["top1"] for r in results for s in r["splits"]]
        summary["split_classes"] = subsets
        summary["split_top1_mean"], summary["split_top1_std"] = mean_std(split_top1)
    if dist_env.is_main:
        out = Path(args.out) if args.out else _default_out(args.checkpoint, ev.name)
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps(summary, indent=1))
        write_reports(out, results[0], bank.class_names)
        summary["out"] = str(out)
    return summary


def _default_out(checkpoint: str, name: str) -> Path:
    p = Path(checkpoint)
    run = p if (p / "config.yaml").is_file() else (p.parent if (p.parent / "config.yaml").is_file() else p.parent.parent)
    return run / "eval" / name


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        summary = run(args)
    except (FileNotFoundError, KeyError, ValueError) as e:
        print(f"evaluate: {e}", file=sys.stderr)
        return 2
    if "out" in summary:
        for s in summary["sets"]:
            print(f"{s['shards']}: top-1 {100 * s['top1']:.2f}  top-5 {100 * s['top5']:.2f}  ({s['num_samples']} videos)")
        if "top1_mean" in summary:
            print(f"mean over sets: top-1 {100 * summary['top1_mean']:.2f} +- {100 * summary['top1_std']:.2f}")
        if "split_top1_mean" in summary:
            print(f"mean over class splits: top-1 {100 * summary['split_top1_mean']:.2f} "
                  f"+- {100 * summary['split_top1_std']:.2f}")
        print(f"results in {summary['out']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
