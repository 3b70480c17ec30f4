"""Captioned videos (video-text pairs, no classes): the annotation readers and make_shards.

The inputs are the three caption layouts the shard builder accepts: a CSV of ``path,caption``
rows (several rows per video, captions with commas and quotes), JSON lines with one caption
or a list, and WebVid's CSV (``videoid``, ``name``, ``page_dir``). The videos are small ones
written by the test; the real tools/make_shards.py packs them.
"""

from __future__ import annotations

import csv
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest

from claver_dist.data.annotations import Options, detect_format, read_entries
from claver_dist.data.shards import ShardError, ShardSet, resolve_shards
from claver_dist.data.synthetic import write_video
from tools.make_shards import main as make_shards


def _csv(rows: list[list[str]]) -> str:
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\r\n").writerows(rows)
    return buf.getvalue()


@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("captioned")
    rng = np.random.default_rng(0)
    for rel in ("a/one.mp4", "a/two.mp4", "b/three.mp4", "silent.mp4", "1066/31415.mp4", "27182.mp4"):
        write_video(root / rel, rng.integers(0, 255, (6, 32, 48, 3), dtype=np.uint8))
    return root


CSV_ROWS = [
    ["path", "caption"],
    ["a/one.mp4", "a dog runs, then stops"],
    ["a/two.mp4", 'a sign that reads "stop"'],
    ["a/one.mp4", "the dog stops running"],  # a second caption for one video, rows apart
    ["b/three.mp4", "  waves  "],
    ["silent.mp4", "   "],  # nothing but spaces: no caption
]


