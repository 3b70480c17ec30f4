"""The pretraining demo (`make demo-pretrain`): video-text pretraining learns the order of events.

    python -m tools.demo_pretrain                 # everything below, resumable
    python -m tools.demo_pretrain --nproc 1       # one training process instead of two

1. writes captioned synthetic clips (``synthetic.write_caption_dataset``): a shape of a
   named colour whose size changes in one of 8 orders, captioned with its colour and its
   events in order ("a red shape grows then shrinks"), and packs them with the real shard
   builder (captions CSV) into ``shards/demo_pretrain``;
2. pretrains the debug-size CLAVER (KMT) with the global-negatives contrastive loss
   (``task: pretrain``, configs/demo_pretrain.yaml), 2 processes by default;
3. pretrains the same model with the temporal blocks removed (mean of frame features);
4. prints both runs' last text-to-video and video-to-text R@1 on the val split, where every
   caption is unique: the frame mean sees the colour but not the order, so it can tell a
   caption's clip from at best the 8 of its colour (R@1 near 1/8), KMT from all 32.

Every step is skipped when its output is already there, so a re-run is quick.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from tools.demo import demo_parser, train


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    return demo_parser("claver-demo-pretrain", __doc__, "demo_pretrain", 120,
                       "training clips per order of events").parse_args(argv)


def build_data(args: argparse.Namespace) -> Path:
    """Captioned synthetic clips -> shards (train, val) through tools/make_shards.py."""
    from claver_dist.data.synthetic import MotionSpec, write_caption_dataset
    from tools.make_shards import main as make_shards

    data, shards = Path(args.data), Path(args.shards)
    if not (data / "val.csv").is_file():
        print(f"[demo] writing captioned size-order clips to {data}")
        write_caption_dataset(data, per_class=args.per_class, spec=MotionSpec(), seed=0,
                              workers=os.cpu_count() or 1, progress=True)  # fmt: skip
    for split in ("train", "val"):
        rc = make_shards([str(data / f"{split}.csv"), "--root", str(data), "--out", str(shards), "--split", split,
                          "--short-side", "64", "--seed", "0"])  # fmt: skip
        if rc != 0:
            raise SystemExit(f"[demo] make_shards failed for {split} (exit {rc})")
    return shards


def last_retrieval(run_dir: Path) -> dict:
    """The run's last validation: retrieval metrics on the val split."""
    from claver_dist.train.metrics import read_metrics

    rows = [r for r in read_metrics(run_dir) if "val_t2v_r1" in r]
    if not rows:
        raise SystemExit(f"[demo] {run_dir} logged no validation")
    return rows[-1]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    t0 = time.time()
    build_data(args)
    t_data = time.time() - t0
    runs = {"kmt": train(args, "demo_pretrain_kmt", ["model.temporal=kmt"]),
            "mean": train(args, "demo_pretrain_mean", ["model.temporal=none"])}
    results = {k: last_retrieval(v) for k, v in runs.items()}
    wall = time.time() - t0
    n = int(results["kmt"]["val_num_samples"])
    print(f"\n[demo] retrieval on the val split ({n} clips, every caption unique), last validation")
    print("                                               text->video R@1  R@5   video->text R@1  R@5")
    for key, label in (("kmt", "CLAVER, Kronecker-mask temporal blocks (KMT)"), ("mean", "same model, mean of frames")):
        r = results[key]
        print(f"  {label:<45} {100 * r['val_t2v_r1']:6.2f}% {100 * r['val_t2v_r5']:6.2f}%   "
              f"{100 * r['val_v2t_r1']:6.2f}% {100 * r['val_v2t_r5']:6.2f}%   run: {runs[key]}")  # fmt: skip
    print(f"  chance R@1: {100 / n:.2f}%; order-blind: 12.50% (a caption's clip is 1 of the 8 of its colour); "
          f"data {t_data:.0f}s, total {wall:.0f}s")
    keep = ("step", "val_num_samples", "val_t2v_r1", "val_t2v_r5", "val_t2v_r10", "val_v2t_r1", "val_v2t_r5",
            "val_v2t_r10", "val_t2v_median_rank", "val_v2t_median_rank")
    (Path(args.runs) / "demo_pretrain_results.json").write_text(json.dumps(
        {"retrieval": {k: {m: r.get(m) for m in keep} for k, r in results.items()}, "wall_s": wall,
         "data_s": t_data}, indent=1))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
