"""Evaluation protocols of the paper (claver-method.md §3): zero-shot class splits,
K-shot training lists, and summaries (mean and std over splits, as papers report).

    splits = class_splits(num_classes=220, size=160, num_splits=3, seed=0)  # Kinetics-600 new classes
    lines = few_shot_lines(annotation_lines, k=4, seed=0)                    # K videos per class
    picked = few_shot_indices([e.label for e in entries], k=4, seed=0)       # the same, over any items
"""

from __future__ import annotations

import math
from collections import defaultdict

import numpy as np


def class_splits(num_classes: int, size: int, num_splits: int = 3, seed: int = 0) -> list[list[int]]:
    """``num_splits`` seeded random subsets of ``size`` classes (sorted ids), reproducible by seed."""
    if not 0 < size <= num_classes:
        raise ValueError(f"split size {size} must be in 1..{num_classes}")
    rng = np.random.default_rng(seed)
    return [sorted(rng.choice(num_classes, size=size, replace=False).tolist()) for _ in range(num_splits)]


def parse_annotation_line(line: str, where: str = "") -> tuple[str, int]:
    """``relative/path.ext label_id`` (the X-CLIP/mmaction format)."""
    parts = line.strip().rsplit(None, 1)
    if len(parts) != 2 or not parts[1].lstrip("-").isdigit():
        raise ValueError(f"{where}: expected 'path label_id', got {line.strip()!r}")
    return parts[0], int(parts[1])


def few_shot_indices(labels: list[int], k: int, seed: int = 0) -> list[int]:
    """Indices of K items per class, drawn without replacement by ``seed`` (all of a class if it
    has fewer); classes in id order, each class's items in their input order."""
    by_class: dict[int, list[int]] = defaultdict(list)
    for i, label in enumerate(labels):
        by_class[label].append(i)
    rng = np.random.default_rng([seed, k])
    out = []
    for label in sorted(by_class):
        items = by_class[label]
        pick = rng.choice(len(items), size=min(k, len(items)), replace=False)
        out.extend(items[j] for j in sorted(pick))
    return out


def few_shot_lines(lines: list[str], k: int, seed: int = 0, source: str = "annotations") -> list[str]:
    """K lines per class of ``path label_id`` lines (``few_shot_indices``)."""
    kept = [(i, line.strip()) for i, line in enumerate(lines, 1) if line.strip()]
    labels = [parse_annotation_line(line, f"{source}:{i}")[1] for i, line in kept]
    return [kept[j][1] for j in few_shot_indices(labels, k, seed)]


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and (population) standard deviation, the paper's "mean +- std over splits"."""
    m = sum(values) / len(values)
    return m, math.sqrt(sum((v - m) ** 2 for v in values) / len(values))


def per_class_accuracy(predictions: list[tuple[str, int, list[float]]], num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """(per-class top-1 accuracy [C] (nan where a class has no sample), confusion matrix [C, C])."""
    conf = np.zeros((num_classes, num_classes), dtype=np.int64)
    for _, label, probs in predictions:
        conf[label, int(np.argmax(probs))] += 1
    totals = conf.sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        acc = np.where(totals > 0, np.diag(conf) / np.maximum(totals, 1), np.nan)
    return acc, conf