def test_caption_layouts_are_detected_and_every_caption_kept(videos):
    (videos / "caps.csv").write_text(_csv(CSV_ROWS))
    entries, rejected, classes, fmt = read_entries(videos / "caps.csv", None)
    assert fmt == "captions" and classes == []
    got = {e.rel: e.captions for e in entries}
    assert got == {"a/one.mp4": ("a dog runs, then stops", "the dog stops running"),
                   "a/two.mp4": ('a sign that reads "stop"',), "b/three.mp4": ("waves",)}
    assert all(e.label == -1 for e in entries)
    assert [(r.source, r.reason.split(" (")[0]) for r in rejected] == [("silent.mp4", "no caption")]
    assert f"{videos / 'caps.csv'}:6" in rejected[0].reason  # the row that named it

    lines = [{"path": "a/one.mp4", "captions": ["first", "second"]}, {"video": "a/two.mp4", "caption": "only"},
             {"path": "silent.mp4", "captions": []}]
    (videos / "caps.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    assert detect_format(videos / "caps.jsonl") == "captions"
    entries, rejected, _, _ = read_entries(videos / "caps.jsonl", None)
    assert {e.rel: e.captions for e in entries} == {"a/one.mp4": ("first", "second"), "a/two.mp4": ("only",)}
    assert [r.source for r in rejected] == ["silent.mp4"]

    (videos / "results_2M_val.csv").write_text(_csv([
        ["videoid", "contentUrl", "duration", "page_dir", "name"],
        ["31415", "https://example.invalid/31415.mp4", "PT00H00M12S", "1066", "Aerial view, city at night"],
        ["27182", "https://example.invalid/27182.mp4", "PT00H00M08S", "2001", "Slow motion of rain"],
    ]))
    assert detect_format(videos / "results_2M_val.csv") == "webvid"
    entries, rejected, _, _ = read_entries(videos / "results_2M_val.csv", None)
    assert [(e.rel, e.captions) for e in entries] == [("1066/31415", ("Aerial view, city at night",)),
                                                      ("2001/27182", ("Slow motion of rain",))]
    # the video is looked for in its page_dir first, then at the root (flat downloads)
    assert entries[1].candidates[0] == "2001/27182.mp4" and "27182.mp4" in entries[1].candidates


def test_captions_refuse_labels_and_malformed_rows(videos, tmp_path):
    (tmp_path / "caps.csv").write_text(_csv(CSV_ROWS))
    with pytest.raises(ValueError, match="no classes; drop --labels"):
        read_entries(tmp_path / "caps.csv", ["a", "b"])
    (tmp_path / "bad.csv").write_text("video,text\nx.mp4,hello\n")
    with pytest.raises(ValueError, match=r"bad.csv:1: .*'caption'"):
        read_entries(tmp_path / "bad.csv", None, Options(fmt="captions"))
    (tmp_path / "bad.jsonl").write_text('{"path": "x.mp4", "caption": "ok"}\n{"path": "y.mp4", "captions": "no list"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: expected"):
        read_entries(tmp_path / "bad.jsonl", None)


def test_captioned_shards_round_trip(videos, tmp_path, capsys):
    """make_shards keeps every caption with its video, writes no .cls, rejects the video
    without a caption by name, counts captions in the manifest, and a classification run
    refuses the set with a message that says why."""
    (videos / "caps.csv").write_text(_csv(CSV_ROWS + [["missing.mp4", "never written"]]))
    out = tmp_path / "shards"
    assert make_shards([str(videos / "caps.csv"), "--out", str(out), "--split", "train", "--copy",
                        "--workers", "1", "--shard-samples", "2", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "3 samples, 4 captions in 2 shards, 2 rejected" in printed
    assert "rejected silent.mp4: no caption" in printed and "rejected missing.mp4: file not found" in printed
    m = json.loads((out / "manifest.json").read_text())
    assert m["annotation"] == "captions" and m["classes"] == [] and m["num_classes"] == 0
    sp = m["splits"]["train"]
    assert sp["captions"] == {"total": 4, "per_video_min": 1, "per_video_max": 2} and "per_class" not in sp

    shards = ShardSet(*resolve_shards(str(out), "train"))
    stored = {}
    for i in range(len(shards)):
        meta = json.loads(shards.read(i, shards.JSON))
        stored[meta["source"]] = tuple(meta["captions"])
        assert "label" not in meta and shards.component(i, shards.CLS) is None
    assert stored == {"a/one.mp4": ("a dog runs, then stops", "the dog stops running"),
                      "a/two.mp4": ('a sign that reads "stop"',), "b/three.mp4": ("waves",)}
    for tar in sorted(out.glob("train-*.tar")):  # plain webdataset members: video + json, no cls
        with tarfile.open(tar) as t:
            assert {n.rsplit(".", 1)[-1] for n in t.getnames()} == {"mp4", "json"}

    # an edited caption is another build plan: refused without --overwrite, never mixed
    rows = [r[:] for r in CSV_ROWS]
    rows[1][1] = "a cat runs"
    (videos / "caps.csv").write_text(_csv(rows))
    with pytest.raises(SystemExit, match="started with other inputs or settings"):
        make_shards([str(videos / "caps.csv"), "--out", str(out), "--split", "train", "--copy",
                     "--workers", "1", "--shard-samples", "2", "--no-progress"])

    from claver_dist.data.config import DataConfig
    from claver_dist.data.loader import build_loader

    cfg = DataConfig(train_shards=str(out), val_shards=str(out), backend="cpu", num_frames=4, image_size=32)
    with pytest.raises(ShardError, match="captioned shard set .* classification needs labelled shards"):
        build_loader(cfg, "train", num_classes=3)


def test_loader_batches_carry_one_reproducible_caption_per_video(videos, tmp_path):
    """Train batches hold one caption per clip, drawn per (seed, epoch, key): the same in a
    second loader (a resumed run), changing between epochs for a video with several; val
    takes the first. A labelled set is refused for pretraining."""
    from claver_dist.data.config import DataConfig
    from claver_dist.data.loader import build_loader

    many = [f"caption number {i}" for i in range(8)]
    lines = [{"path": "a/one.mp4", "captions": many}, {"path": "a/two.mp4", "caption": "two"},
             {"path": "b/three.mp4", "captions": ["three", "drei"]}, {"path": "1066/31415.mp4", "caption": "pi"}]
    (tmp_path / "caps.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    out = tmp_path / "shards"
    for split in ("train", "val"):
        assert make_shards([str(tmp_path / "caps.jsonl"), "--root", str(videos), "--out", str(out), "--split", split,
                            "--copy", "--workers", "1", "--no-progress"]) == 0
    cfg = DataConfig(train_shards=str(out), val_shards=str(out), backend="cpu", num_frames=4, image_size=32,
                     batch_size=2, num_workers=0)
    want = {"a__one": many, "a__two": ["two"], "b__three": ["three", "drei"], "1066__31415": ["pi"]}

    def captions_by_epoch(loader, epochs: int) -> list[dict[str, str]]:
        out = []
        for _ in range(epochs):
            got = {}
            for batch in loader:
                assert batch["video"].shape[0] == len(batch["caption"]) == 2
                got.update(zip(batch["key"], batch["caption"]))
            out.append(got)
        return out

    first = captions_by_epoch(build_loader(cfg, "train", seed=3, captions=True), 4)
    again = captions_by_epoch(build_loader(cfg, "train", seed=3, captions=True), 4)
    assert first == again  # the same draws in a new loader: resumable
    for got in first:
        assert got.keys() == want.keys() and all(got[k] in want[k] for k in got)
    assert len({got["a__one"] for got in first}) > 1  # 8 captions over 4 epochs: not always the same one
    val = captions_by_epoch(build_loader(cfg, "val", captions=True), 1)[0]
    assert val == {k: v[0] for k, v in want.items()}

    labelled = tmp_path / "labelled"
    (tmp_path / "list.txt").write_text("a/one.mp4 0\na/two.mp4 1\n")
    (tmp_path / "labels.csv").write_text("id,name\n0,zero\n1,one\n")
    assert make_shards([str(tmp_path / "list.txt"), "--root", str(videos), "--labels", str(tmp_path / "labels.csv"),
                        "--out", str(labelled), "--split", "train", "--copy", "--workers", "1", "--no-progress"]) == 0
    with pytest.raises(ShardError, match="labelled shard set; video-text pretraining needs captioned shards"):
        build_loader(DataConfig(train_shards=str(labelled), backend="cpu"), "train", captions=True)


def test_demo_captions_name_the_colour_and_the_events_in_order(tmp_path):
    """The pretraining demo's data (synthetic.write_caption_dataset): every val caption unique,
    the clip painted in the colour its caption names, the size order its events name."""
    import av

    from claver_dist.data.synthetic import NAMED_COLOURS, SIZE_CLASSES, MotionSpec, write_caption_dataset

    paths = write_caption_dataset(tmp_path, per_class=1, spec=MotionSpec(width=64, height=48, min_frames=8,
                                                                          max_frames=8))  # fmt: skip
    rows = list(csv.DictReader(open(paths["val"])))
    clips = {}
    for r in rows:
        clips.setdefault(r["path"], []).append(r["caption"])
    assert len(clips) == len(SIZE_CLASSES) * len(NAMED_COLOURS)
    firsts = [c[0] for c in clips.values()]
    assert len(set(firsts)) == len(firsts)  # one clip per (order, colour): unique captions
    assert "a red shape grows then shrinks" in firsts and "a blue shape shrinks then grows then shrinks" in firsts
    for path, caps in clips.items():
        colour = next(c for c in NAMED_COLOURS if f" {c} " in f" {caps[0]} ")
        with av.open(str(tmp_path / path)) as f:
            frames = [fr.to_ndarray(format="rgb24").astype(int) for fr in f.decode(video=0)]
        # the shape's pixels are the named colour; its area follows the caption's order
        want = np.array(NAMED_COLOURS[colour])
        areas = [int((np.abs(fr - want).sum(-1) < 60).sum()) for fr in frames]
        assert max(areas) > 20, (path, areas)
        if "grows then shrinks" in caps[0] and "then grows" not in caps[0]:
            peak = int(np.argmax(areas))
            assert 0 < peak < len(areas) - 1 and areas[0] < areas[peak] > areas[-1], (path, areas)
