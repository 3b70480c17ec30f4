"""Draw K-shot training lists from a split's annotation file (few-shot protocol, §3).

    python tools/make_fewshot.py ucf101/ucfTrainTestlist/trainlist01.txt --labels labels/ucf101.csv \\
        --k 2 4 8 16 --seed 0 --out lists/ucf101_s1
    python tools/make_fewshot.py hmdb51/testTrainMulti_7030_splits --split-id 1 --subset train \\
        --labels labels/hmdb51.csv --k 2 4 8 16 --seed 0 --out lists/hmdb51_s1

The annotation file is read by the same code as tools/make_shards.py, in any of its
formats (docs/data.md): UCF-101 split lists with their 1-based ``classInd.txt`` ids, HMDB-51
split folders, Something-Something v2 JSON, list files, Kinetics CSVs (those need
``--root`` to find the files). Writes ``OUT/train_k{K}.txt`` for every K: K lines per class
(``path label_id``, ids 0-based in ``--labels``), drawn without replacement by the seed, so
every run of a paper table trains on the same videos. With ``--root``, only videos present
there are drawn. Shard them with tools/make_shards.py (same ``--labels``) and fine-tune with
configs/fewshot_*.yaml.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    from tools.make_shards import add_annotation_args, annotation_options

    p = argparse.ArgumentParser(prog="claver-make-fewshot", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("annotations", help="annotation file or folder, in any format of tools/make_shards.py")
    p.add_argument("--labels", default=None, help="id,name CSV the classes are mapped onto (optional for a list file)")
    p.add_argument("--root", default=None, help="video folder: draw only videos present there (needed for Kinetics CSVs)")
    add_annotation_args(p)
    p.add_argument("--k", type=int, nargs="+", default=[2, 4, 8, 16])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    from claver_dist.data.annotations import read_entries, read_labels, resolve
    from claver_dist.eval.protocols import few_shot_indices

    try:
        labels = read_labels(args.labels) if args.labels else None
        entries, rejected, _, fmt = read_entries(args.annotations, labels, annotation_options(args))
        if args.root:
            inputs, missing = resolve(entries, Path(args.root))
            rejected += missing
            items = [(i.rel, i.label) for i in inputs]
        elif fmt == "kinetics":
            raise ValueError(f"{args.annotations}: Kinetics rows name no file; pass --root to find the videos")
        else:
            items = [(e.rel, e.label) for e in entries]
    except (ValueError, OSError) as e:
        print(f"make_fewshot: {e}", file=sys.stderr)
        return 2
    print(f"{args.annotations} ({fmt}): {len(items)} videos, {len(rejected)} left out", file=sys.stderr)
    for r in rejected[:10]:
        print(f"  left out {r.source}: {r.reason}", file=sys.stderr)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for k in args.k:
        picked = [items[i] for i in few_shot_indices([label for _, label in items], k, args.seed)]
        (out / f"train_k{k}.txt").write_text("".join(f"{rel} {label}\n" for rel, label in picked))
        print(f"{out / f'train_k{k}.txt'}: {len(picked)} videos")
    return 0


if __name__ == "__main__":
    sys.exit(main())
