"""Reading dataset annotations: label lists and the three input layouts make_shards accepts.

- list file (X-CLIP / mmaction): lines ``relative/path.ext label_id``, paths under ``root``;
- Kinetics CSV: header ``label,youtube_id,time_start,time_end,split``; the video is found
  as ``{youtube_id}_{start:06d}_{end:06d}.*`` under ``root``, ``root/{label}``,
  ``root/{split}`` or ``root/{split}/{label}``; rows are filtered by ``split``;
- a folder per class: ``ANNOTATIONS/{class name}/**/*.mp4`` (classes sorted by name
  unless a labels CSV maps them).

Labels are a CSV ``id,name`` (a header row is optional), ids 0..C-1.

Inputs that cannot be used before any decoding (missing file, unknown class) come back
as rejections with a reason, like the ones the shard builder finds while decoding.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

from claver_dist.data.shards import VIDEO_EXTS


@dataclass
class Input:
    path: Path  # absolute file
    rel: str  # as named by the annotation (stored as the sample's source)
    label: int


@dataclass
class Rejected:
    source: str
    reason: str


def normalise_name(name: str) -> str:
    return " ".join(name.strip().strip('"').replace("_", " ").lower().split())


def read_labels(path: str | Path) -> list[str]:
    """``id,name`` CSV -> names indexed by id; ids must be exactly 0..C-1."""
    rows = [r for r in csv.reader(Path(path).read_text().splitlines()) if r and any(c.strip() for c in r)]
    if rows and not rows[0][0].strip().lstrip("-").isdigit():
        rows = rows[1:]  # header
    names: dict[int, str] = {}
    for n, r in enumerate(rows, 1):
        if len(r) < 2:
            raise ValueError(f"{path}: row {n} {r!r} is not 'id,name'")
        i = int(r[0])
        if i in names:
            raise ValueError(f"{path}: id {i} appears twice")
        names[i] = ",".join(r[1:]).strip()
    if sorted(names) != list(range(len(names))):
        raise ValueError(f"{path}: ids must be 0..{len(names) - 1} without gaps")
    return [names[i] for i in range(len(names))]


def detect_format(annotations: str | Path) -> str:
    p = Path(annotations)
    if p.is_dir():
        return "tree"
    first = next((line for line in p.read_text().splitlines() if line.strip()), "")
    if first.replace(" ", "").lower().startswith("label,youtube_id"):
        return "kinetics"
    return "list"


def read_inputs(
    annotations: str | Path, root: str | Path | None, labels: list[str] | None, split: str
) -> tuple[list[Input], list[Rejected], list[str]]:
    """``(inputs, rejected, class names)`` for any supported layout."""
    fmt = detect_format(annotations)
    if fmt == "tree":
        return _read_tree(Path(annotations), labels)
    if labels is None:
        raise ValueError(f"{annotations}: a labels CSV (--labels) is needed for the {fmt} format")
    root = Path(root) if root else Path(annotations).parent
    if fmt == "kinetics":
        inputs, rejected = _read_kinetics(Path(annotations), root, labels, split)
    else:
        inputs, rejected = _read_list(Path(annotations), root, len(labels))
    return inputs, rejected, labels


def _read_list(path: Path, root: Path, num_classes: int) -> tuple[list[Input], list[Rejected]]:
    inputs, rejected = [], []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        parts = line.strip().rsplit(maxsplit=1)
        if len(parts) != 2 or not parts[1].lstrip("-").isdigit():
            raise ValueError(f"{path}:{n}: expected 'relative/path.ext label_id', got {line!r}")
        rel, label = parts[0], int(parts[1])
        if not 0 <= label < num_classes:
            rejected.append(Rejected(rel, f"label {label} not in labels (0..{num_classes - 1})"))
        elif not (root / rel).is_file():
            rejected.append(Rejected(rel, f"file not found under {root}"))
        else:
            inputs.append(Input(root / rel, rel, label))
    return inputs, rejected


def _read_kinetics(path: Path, root: Path, labels: list[str], split: str) -> tuple[list[Input], list[Rejected]]:
    ids = {normalise_name(n): i for i, n in enumerate(labels)}
    rows = list(csv.DictReader(path.read_text().splitlines()))
    splits = {r.get("split", "") for r in rows}
    if split in splits:
        rows = [r for r in rows if r.get("split", "") == split]
    elif len(splits) > 1:
        raise ValueError(f"{path}: no rows with split {split!r} (has {sorted(splits)})")
    inputs, rejected = [], []
    for r in rows:
        stem = f"{r['youtube_id']}_{int(float(r['time_start'])):06d}_{int(float(r['time_end'])):06d}"
        label = ids.get(normalise_name(r["label"]))
        if label is None:
            rejected.append(Rejected(stem, f"class {r['label']!r} not in labels"))
            continue
        found = None
        for folder in (root, root / r["label"], root / r.get("split", ""), root / r.get("split", "") / r["label"]):
            for ext in VIDEO_EXTS:
                if (folder / f"{stem}.{ext}").is_file():
                    found = folder / f"{stem}.{ext}"
                    break
            if found:
                break
        if found is None:
            rejected.append(Rejected(stem, f"file not found under {root}"))
        else:
            inputs.append(Input(found, str(found.relative_to(root)), label))
    return inputs, rejected


def _read_tree(path: Path, labels: list[str] | None) -> tuple[list[Input], list[Rejected], list[str]]:
    folders = sorted(d for d in path.iterdir() if d.is_dir() and not d.name.startswith("."))
    if labels is None:
        labels = [d.name.replace("_", " ") for d in folders]
    ids = {normalise_name(n): i for i, n in enumerate(labels)}
    inputs, rejected = [], []
    for d in folders:
        files = sorted(f for f in d.rglob("*") if f.is_file() and not f.name.startswith(".") and f.suffix[1:].lower() in VIDEO_EXTS)
        label = ids.get(normalise_name(d.name))
        for f in files:
            rel = str(f.relative_to(path))
            if label is None:
                rejected.append(Rejected(rel, f"class folder {d.name!r} not in labels"))
            else:
                inputs.append(Input(f, rel, label))
    return inputs, rejected, labels
