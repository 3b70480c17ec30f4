"""Derive labels/kinetics600_new.csv (the 220 Kinetics-600 classes absent from Kinetics-400)
and prompts/kinetics600.json (the Kinetics-600 prompt bank).

This is the class set of the zero-shot protocol (train on Kinetics-400, test on the
new Kinetics-600 classes, in three random 160-class splits; ER-ZSAR, Chen & Huang,
ICCV 2021, followed by X-CLIP and CLAVER).

By exact name, 232 Kinetics-600 classes are not in Kinetics-400 (368 names are
shared, 32 Kinetics-400 names are gone). 12 of the 232 are Kinetics-400 classes under
a new name (a spelling fix, a narrowed name, a rewording): their videos were in the
training set, so they are not new. ``K400_TO_K600_RENAMES`` lists them; the other 20
vanished Kinetics-400 names were dropped or merged, not renamed. The result is the
ER-ZSAR list of 220 classes, kept in Kinetics-600 id order and renumbered 0..219.

The Kinetics-600 bank takes every class's texts from the Kinetics-400 bank where the class
is a Kinetics-400 class (by name or through the rename table) and from the bank of the new
classes (prompts/kinetics600_new.json) otherwise, so the texts of a class are the same in
every bank that has it.

    python -m tools.derive_k600_new              # rewrite labels/kinetics600_new.csv and prompts/kinetics600.json
    python -m tools.derive_k600_new --check      # exit 1 if either file is out of date
"""

from __future__ import annotations

import argparse
import csv
import io
import sys
from pathlib import Path

from claver_dist.text.prompts import BankError, LabelsError, load_labels, read_bank_file, save_bank

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


def derive_k600_bank(k400_bank: dict, new_bank: dict, k600: list[str],
                     renames: dict[str, str] = K400_TO_K600_RENAMES) -> tuple[list[dict], dict]:
    """Per-class prompts of every Kinetics-600 class (in ``k600`` order) and the provenance,
    from the Kinetics-400 bank and the bank of the new classes (both as read_bank_file gives)."""
    old_name = {new: old for old, new in renames.items()}
    k400 = {c["name"]: c["prompts"] for c in k400_bank["classes"]}
    new = {c["name"]: c["prompts"] for c in new_bank["classes"]}
    prompts = []
    for name in k600:
        source = k400.get(old_name.get(name, name)) or new.get(name)
        if source is None:
            raise BankError(f"Kinetics-600 class {name!r} is in neither the Kinetics-400 bank nor the new-class bank")
        prompts.append(source)
    p400, pnew = k400_bank["provenance"], new_bank["provenance"]
    provenance = {
        "method": f"derived by tools/derive_k600_new.py: the {len(k600) - len(new)} classes shared with "
                  f"Kinetics-400 take the texts of {p400.get('labels', 'kinetics400')}'s bank, the "
                  f"{len(new)} new classes those of {pnew.get('labels', 'kinetics600_new')}'s bank. Both: "
                  f"{p400['method']}",
        "model": p400["model"],
        "endpoint": p400.get("endpoint"),
        "parameters": {**p400["parameters"],
                       "kinds": sorted({k for p in prompts for k in p}, key=list(p400["parameters"]["kinds"]).index)},
        "prompt_sha256": p400["prompt_sha256"],
        "labels": "kinetics600.csv",
        "date": max(p400["date"], pnew["date"]),
        "tool": "tools/derive_k600_new.py",
        "sources": ["kinetics400.json", "kinetics600_new.json"],
    }
    return prompts, provenance


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
    ap.add_argument("--k400-bank", default=str(ROOT / "prompts/kinetics400.json"))
    ap.add_argument("--new-bank", default=str(ROOT / "prompts/kinetics600_new.json"))
    ap.add_argument("--bank-out", default=str(ROOT / "prompts/kinetics600.json"))
    ap.add_argument("--check", action="store_true", help="compare with --out and --bank-out instead of writing them")
    args = ap.parse_args(argv)
    try:
        k600 = load_labels(args.k600)
        new = derive_new_classes(load_labels(args.k400), k600)
        prompts, provenance = derive_k600_bank(read_bank_file(args.k400_bank), read_bank_file(args.new_bank), k600)
    except (LabelsError, BankError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    text = to_csv(new)
    out, bank_out = Path(args.out), Path(args.bank_out)
    if args.check:
        stale = [] if out.exists() and out.read_text(encoding="utf-8") == text else [out]
        if not bank_out.exists() or read_bank_file(bank_out) != {
                "provenance": provenance, "classes": [{"id": i, "name": n, "prompts": p}
                                                      for i, (n, p) in enumerate(zip(k600, prompts))]}:
            stale.append(bank_out)
        if stale:
            print(f"{', '.join(map(str, stale))} out of date: run python -m tools.derive_k600_new", file=sys.stderr)
            return 1
        print(f"{out}: up to date ({len(new)} classes); {bank_out}: up to date ({len(k600)} classes)")
        return 0
    out.write_text(text, encoding="utf-8")
    save_bank(bank_out, k600, prompts, provenance)
    print(f"wrote {out}: {len(new)} classes; {bank_out}: {len(k600)} classes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
