"""Draw K-shot training lists from a split's annotation file (few-shot protocol, §3).

    python tools/make_fewshot.py data/ucf101/trainlist01.txt --k 2 4 8 16 --seed 0 --out lists/ucf101_split1

writes ``OUT/train_k{K}.txt`` for every K: K lines per class (``path label_id``),
drawn without replacement by the seed, so every run of a paper table trains on the same
videos. Shard them with tools/make_shards.py and fine-tune with configs/fewshot_*.yaml.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="claver-make-fewshot", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("annotations", help="annotation file: 'relative/path.ext label_id' per line")
    p.add_argument("--k", type=int, nargs="+", default=[2, 4, 8, 16])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    from claver_dist.eval.protocols import few_shot_lines

    src = Path(args.annotations)
    if not src.is_file():
        print(f"make_fewshot: no such annotation file {src}", file=sys.stderr)
        return 2
    lines = src.read_text().splitlines()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for k in args.k:
        try:
            picked = few_shot_lines(lines, k, args.seed, source=str(src))
        except ValueError as e:
            print(f"make_fewshot: {e}", file=sys.stderr)
            return 2
        (out / f"train_k{k}.txt").write_text("\n".join(picked) + "\n")
        print(f"{out / f'train_k{k}.txt'}: {len(picked)} videos")
    return 0


if __name__ == "__main__":
    sys.exit(main())
