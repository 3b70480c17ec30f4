"""The shard builder (tools/make_shards.py) and the shard format, on tiny generated inputs."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from claver_dist.data.shards import ShardSet, read_index, resolve_shards, sample_key
from claver_dist.data.synthetic import frame_number_frames, motion_frames, MotionSpec, write_video
from tools.make_shards import main as make_shards
from tools.make_synthetic import main as make_synthetic

LABELS = "id,name\n0,zero\n1,one\n2,two\n"


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict:
    """6 good videos over 3 classes, plus a truncated mp4, a text file and an empty file named .mp4."""
    root = tmp_path_factory.mktemp("raw")
    lines, good = [], []
    for i in range(6):
        rel = f"class{i % 3}/clip.{i}.mp4"  # a dot in the stem: keys must not keep it
        frames = frame_number_frames(10 + 3 * i, 64, 48)
        write_video(root / rel, frames, fps=25 if i % 2 else 30)
        lines.append(f"{rel} {i % 3}")
        good.append(rel)
    data = (root / good[0]).read_bytes()
    (root / "bad").mkdir()
    (root / "bad/truncated.mp4").write_bytes(data[: len(data) // 2])  # PyAV writes moov last: header lost
    (root / "bad/text.mp4").write_text("this is not a video\n" * 20)
    (root / "bad/empty.mp4").write_bytes(b"")
    lines += ["bad/truncated.mp4 0", "bad/text.mp4 1", "bad/empty.mp4 2"]
    (root / "list.txt").write_text("\n".join(lines) + "\n")
    (root / "labels.csv").write_text(LABELS)
    return {"root": root, "good": good}


@pytest.fixture(scope="module")
def built(inputs, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shards")
    argv = [str(inputs["root"] / "list.txt"), "--labels", str(inputs["root"] / "labels.csv"), "--out", str(out),
            "--split", "train", "--short-side", "32", "--shard-samples", "2", "--workers", "2", "--no-progress"]  # fmt: skip
    assert make_shards(argv) == 0
    return out


def test_rejects_exactly_the_bad_inputs_with_reasons(built, inputs):
    m = json.loads((built / "manifest.json").read_text())
    rejected = {r["source"]: r["reason"] for r in m["rejected"]}
    assert set(rejected) == {"bad/truncated.mp4", "bad/text.mp4", "bad/empty.mp4"}
    assert "moov atom not found" in rejected["bad/truncated.mp4"]
    assert "Invalid data" in rejected["bad/text.mp4"]
    assert rejected["bad/empty.mp4"] == "empty file"
    sp = m["splits"]["train"]
    assert sp["num_samples"] == 6 and sp["num_shards"] == 3
    assert sp["per_class"] == {"zero": 2, "one": 2, "two": 2}
    assert m["classes"] == ["zero", "one", "two"] and m["num_classes"] == 3 and m["seed"] == 0
    assert m["encode"]["codec"] == "h264" and m["encode"]["short_side"] == 32 and m["encode"]["keyint"] == 12


def test_metadata_and_reencode_settings(built, inputs):
    shards = ShardSet(*resolve_shards(str(built), "train"))
    metas = {}
    for i in range(len(shards)):
        data, meta = shards.load(i)
        metas[meta["source"]] = meta
        assert data[4:8] == b"ftyp"  # mp4
    assert set(metas) == set(inputs["good"])
    for i, rel in enumerate(inputs["good"]):
        meta = metas[rel]
        # 64x48 -> short side 32 (even width), every frame kept, frame rate constant
        assert (meta["width"], meta["height"]) == (42, 32)
        assert meta["frames"] == 10 + 3 * i and meta["codec"] == "h264" and meta["cfr"] is True
        assert meta["fps"] == (25 if i % 2 else 30) and meta["label"] == i % 3
        assert meta["key"] == sample_key(rel) and "." not in meta["key"]


def test_keyframes_every_keyint_frames(built):
    import av

    shards = ShardSet(*resolve_shards(str(built), "train"))
    longest = max(range(len(shards)), key=lambda i: shards.load(i)[1]["frames"])
    data, meta = shards.load(longest)
    with av.open(__import__("io").BytesIO(data)) as c:
        keys = [i for i, pkt in enumerate(p for p in c.demux(video=0) if p.size) if pkt.is_keyframe]
    assert keys == list(range(0, meta["frames"], 12))


def test_shards_read_by_webdataset_and_tar(built):
    import webdataset as wds

    tars = sorted(str(p) for p in built.glob("train-*.tar"))
    samples = list(wds.WebDataset(tars, shardshuffle=False))
    assert len(samples) == 6
    for s in samples:
        assert {"mp4", "cls", "json"} <= set(s)
        assert int(s["cls"]) == json.loads(s["json"])["label"]
    listing = subprocess.run(["tar", "-tf", tars[0]], capture_output=True, text=True, check=True).stdout.split()
    assert len(listing) == 6 and sorted({n.rsplit(".", 1)[1] for n in listing}) == ["cls", "json", "mp4"]


def test_index_files_accepted_by_dali(built):
    from nvidia.dali import fn, pipeline_def

    tars = sorted(str(p) for p in built.glob("train-*.tar"))
    idx = [t[:-4] + ".idx" for t in tars]

    @pipeline_def(batch_size=6, num_threads=1, device_id=None)
    def pipe():
        video, cls = fn.readers.webdataset(paths=tars, index_paths=idx, ext=["mp4", "cls"],
                                           missing_component_behavior="error", name="reader")  # fmt: skip
        return video, cls

    p = pipe()
    p.build()
    assert p.reader_meta("reader")["epoch_size"] == 6
    video, cls = p.run()
    shards = ShardSet([Path(t) for t in tars])
    expected = sorted(shards.load(i)[0] for i in range(6))
    assert sorted(bytes(np.array(video[i])) for i in range(6)) == expected
    # our index matches what DALI's own wds2idx writes
    subprocess.run([sys.executable, "-m", "wds2idx", tars[0], str(built / "check.idx")], capture_output=True, check=True)
    assert read_index(built / "check.idx") == read_index(Path(idx[0]))


def test_rerun_skips_finished_shards_and_resumes(built, inputs, tmp_path):
    argv = [str(inputs["root"] / "list.txt"), "--labels", str(inputs["root"] / "labels.csv"), "--out", str(built),
            "--short-side", "32", "--shard-samples", "2", "--workers", "1", "--no-progress"]  # fmt: skip
    before = {p.name: (p.stat().st_mtime_ns, _sha(p)) for p in built.glob("train-*.tar")}
    assert make_shards(argv) == 0
    assert {p.name: (p.stat().st_mtime_ns, _sha(p)) for p in built.glob("train-*.tar")} == before
    # an interrupted build: the last shard and its record are gone -> only that one is redone
    (built / "train-000002.tar").unlink()
    (built / ".build/train-000002.json").unlink()
    (built / "train-000003.tar.tmp").write_bytes(b"partial")
    assert make_shards(argv) == 0
    after = {p.name: (p.stat().st_mtime_ns, _sha(p)) for p in built.glob("train-*.tar")}
    assert after["train-000000.tar"] == before["train-000000.tar"]
    assert after["train-000002.tar"][1] == before["train-000002.tar"][1]  # same content, rewritten
    assert not (built / "train-000003.tar.tmp").exists()


def test_changed_settings_refuse_to_mix_without_overwrite(built, inputs):
    argv = [str(inputs["root"] / "list.txt"), "--labels", str(inputs["root"] / "labels.csv"), "--out", str(built),
            "--short-side", "32", "--shard-samples", "2", "--workers", "1", "--no-progress", "--seed", "7"]  # fmt: skip
    with pytest.raises(SystemExit, match="--overwrite"):
        make_shards(argv)


def test_seed_shuffles_samples_across_shards(inputs, tmp_path):
    def order(seed: int, out: Path) -> list[str]:
        argv = [str(inputs["root"] / "list.txt"), "--labels", str(inputs["root"] / "labels.csv"), "--out", str(out),
                "--copy", "--shard-samples", "2", "--workers", "1", "--seed", str(seed), "--no-progress"]  # fmt: skip
        assert make_shards(argv) == 0
        return ShardSet(*resolve_shards(str(out), "train")).keys

    a, b, c = order(0, tmp_path / "a"), order(0, tmp_path / "b"), order(1, tmp_path / "c")
    assert a == b and sorted(a) == sorted(c) and a != c
    # --copy stores the original bytes
    shards = ShardSet(*resolve_shards(str(tmp_path / "a"), "train"))
    data, meta = shards.load(0)
    assert data == (inputs["root"] / meta["source"]).read_bytes() and meta["cfr"] is False


def test_kinetics_csv_and_class_folders(tmp_path):
    rng = np.random.default_rng(0)
    spec = MotionSpec(width=32, height=32, min_frames=6, max_frames=8)
    for label, cls in enumerate(["abseiling", "air drumming"]):
        for j in range(2):
            write_video(tmp_path / "k400/train" / cls / f"yt{label}{j}_000010_000020.mp4", motion_frames(label, rng, spec))
    (tmp_path / "k400/labels.csv").write_text("id,name\n0,abseiling\n1,air drumming\n")
    (tmp_path / "k400/train.csv").write_text(
        "label,youtube_id,time_start,time_end,split\n"
        + "".join(f"{c},yt{i}{j},10,20,train\n" for i, c in enumerate(["abseiling", "air drumming"]) for j in range(2))
        + "abseiling,missing,0,10,train\nabseiling,otherSplit,0,10,val\n"
    )
    out = tmp_path / "out"
    assert make_shards([str(tmp_path / "k400/train.csv"), "--root", str(tmp_path / "k400"), "--labels",
                        str(tmp_path / "k400/labels.csv"), "--out", str(out), "--copy", "--no-progress"]) == 0  # fmt: skip
    m = json.loads((out / "manifest.json").read_text())
    assert m["splits"]["train"]["per_class"] == {"abseiling": 2, "air drumming": 2}
    assert [r["source"] for r in m["rejected"]] == ["missing_000000_000010"]
    # the same videos as a folder-per-class tree, labels from folder names, second split in the same manifest
    assert make_shards([str(tmp_path / "k400/train"), "--out", str(out), "--split", "val", "--copy", "--no-progress"]) == 0
    m = json.loads((out / "manifest.json").read_text())
    assert m["splits"]["val"]["per_class"] == {"abseiling": 2, "air drumming": 2}
    assert set(m["splits"]) == {"train", "val"}


def test_synthetic_demo_path_through_make_shards(tmp_path):
    """make_synthetic -> make_shards (VP9, small short side), as the demo runs it."""
    src = tmp_path / "syn"
    assert make_synthetic([str(src), "--classes", "4", "--per-class", "2", "--val-per-class", "1",
                           "--size", "48x32", "--frames", "8-10", "--workers", "1", "--no-progress"]) == 0  # fmt: skip
    for split in ("train", "val"):
        assert make_shards([str(src / f"{split}.txt"), "--labels", str(src / "labels.csv"), "--out", str(tmp_path / "sh"),
                            "--split", split, "--codec", "vp9", "--short-side", "24", "--no-progress"]) == 0  # fmt: skip
    m = json.loads((tmp_path / "sh/manifest.json").read_text())
    assert m["splits"]["train"]["num_samples"] == 8 and m["splits"]["val"]["num_samples"] == 4
    assert m["classes"] == ["moving down", "moving up", "growing", "shrinking"] and not m["rejected"]
    _, meta = ShardSet(*resolve_shards(str(tmp_path / "sh"), "val")).load(0)
    assert meta["codec"] == "vp9" and meta["height"] == 24


def test_bad_labels_csv_is_a_clear_error(inputs, tmp_path, capsys):
    (tmp_path / "labels.csv").write_text("id,name\n0,a\n2,c\n")
    rc = make_shards([str(inputs["root"] / "list.txt"), "--root", str(inputs["root"]), "--labels",
                      str(tmp_path / "labels.csv"), "--out", str(tmp_path / "o"), "--no-progress"])  # fmt: skip
    assert rc == 2 and "ids must be 0..1" in capsys.readouterr().err


def test_rotated_phone_clip_is_stored_upright(tmp_path):
    """A 320x180 coded clip with a -90 degree display matrix (portrait shown, landscape coded,
    as phones write it): re-encoded it is stored upright at 180x320 scaled, not squashed;
    with --copy the bytes keep the matrix and the CPU decoder applies it."""
    from claver_dist.data.video import decode_frames

    coded = np.zeros((12, 180, 320, 3), np.uint8)
    coded[:, :90, :160] = 255  # bright top-left quadrant of the coded picture
    raw = tmp_path / "raw"
    write_video(raw / "flat.mp4", coded, fps=25)
    (raw / "class0").mkdir()
    subprocess.run(["ffmpeg", "-v", "error", "-y", "-i", str(raw / "flat.mp4"), "-c", "copy",
                    "-metadata:s:v:0", "rotate=270", str(raw / "class0/phone.mp4")], check=True)  # a -90 matrix
    (raw / "list.txt").write_text("class0/phone.mp4 0\n")
    (raw / "labels.csv").write_text("id,name\n0,zero\n1,one\n")
    upright = np.rot90(coded[0], -1)  # what FFmpeg shows: 320 high, 180 wide, the bright quadrant top right
    assert upright.shape == (320, 180, 3) and upright[:160, 90:].mean() > 250 and upright[:160, :90].mean() < 5
    for mode, extra in (("encoded", ["--short-side", "90"]), ("copy", ["--copy"])):
        out = tmp_path / mode
        assert make_shards([str(raw / "list.txt"), "--labels", str(raw / "labels.csv"), "--out", str(out),
                            "--no-progress", *extra]) == 0
        data, meta = ShardSet(*resolve_shards(str(out), "train")).load(0)
        want = (320, 180) if mode == "copy" else (160, 90)
        assert (meta["height"], meta["width"]) == want and meta["rotation"] == (270 if mode == "copy" else 0)
        frame = decode_frames(data, [0])[0]
        assert frame.shape[:2] == want  # upright: no squashing, no sideways frames
        h, w = want
        assert frame[: h // 2 - 4, w // 2 + 4 :].mean() > 200 and frame[: h // 2 - 4, : w // 2 - 4].mean() < 50
