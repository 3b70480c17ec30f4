"""The benchmarks' official annotation files, read exactly (claver_dist.data.annotations).

Every file here is shaped like the official one: its name, CRLF line ends, a byte-order
mark where Windows tools write one, UCF-101's 1-based ids and label-less test lists,
HMDB-51's per-class split files with tags 0/1/2 and trailing spaces, Something-Something
v2's JSON with placeholders. The videos are small ones written by the test; the real
tools/make_shards.py and tools/make_fewshot.py read them.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from claver_dist.data.annotations import Options, detect_format, read_entries
from claver_dist.data.shards import ShardSet, resolve_shards
from claver_dist.data.synthetic import write_video
from claver_dist.text.prompts import load_labels
from tools.make_fewshot import main as make_fewshot
from tools.make_shards import main as make_shards

LABELS = Path(__file__).resolve().parent.parent / "labels"
BOM = "\ufeff"


def _crlf(lines: list[str], bom: bool = False) -> bytes:
    return ((BOM if bom else "") + "".join(f"{line}\r\n" for line in lines)).encode("utf-8")


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> dict[str, bytes]:
    """One tiny video per container: UCF/HMDB ship AVI, SSv2 WebM (VP9), Kinetics mp4."""
    d = tmp_path_factory.mktemp("clips")
    frames = np.random.default_rng(0).integers(0, 255, (4, 32, 32, 3), dtype=np.uint8)
    for name, codec in (("a.avi", "mjpeg"), ("a.webm", "vp9"), ("a.mp4", "h264")):
        write_video(d / name, frames, codec=codec)
    return {p.suffix[1:]: p.read_bytes() for p in d.iterdir()}


def _put(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def _shard(annotations: Path, labels: str, out: Path, *extra: str, split: str = "train") -> dict:
    argv = [str(annotations), "--labels", str(LABELS / labels), "--out", str(out), "--split", split,
            "--copy", "--workers", "1", "--no-progress", *extra]  # fmt: skip
    assert make_shards(argv) == 0
    return json.loads((out / "manifest.json").read_text())


def _stored(out: Path, split: str) -> dict[str, tuple[int, str]]:
    """source -> (label, class name) of every sample in the shards."""
    shards = ShardSet(*resolve_shards(str(out), split))
    metas = [shards.load(i)[1] for i in range(len(shards))]
    return {m["source"]: (m["label"], m["class_name"]) for m in metas}


# --------------------------------------------------------------------------- UCF-101

UCF_TRAIN = {  # official id (1-based, classInd.txt) -> videos of split 1
    1: ["ApplyEyeMakeup/v_ApplyEyeMakeup_g08_c01.avi", "ApplyEyeMakeup/v_ApplyEyeMakeup_g09_c02.avi"],
    3: ["Archery/v_Archery_g08_c01.avi", "Archery/v_Archery_g10_c03.avi"],
    # the official folder is HandstandPushups, its files v_HandStandPushups_*
    37: ["HandstandPushups/v_HandStandPushups_g08_c01.avi", "HandstandPushups/v_HandStandPushups_g09_c04.avi"],
    101: ["YoYo/v_YoYo_g08_c01.avi", "YoYo/v_YoYo_g25_c05.avi"],
}
UCF_TEST = ["ApplyEyeMakeup/v_ApplyEyeMakeup_g01_c01.avi", "Archery/v_Archery_g01_c01.avi",
            "HandstandPushups/v_HandStandPushups_g01_c01.avi", "YoYo/v_YoYo_g07_c04.avi"]  # fmt: skip


@pytest.fixture(scope="module")
def ucf101(tmp_path_factory, clips) -> Path:
    """UCF101/ (videos per class) and ucfTrainTestlist/ (classInd, trainlist01, testlist01)."""
    d = tmp_path_factory.mktemp("ucf101")
    names = load_labels(LABELS / "ucf101.csv")
    lists = d / "ucfTrainTestlist"
    lists.mkdir()
    (lists / "classInd.txt").write_bytes(_crlf([f"{i + 1} {n}" for i, n in enumerate(names)]))
    (lists / "trainlist01.txt").write_bytes(_crlf([f"{v} {c}" for c, vs in UCF_TRAIN.items() for v in vs], bom=True))
    (lists / "testlist01.txt").write_bytes(_crlf(UCF_TEST))
    for v in [v for vs in UCF_TRAIN.values() for v in vs] + UCF_TEST:
        _put(d / "UCF101" / v, clips["avi"])
    return d


def test_ucf101_split_lists_store_every_sample_under_its_own_class(ucf101, tmp_path):
    ids = {n: i for i, n in enumerate(load_labels(LABELS / "ucf101.csv"))}
    lists = ucf101 / "ucfTrainTestlist"
    assert detect_format(lists / "trainlist01.txt") == detect_format(lists / "testlist01.txt") == "ucf101"
    m = _shard(lists / "trainlist01.txt", "ucf101.csv", tmp_path, "--root", str(ucf101 / "UCF101"))
    stored = _stored(tmp_path, "train")
    assert set(stored) == {v for vs in UCF_TRAIN.values() for v in vs} and not m["rejected"]
    for source, (label, name) in stored.items():
        assert name == source.split("/")[0] and label == ids[name]
    # 1-based ids 1, 3, 37, 101 are ids 0, 2, 36, 100 of labels/ucf101.csv; YoYo (101) is kept
    assert sorted({label for label, _ in stored.values()}) == [0, 2, 36, 100]
    assert {c: n for c, n in m["splits"]["train"]["per_class"].items() if n} == {
        "ApplyEyeMakeup": 2, "Archery": 2, "HandstandPushups": 2, "YoYo": 2}  # fmt: skip
    # the test list has no labels: the folder is the class
    m = _shard(lists / "testlist01.txt", "ucf101.csv", tmp_path, "--root", str(ucf101 / "UCF101"), split="val")
    stored = _stored(tmp_path, "val")
    assert set(stored) == set(UCF_TEST) and m["splits"]["val"]["num_samples"] == 4
    assert all(label == ids[source.split("/")[0]] for source, (label, _) in stored.items())


def test_ucf101_fewshot_lists_carry_project_ids_and_shard_as_lists(ucf101, tmp_path):
    lists = ucf101 / "ucfTrainTestlist"
    assert make_fewshot([str(lists / "trainlist01.txt"), "--labels", str(LABELS / "ucf101.csv"),
                         "--k", "1", "2", "--out", str(tmp_path / "fs")]) == 0  # fmt: skip
    k1 = (tmp_path / "fs/train_k1.txt").read_text().splitlines()
    assert [line.split()[1] for line in k1] == ["0", "2", "36", "100"]
    assert len((tmp_path / "fs/train_k2.txt").read_text().splitlines()) == 8
    m = _shard(tmp_path / "fs/train_k1.txt", "ucf101.csv", tmp_path / "sh", "--root", str(ucf101 / "UCF101"))
    assert {c: n for c, n in m["splits"]["train"]["per_class"].items() if n} == {
        "ApplyEyeMakeup": 1, "Archery": 1, "HandstandPushups": 1, "YoYo": 1}  # fmt: skip


def test_one_based_list_is_refused_with_the_way_out(ucf101, tmp_path, capsys):
    lists = ucf101 / "ucfTrainTestlist"
    renamed = tmp_path / "train_split1.txt"  # the name no longer says UCF-101
    shutil.copy(lists / "trainlist01.txt", renamed)
    shutil.copy(lists / "classInd.txt", tmp_path / "classInd.txt")
    for argv in ([str(renamed)], [str(lists / "trainlist01.txt"), "--format", "list"]):
        rc = make_shards([*argv, "--root", str(ucf101 / "UCF101"), "--labels", str(LABELS / "ucf101.csv"),
                          "--out", str(tmp_path / "o"), "--copy", "--workers", "1", "--no-progress"])  # fmt: skip
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert rc == 2 and "labels look 1-based" in err, err
        assert Path(argv[0]).name + ":7:" in err and "--format ucf101" in err and "--one-based" in err
    rc = make_fewshot([str(renamed), "--labels", str(LABELS / "ucf101.csv"), "--out", str(tmp_path / "fs")])
    assert rc == 2 and "labels look 1-based" in capsys.readouterr().err
    # named explicitly, the same file reads right; --one-based reads a 1-based list
    m = _shard(renamed, "ucf101.csv", tmp_path / "a", "--format", "ucf101", "--root", str(ucf101 / "UCF101"))
    assert m["splits"]["train"]["per_class"]["YoYo"] == 2
    m = _shard(renamed, "ucf101.csv", tmp_path / "b", "--one-based", "--root", str(ucf101 / "UCF101"))
    assert m["splits"]["train"]["per_class"]["YoYo"] == 2 and m["splits"]["train"]["per_class"]["ApplyEyeMakeup"] == 2


def test_ucf101_mismatches_are_refused_naming_the_line(ucf101, tmp_path):
    labels = load_labels(LABELS / "ucf101.csv")
    lists = ucf101 / "ucfTrainTestlist"
    (tmp_path / "classInd.txt").write_bytes(_crlf([f"{i + 2} {n}" for i, n in enumerate(labels)]))  # shifted
    (tmp_path / "trainlist01.txt").write_bytes((lists / "trainlist01.txt").read_bytes())
    with pytest.raises(ValueError, match=r"trainlist01\.txt:1: class id 1 is not in .*classInd\.txt"):
        read_entries(tmp_path / "trainlist01.txt", labels)
    (tmp_path / "classInd.txt").write_bytes(_crlf([f"{i + 1} {n}" for i, n in enumerate(labels)]))
    (tmp_path / "trainlist01.txt").write_bytes(_crlf(["ApplyEyeMakeup/v_x.avi 1", "Archery/v_y.avi 2"]))
    with pytest.raises(ValueError, match=r"trainlist01\.txt:2: class id 2 is 'ApplyLipstick' .* folder 'Archery'"):
        read_entries(tmp_path / "trainlist01.txt", labels)
    with pytest.raises(ValueError, match=r"classInd\.txt:1: class 'ApplyEyeMakeup' is not in the labels CSV"):
        read_entries(tmp_path / "trainlist01.txt", load_labels(LABELS / "hmdb51.csv"))
    (tmp_path / "testlist01.txt").write_bytes(_crlf(["ApplyEyeMakeup/v_a.avi", "Juggling/v_b.avi"]))
    with pytest.raises(ValueError, match=r"testlist01\.txt:2: class folder 'Juggling' is not in"):
        read_entries(tmp_path / "testlist01.txt", labels)


# --------------------------------------------------------------------------- HMDB-51

# per class: (video, tag of split 1, tag of split 2); 1 train, 2 test, 0 unused
HMDB = {
    "brush_hair": [("April_09_brush_hair_u_nm_np1_ba_goo_0.avi", 1, 2), ("April_09_brush_hair_u_nm_np1_ba_goo_1.avi", 1, 1),
                   ("Brushing_Hair_with_Beth_brush_hair_h_nm_np1_le_goo_0.avi", 2, 1),
                   ("red_head_brush_hair_u_cm_np1_ba_goo_0.avi", 0, 0)],
    "clap": [("#20_Rhythm_clap_u_nm_np1_fr_goo_0.avi", 1, 1), ("#20_Rhythm_clap_u_nm_np1_fr_goo_1.avi", 2, 0),
             ("Clap_Hands_clap_u_cm_np1_fr_med_0.avi", 0, 2)],
    # a class name that ends another's: sword / sword_exercise
    "sword": [("AHF_longsword_against_Rapier_and_Dagger_Fight_sword_f_cm_np2_ri_bad_0.avi", 1, 2),
              ("Fencing_sword_f_cm_np2_le_goo_1.avi", 2, 1)],
    "sword_exercise": [("Blade_Of_Fury_-_Scene_1_sword_exercise_f_cm_np1_ri_med_3.avi", 1, 1),
                       ("Sword_exercise_sword_exercise_u_cm_np1_fr_med_0.avi", 2, 2)],
}  # fmt: skip


@pytest.fixture(scope="module")
def hmdb51(tmp_path_factory, clips) -> Path:
    """hmdb51/<class>/<video>.avi and testTrainMulti_7030_splits/<class>_test_split{1,2,3}.txt."""
    d = tmp_path_factory.mktemp("hmdb51")
    splits = d / "testTrainMulti_7030_splits"
    splits.mkdir()
    for cls, videos in HMDB.items():
        for s in (1, 2, 3):
            tags = [v[1 if s == 1 else 2] for v in videos]  # split 3 repeats split 2
            (splits / f"{cls}_test_split{s}.txt").write_bytes(_crlf([f"{v[0]} {t} " for v, t in zip(videos, tags)]))
        for v in videos:
            _put(d / "videos" / cls / v[0], clips["avi"])
    return d


@pytest.mark.parametrize("split_id,subset", [(1, "train"), (1, "test"), (2, "train")])
def test_hmdb51_split_folder_keeps_exactly_the_tagged_videos(hmdb51, tmp_path, split_id, subset):
    ids = {n: i for i, n in enumerate(load_labels(LABELS / "hmdb51.csv"))}
    folder = hmdb51 / "testTrainMulti_7030_splits"
    assert detect_format(folder) == "hmdb51"
    m = _shard(folder, "hmdb51.csv", tmp_path, "--root", str(hmdb51 / "videos"),
               "--split-id", str(split_id), "--subset", subset)  # fmt: skip
    tag = {"train": 1, "test": 2}[subset]
    want = {f"{c}/{v[0]}" for c, vs in HMDB.items() for v in vs if v[split_id] == tag}
    stored = _stored(tmp_path, "train")
    assert set(stored) == want and not m["rejected"]  # tags 0 and the other subset left out
    for source, (label, name) in stored.items():
        assert name == source.split("/")[0] and label == ids[name]
    assert m["splits"]["train"]["num_samples"] == len(want)


def test_hmdb51_fewshot_and_refusals(hmdb51, tmp_path, capsys):
    folder = hmdb51 / "testTrainMulti_7030_splits"
    ids = {n: i for i, n in enumerate(load_labels(LABELS / "hmdb51.csv"))}
    assert make_fewshot([str(folder), "--split-id", "1", "--subset", "train", "--labels", str(LABELS / "hmdb51.csv"),
                         "--k", "1", "--out", str(tmp_path / "fs")]) == 0  # fmt: skip
    lines = [line.rsplit(" ", 1) for line in (tmp_path / "fs/train_k1.txt").read_text().splitlines()]
    assert sorted(int(label) for _, label in lines) == sorted(ids[c] for c in HMDB)
    assert all(ids[rel.split("/")[0]] == int(label) for rel, label in lines)
    labels = load_labels(LABELS / "hmdb51.csv")
    with pytest.raises(ValueError, match=r"needs --split-id \(this folder has splits \[1, 2, 3\]\)"):
        read_entries(folder, labels, Options(subset="train"))
    with pytest.raises(ValueError, match="needs --subset train or test"):
        read_entries(folder, labels, Options(split_id=1))
    bad = tmp_path / "splits"
    shutil.copytree(folder, bad)
    (bad / "clap_test_split1.txt").write_bytes(_crlf(["a.avi 1", "b.avi 3"]))
    with pytest.raises(ValueError, match=r"clap_test_split1\.txt:2: expected '<video>\.avi <0\|1\|2>'"):
        read_entries(bad, labels, Options(split_id=1, subset="train"))
    # two classes of the labels CSV that differ only by '_' vs ' ': ambiguous, not a pick
    (tmp_path / "amb.csv").write_text("id,name\n0,brush_hair\n1,brush hair\n2,clap\n3,sword\n4,sword_exercise\n")
    rc = make_shards([str(folder), "--split-id", "1", "--subset", "train", "--labels", str(tmp_path / "amb.csv"),
                      "--out", str(tmp_path / "o"), "--no-progress"])  # fmt: skip
    assert rc == 2 and "brush_hair_test_split1.txt: class 'brush_hair' matches several classes" in capsys.readouterr().err
    # an option that the format ignores is an error, not silently dropped
    (tmp_path / "testlist01.txt").write_text("brush_hair/a.avi\n")
    with pytest.raises(ValueError, match="--split-id does not apply to the ucf101 format"):
        read_entries(tmp_path / "testlist01.txt", labels, Options(split_id=1))


# --------------------------------------------------------------------------- Something-Something v2

SSV2_TRAIN = [  # (id, template, placeholders)
    ("78687", "Holding [something] next to [something]", ["potato", "vicks vaporub bottle"]),
    ("42326", "[Something] falling like a feather or paper", ["tissue"]),
    ("100904", "Putting [something], [something] and [something] on the table", ["pen", "cup", "key"]),
    ("13956", "Lifting [something] up completely, then letting it drop down", ["box"]),
    ("74225", "Holding [something] next to [something]", ["mug", "lamp"]),
]
SSV2_VAL = [("1420", "Approaching [something] with your camera", ["a chair"])]


def _ssv2_entry(vid: str, template: str, placeholders: list[str]) -> dict:
    label = template
    for p in placeholders:
        label = label.replace("[something]", p, 1).replace("[Something]", p, 1)
    return {"id": vid, "label": label, "template": template, "placeholders": placeholders}


@pytest.fixture(scope="module")
def ssv2(tmp_path_factory, clips) -> Path:
    d = tmp_path_factory.mktemp("ssv2")
    names = load_labels(LABELS / "ssv2.csv")
    (d / "labels").mkdir()

    def dump(name: str, obj) -> None:  # pretty-printed, CRLF, BOM: as the download ships
        (d / "labels" / name).write_bytes((BOM + json.dumps(obj, indent=4)).replace("\n", "\r\n").encode())

    dump("labels.json", {n: str(i) for i, n in enumerate(names)})
    dump("something-something-v2-train.json", [_ssv2_entry(*e) for e in SSV2_TRAIN])
    dump("something-something-v2-validation.json", [_ssv2_entry(*e) for e in SSV2_VAL])
    dump("something-something-v2-test.json", [{"id": "5"}])
    for vid, _, _ in SSV2_TRAIN + SSV2_VAL:
        _put(d / "20bn-something-something-v2" / f"{vid}.webm", clips["webm"])
    return d


def test_ssv2_json_maps_templates_onto_the_label_list(ssv2, tmp_path):
    ids = {n: i for i, n in enumerate(load_labels(LABELS / "ssv2.csv"))}
    videos = ssv2 / "20bn-something-something-v2"
    train = ssv2 / "labels/something-something-v2-train.json"
    assert detect_format(train) == "ssv2"
    m = _shard(train, "ssv2.csv", tmp_path, "--root", str(videos))
    stored = _stored(tmp_path, "train")
    want = {f"{vid}.webm": t.replace("[", "").replace("]", "") for vid, t, _ in SSV2_TRAIN}
    assert {s: name for s, (_, name) in stored.items()} == want and not m["rejected"]
    assert all(label == ids[name] for label, name in stored.values())
    assert m["splits"]["train"]["per_class"]["Holding something next to something"] == 2
    assert m["splits"]["train"]["per_class"]["Lifting something up completely, then letting it drop down"] == 1
    m = _shard(ssv2 / "labels/something-something-v2-validation.json", "ssv2.csv", tmp_path, "--root", str(videos),
               split="val")  # fmt: skip
    assert _stored(tmp_path, "val") == {"1420.webm": (0, "Approaching something with your camera")}
    assert make_fewshot([str(train), "--labels", str(LABELS / "ssv2.csv"), "--k", "1", "--out", str(tmp_path / "fs")]) == 0
    assert len((tmp_path / "fs/train_k1.txt").read_text().splitlines()) == 4


def test_ssv2_refusals_name_the_entry(ssv2, tmp_path):
    labels = load_labels(LABELS / "ssv2.csv")
    with pytest.raises(ValueError, match=r"test\.json: entry 1 \(id 5\): no template"):
        read_entries(ssv2 / "labels/something-something-v2-test.json", labels)
    with pytest.raises(ValueError, match="a class index"):
        read_entries(ssv2 / "labels/labels.json", labels)
    (tmp_path / "labels.json").write_bytes((ssv2 / "labels/labels.json").read_bytes())
    (tmp_path / "train.json").write_text(json.dumps([_ssv2_entry("1", "Holding [something] next to [something]", []),
                                                     _ssv2_entry("2", "Juggling [something]", ["balls"])]))  # fmt: skip
    with pytest.raises(ValueError, match=r"train\.json: entry 2 \(id 2\): template .* not in .*labels\.json"):
        read_entries(tmp_path / "train.json", labels, Options(fmt="ssv2"))


# --------------------------------------------------------------------------- Kinetics


def test_kinetics_csv_with_extra_columns_crlf_and_bom(tmp_path, clips):
    ids = {n: i for i, n in enumerate(load_labels(LABELS / "kinetics400.csv"))}
    rows = [("abseiling", "aaa", 10, 20, "train"), ("air drumming", "bbb", 0, 10, "train"),
            ("passing American football (in game)", "ccc", 5, 15, "train"), ("abseiling", "ddd", 0, 10, "val")]  # fmt: skip
    for label, yt, t0, t1, split in rows:
        _put(tmp_path / "k400" / split / label / f"{yt}_{t0:06d}_{t1:06d}.mp4", clips["mp4"])
    lines = ["label,youtube_id,time_start,time_end,split,is_cc"]
    lines += [f'"{label}",{yt},{t0},{t1},{split},0' for label, yt, t0, t1, split in rows]
    lines += ['"not a kinetics class",eee,0,10,train,1']
    (tmp_path / "train.csv").write_bytes(_crlf(lines, bom=True))
    assert detect_format(tmp_path / "train.csv") == "kinetics"
    m = _shard(tmp_path / "train.csv", "kinetics400.csv", tmp_path / "out", "--root", str(tmp_path / "k400"))
    stored = _stored(tmp_path / "out", "train")
    assert {name for _, name in stored.values()} == {r[0] for r in rows[:3]}
    assert all(label == ids[name] for label, name in stored.values())
    assert [r["reason"] for r in m["rejected"]] == ["class 'not a kinetics class' not in labels"]
