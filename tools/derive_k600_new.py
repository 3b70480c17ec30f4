"""Derive labels/kinetics600_new.csv: the 220 Kinetics-600 classes absent from Kinetics-400.

This is the class set of the zero-shot protocol (train on Kinetics-400, test on the
new Kinetics-600 classes, in three random 160-class splits; ER-ZSAR, Chen & Huang,
ICCV 2021, followed by X-CLIP and CLAVER).

By exact name, 232 Kinetics-600 classes are not in Kinetics-400 (368 names are
shared, 32 Kinetics-400 names are gone). 12 of the 232 are Kinetics-400 classes under
a new name (a spelling fix, a narrowed name, a rewording): their videos were in the
training set, so they are not new. ``K400_TO_K600_RENAMES`` lists them; the other 20
vanished Kinetics-400 names were dropped or merged, not renamed. The result is the
ER-ZSAR list of 220 classes, kept in Kinetics-600 id order and renumbered 0..219.

    python -m tools.derive_k600_new              # rewrite labels/kinetics600_new.csv
    python -m tools.derive_k600_new --check      # exit 1 if the file is out of date
"""

from __future__ import annotations

import argparse
import csv
import io
import sys
from pathlib import Path

from claver_dist.text.prompts import LabelsError, load_labels

# Kinetics-400 name -> its Kinetics-600 name (same action, renamed).
K400_TO_K600_RENAMES: dict[str, str] = {
    "baby waking up": "waking up",
    "balloon blowing": "inflating balloons",
    "changing wheel": "changing wheel (not on bike)",
    "cooking sausages": "cooking sausages (not on barbeque)",
    "dying hair": "dyeing hair",
    "garbage collecting": "person collecting garbage",
    "hugging": "hugging (not baby)",
    "making bed": "making the bed",
    "opening bottle": "opening bottle (not wine)",
    "passing American football (not in game)": "passing american football (not in game)",
    "throwing ball": "throwing ball (not baseball or American football)",
    "tying tie": "tying necktie",
}

ROOT = Path(__file__).resolve().parent.parent


def derive_new_classes(k400: list[str], k600: list[str],
                       renames: dict[str, str] = K400_TO_K600_RENAMES) -> list[str]:
    """Kinetics-600 names that are neither a Kinetics-400 name nor a renamed one,
    in Kinetics-600 order. Every rename must map a real K400 name to a real K600 name
    (a stale table would silently let a renamed class count as new)."""
    k400_set, k600_set = set(k400), set(k600)
    for old, new in renames.items():
        if old not in k400_set:
            raise ValueError(f"rename table: {old!r} is not a Kinetics-400 class")
        if new not in k600_set:
            raise ValueError(f"rename table: {new!r} is not a Kinetics-600 class")
        if old in k600_set:
            raise ValueError(f"rename table: {old!r} still exists in Kinetics-600, so it was not renamed")
    known = k400_set | set(renames.values())
    return [name for name in k600 if name not in known]


def to_csv(names: list[str]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["id", "name"])
    for i, name in enumerate(names):
        writer.writerow([i, name])
    return buf.getvalue()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--k400", default=str(ROOT / "labels/kinetics400.csv"))
    ap.add_argument("--k600", default=str(ROOT / "labels/kinetics600.csv"))
    ap.add_argument("--out", default=str(ROOT / "labels/kinetics600_new.csv"))
    ap.add_argument("--check", action="store_true", help="compare with --out instead of writing it")
    args = ap.parse_args(argv)
    try:
        new = derive_new_classes(load_labels(args.k400), load_labels(args.k600))
    except (LabelsError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    text = to_csv(new)
    out = Path(args.out)
    if args.check:
        if not out.exists() or out.read_text(encoding="utf-8") != text:
            print(f"{out} is out of date: run python -m tools.derive_k600_new", file=sys.stderr)
            return 1
        print(f"{out}: up to date ({len(new)} classes)")
        return 0
    out.write_text(text, encoding="utf-8")
    print(f"wrote {out}: {len(new)} classes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
