"""Evaluation protocols: class splits, K-shot lists, per-class reports."""

import numpy as np
import pytest

from claver_dist.eval.protocols import class_splits, few_shot_lines, mean_std, per_class_accuracy
from tools.make_fewshot import main as make_fewshot


def test_class_splits_deterministic_and_sized():
    a = class_splits(220, 160, 3, seed=0)
    assert a == class_splits(220, 160, 3, seed=0)
    assert a != class_splits(220, 160, 3, seed=1)
    assert [len(s) for s in a] == [160] * 3 and all(len(set(s)) == 160 for s in a)
    assert len({tuple(s) for s in a}) == 3 and all(0 <= c < 220 for s in a for c in s)
    with pytest.raises(ValueError):
        class_splits(10, 11)


def test_few_shot_lines_k_per_class(tmp_path):
    lines = [f"c{c}/v{i}.mp4 {c}" for c in range(5) for i in range(10)] + ["c9/only.mp4 9"]
    for k in (2, 4):
        picked = few_shot_lines(lines, k, seed=3)
        labels = [int(line.split()[1]) for line in picked]
        assert {c: labels.count(c) for c in set(labels)} == {0: k, 1: k, 2: k, 3: k, 4: k, 9: 1}
        assert picked == few_shot_lines(lines, k, seed=3)
    assert few_shot_lines(lines, 4, seed=3) != few_shot_lines(lines, 4, seed=4)
    with pytest.raises(ValueError, match="ann:2"):
        few_shot_lines(["a.mp4 1", "broken"], 1, source="ann")
    src = tmp_path / "train.txt"
    src.write_text("\n".join(lines))
    assert make_fewshot([str(src), "--k", "2", "8", "--out", str(tmp_path / "fs")]) == 0
    assert len((tmp_path / "fs/train_k8.txt").read_text().split("\n")) - 1 == 5 * 8 + 1


def test_per_class_accuracy_and_mean_std():
    preds = [("a", 0, [0.9, 0.1, 0.0]), ("b", 0, [0.2, 0.8, 0.0]), ("c", 1, [0.1, 0.9, 0.0])]
    acc, conf = per_class_accuracy(preds, 3)
    assert acc[0] == 0.5 and acc[1] == 1.0 and np.isnan(acc[2])
    assert conf.tolist() == [[1, 1, 0], [0, 1, 0], [0, 0, 0]]
    assert mean_std([0.5, 0.7]) == pytest.approx((0.6, 0.1))
