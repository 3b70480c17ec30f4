"""Evaluation and prediction: reference scoring, 1 vs 2 processes, zero-shot, predict CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from claver_dist.config import load_config, save_config
from claver_dist.eval.evaluate import class_text_features, evaluate
from claver_dist.model import ModelConfig, build_model
from claver_dist.text.prompts import load_bank, save_bank
from conftest import build_motion_shards

REPO = Path(__file__).resolve().parent.parent


def test_multiview_scores_equal_reference(tmp_path):
    torch.manual_seed(0)
    model, _ = build_model(ModelConfig(clip_model="claver-debug", init_logit_scale=2.0), num_frames=2, image_size=64)
    model.eval()
    labels = tmp_path / "labels.csv"
    labels.write_text("id,name\n0,jumping\n1,running\n2,swimming\n")
    bank = load_bank(str(labels), None)  # 16 template variants per class
    text = class_text_features(model, bank, torch.device("cpu"))
    g = torch.Generator().manual_seed(1)
    batches = [{"video": torch.randn(3, 4, 2, 3, 64, 64, generator=g), "label": torch.tensor([0, 2, 1]),
                "valid": torch.tensor([True, True, True]), "key": ["a", "b", "c"]},
               {"video": torch.randn(3, 4, 2, 3, 64, 64, generator=g), "label": torch.tensor([1, 0, -1]),
                "valid": torch.tensor([True, True, False]), "key": ["d", "e", ""]}]
    result = evaluate(model, batches, text, torch.device("cpu"), keep_predictions=True, class_subsets=[[0, 2]])

    hits1 = n = 0
    sub_hits = sub_n = 0
    scale = model.logit_scale.exp().item()
    with torch.no_grad():
        for batch in batches:
            for i in range(3):
                if not batch["valid"][i]:
                    continue
                probs = torch.zeros(3)
                sub = torch.zeros(2)
                for v in range(4):
                    emb = model.encode_video(batch["video"][i, v][None])[0]
                    for a in range(bank.num_variants):
                        logits = scale * text[a] @ emb
                        probs += logits.softmax(0) / (4 * bank.num_variants)
                        sub += logits[[0, 2]].softmax(0) / (4 * bank.num_variants)
                label = int(batch["label"][i])
                hits1 += int(probs.argmax() == label)
                n += 1
                if label in (0, 2):
                    sub_hits += int([0, 2][int(sub.argmax())] == label)
                    sub_n += 1
    assert result["num_samples"] == n == 5
    assert result["top1"] == pytest.approx(hits1 / n)
    assert result["top5"] == 1.0  # 3 classes
    assert result["splits"][0]["num_samples"] == sub_n
    assert result["splits"][0]["top1"] == pytest.approx(sub_hits / sub_n)
    assert [p[0] for p in result["predictions"]] == ["a", "b", "c", "d", "e"]


@pytest.fixture(scope="module")
def odd_shards(tmp_path_factory) -> Path:
    """3 classes, 9 validation videos: not divisible by 2 processes or by batch 2."""
    return build_motion_shards(tmp_path_factory.mktemp("odd"), classes=[0, 2, 4], per_class=4, val_per_class=3)


def export_random(run_dir: Path, labels: Path, num_frames: int = 4) -> Path:
    """An export folder (what training writes at the end) with a random debug model."""
    from safetensors.torch import save_file

    cfg = load_config(REPO / "configs/debug.yaml", [f"text.labels={labels}", f"data.num_frames={num_frames}",
                                                    "model.init_logit_scale=2.0"])
    torch.manual_seed(0)
    model, _ = build_model(cfg.model, cfg.data.num_frames, cfg.data.image_size)
    out = run_dir / "export"
    out.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / "model.safetensors"))
    save_config(cfg, out / "config.yaml")
    save_config(cfg, run_dir / "config.yaml")
    return run_dir


def run_evaluate(nproc: int, args: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    if nproc == 1:
        cmd = [sys.executable, "tools/evaluate.py", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-port",
               str(__import__("claver_dist.distributed", fromlist=["free_port"]).free_port()), "tools/evaluate.py", *args]
    res = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return res


@pytest.mark.slow
def test_two_process_evaluation_equals_one(odd_shards, tmp_path):
    run = export_random(tmp_path / "run", odd_shards / "labels.csv")
    common = [str(REPO / "configs/debug.yaml"), "--checkpoint", str(run), "--views", "2x3",
              f"data.val_shards={odd_shards}", f"text.labels={odd_shards / 'labels.csv'}", "data.num_frames=4",
              "eval.batch_size=2", "data.num_workers=0"]
    run_evaluate(1, [*common, "--out", str(tmp_path / "one")], tmp_path)
    run_evaluate(2, [*common, "--out", str(tmp_path / "two")], tmp_path)
    one = json.loads((tmp_path / "one/results.json").read_text())["sets"][0]
    two = json.loads((tmp_path / "two/results.json").read_text())["sets"][0]
    assert one["num_samples"] == two["num_samples"] == 9
    assert two["top1"] == pytest.approx(one["top1"]) and two["top5"] == pytest.approx(one["top5"])
    per_class = (tmp_path / "two/per_class.csv").read_text().splitlines()
    assert per_class[0] == "id,name,samples,top1" and [r.split(",")[2] for r in per_class[1:]] == ["3", "3", "3"]
    assert (tmp_path / "two/per_class.png").stat().st_size > 1000
    assert sum(sum(int(v) for v in row.split(",")) for row in (tmp_path / "two/confusion.csv").read_text().splitlines()) == 9


@pytest.mark.slow
def test_zero_shot_other_label_set_and_bank(motion_shards, odd_shards, tmp_path):
    """Trained on motion_shards' labels; evaluated on odd_shards' (other names, own bank)."""
    run = export_random(tmp_path / "run", motion_shards / "labels.csv")
    names = [line.split(",", 1)[1] for line in (odd_shards / "labels.csv").read_text().splitlines()[1:]]
    bank = tmp_path / "zs_bank.json"
    save_bank(bank, names, [{"synonyms": [f"{n} happening.", f"the clip shows {n}."]} for n in names],
              {"authoring_method": "test fixture", "model": None})
    args = [str(REPO / "configs/debug.yaml"), "--checkpoint", str(run), "--views", "1x1", "--class-splits", "3",
            "--split-size", "2", "--split-seed", "5", f"data.val_shards={odd_shards}",
            f"text.labels={odd_shards / 'labels.csv'}", f"text.bank={bank}", "data.num_frames=4", "data.num_workers=0"]
    res = run_evaluate(1, [*args, "--out", str(tmp_path / "zs")], tmp_path)
    out = json.loads((tmp_path / "zs/results.json").read_text())
    assert out["bank"] == str(bank) and out["sets"][0]["num_samples"] == 9
    assert len(out["split_classes"]) == 3 and all(len(s) == 2 for s in out["split_classes"])
    assert [s["num_samples"] for s in out["sets"][0]["splits"]] == [6, 6, 6]  # 2 classes x 3 videos each
    assert "mean over class splits" in res.stdout
    again = run_evaluate(1, [*args, "--out", str(tmp_path / "zs2")], tmp_path)
    assert json.loads((tmp_path / "zs2/results.json").read_text())["split_classes"] == out["split_classes"]
    assert again.returncode == 0


@pytest.mark.slow
def test_predict_agrees_with_the_evaluation_pipeline(odd_shards, tmp_path):
    """predict.py (file -> decode -> views -> scores) gives the evaluation's class and
    probabilities for the same videos (bytes taken out of the shard), 2 clips x 3 crops."""
    import tarfile

    run = export_random(tmp_path / "run", odd_shards / "labels.csv")
    from claver_dist.data.loader import build_loader
    from claver_dist.eval.load import load_trained

    model, cfg = load_trained(run)
    cfg.data.val_shards, cfg.data.num_workers, cfg.data.batch_size = str(odd_shards), 0, 4
    bank = load_bank(str(odd_shards / "labels.csv"), None)
    loader = build_loader(cfg.data, "val", num_classes=bank.num_classes, views=(2, 3))
    expected = {key: probs for key, _, probs in evaluate(model, loader, class_text_features(model, bank, torch.device("cpu")),
                                                       torch.device("cpu"), keep_predictions=True)["predictions"]}
    files = []
    with tarfile.open(next(odd_shards.glob("val-*.tar"))) as tar:
        for m in tar.getmembers():
            if m.name.endswith(".mp4"):
                out = tmp_path / "videos" / m.name
                out.parent.mkdir(exist_ok=True)
                out.write_bytes(tar.extractfile(m).read())
                files.append(out)
    assert len(files) == 9
    res = subprocess.run([sys.executable, "tools/predict.py", *map(str, files), "--checkpoint", str(run),
                          "--top", "3", "--views", "2x3"], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    lines = res.stdout.strip().splitlines()
    for i, f in enumerate(files):
        block = lines[4 * i: 4 * i + 4]
        assert block[0] == str(f)
        probs = expected[f.name[: -len(".mp4")]]
        top = sorted(range(3), key=lambda c: -probs[c])
        for line, c in zip(block[1:], top):
            pct, name = line.strip().split("%", 1)
            assert name.strip() == bank.class_names[c]
            assert abs(float(pct) - 100 * probs[c]) < 0.02

    bad = tmp_path / "notes.mp4"
    bad.write_text("not a video")
    from tools.predict import main as predict

    assert predict([str(bad), str(tmp_path / "missing.mp4"), "--checkpoint", str(run)]) == 1
