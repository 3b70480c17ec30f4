"""Video-text pretraining end to end on CPU: captioned shards, 2 DeepSpeed ranks over gloo,
the global-negatives loss, retrieval validation, exact resume, and the export as a
classification run's starting point."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from claver_dist.train.metrics import read_metrics
from test_train import kill_tree, launch, losses  # noqa: F401  (the same launcher and readers)

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parent.parent

# each motion class told three ways: several captions per video, shared across its class
PHRASES = ["a shape {}", "something is {} across the frame", "the video shows an object {}"]


@pytest.fixture(scope="module")
def captioned(tmp_path_factory) -> Path:
    from claver_dist.data.synthetic import MOTION_CLASSES, MotionSpec, write_motion_dataset
    from tools.make_shards import main as make_shards

    root = tmp_path_factory.mktemp("captioned")
    paths = write_motion_dataset(root / "videos", num_classes=4, per_class=8, val_per_class=4,
                                 spec=MotionSpec(width=80, height=64, min_frames=16, max_frames=20), seed=0)
    for split in ("train", "val"):
        rows = [["path", "caption"]]
        for line in paths[split].read_text().splitlines():
            rel, label = line.rsplit(" ", 1)
            name = MOTION_CLASSES[int(label)][0]
            rows += [[rel, p.format(name)] for p in PHRASES]
        with open(root / f"{split}.csv", "w", newline="") as f:
            csv.writer(f).writerows(rows)
        assert make_shards([str(root / f"{split}.csv"), "--root", str(paths[split].parent), "--out",
                            str(root / "shards"), "--split", split, "--short-side", "64", "--workers", "1",
                            "--no-progress"]) == 0
    return root / "shards"


def pretrain(data: Path, run_dir: Path, *extra: str, nproc: int = 2, **kw):
    return launch(nproc, data, run_dir, *extra, config="configs/pretrain_debug.yaml", **kw)


def test_pretraining_trains_validates_resumes_and_exports(captioned, motion_shards, tmp_path):
    # zero-shot on a labelled split with its class prompts, beside retrieval
    common = ("train.max_steps=8", "checkpoint.every_steps=4", "train.val_every_epochs=1", "optim.warmup_epochs=0",
              "optim.lr=5e-4", "train.precision=fp32", f"data.zeroshot_shards={motion_shards}",
              f"text.labels={motion_shards / 'labels.csv'}")
    ref = tmp_path / "ref"
    pretrain(captioned, ref, *common)
    got = losses(ref)
    assert sorted(got) == list(range(1, 9)) and all(v == v for v in got.values())
    rows = read_metrics(ref)
    val = [r for r in rows if "val_t2v_r1" in r]
    assert val, rows[-3:]
    for r in val:
        assert r["val_num_samples"] == 16  # every val clip once, over 2 ranks
        assert 0 <= r["val_t2v_r1"] <= r["val_t2v_r5"] <= r["val_t2v_r10"] <= 1
        assert 1 <= r["val_t2v_median_rank"] <= 16 and 1 <= r["val_v2t_median_rank"] <= 16
        assert r["val_zeroshot_samples"] == 16 and 0 <= r["val_zeroshot_top1"] <= r["val_zeroshot_top5"] <= 1
    assert (ref / "best.txt").read_text().startswith("step ")
    assert (ref / "export/model.safetensors").is_file() and (ref / "finished").is_file()

    # resume from the step-4 checkpoint in a new folder: steps 5-8 repeat exactly
    resumed = tmp_path / "resumed"
    pretrain(captioned, resumed, *common, f"checkpoint.resume={ref / 'checkpoints/step_00000004'}")
    again = losses(resumed)
    assert sorted(again) == [5, 6, 7, 8]
    assert all(again[s] == got[s] for s in again), (again, got)

    # the export starts a classification run (labelled shards of the same kind of videos)
    fine = tmp_path / "classify"
    launch(1, motion_shards, fine, f"model.pretrained={ref / 'export/model.safetensors'}", "train.max_steps=2")
    log = (tmp_path / "classify.log").read_text()
    # every weight comes from the export: nothing is left freshly initialised
    assert f"loaded claver-debug ({ref / 'export/model.safetensors'}); freshly initialised: none" in log, log[-3000:]
    assert sorted(losses(fine)) == [1, 2]


def test_preflight_of_a_pretraining_run(captioned, tmp_path):
    """The preflight reads the captioned shards with the pretraining loader and counts the
    caption work per step (no prompt bank)."""
    import os
    import subprocess
    import sys

    run_dir = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("CLAVER_LAUNCH_ID", None)
    res = subprocess.run([sys.executable, str(REPO / "launch/local.py"), "--preflight", "--nproc", "1",
                          str(REPO / "configs/pretrain_debug.yaml"), f"data.train_shards={captioned}",
                          f"data.val_shards={captioned}", f"run_dir={run_dir}", "data.num_workers=0"],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, (res.stdout + res.stderr)[-4000:]
    report = json.loads((run_dir / "preflight.json").read_text())
    assert report["passed"] and report["ranks"][0]["clips_per_s"] > 0
    assert report["model"]["text_flops_per_step"] > 0 and report["model"]["vision_flops_per_clip"] > 0
