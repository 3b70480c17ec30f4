"""Label lists in labels/: counts, known facts, and the Kinetics-600 new-class derivation."""

from pathlib import Path

import pytest

from claver_dist.text.prompts import LabelsError, load_labels
from tools.derive_k600_new import K400_TO_K600_RENAMES, derive_new_classes, main as derive_main

ROOT = Path(__file__).resolve().parent.parent
LABELS = ROOT / "labels"


@pytest.mark.parametrize("name,count,first,last", [
    ("kinetics400", 400, "abseiling", "zumba"),
    ("kinetics600", 600, "abseiling", "zumba"),
    ("ucf101", 101, "ApplyEyeMakeup", "YoYo"),
    ("hmdb51", 51, "brush_hair", "wave"),
    ("ssv2", 174, "Approaching something with your camera", "Wiping something off of something"),
    ("kinetics600_new", 220, "acting in play", "yarn spinning"),
])
def test_label_list_counts(name, count, first, last):
    names = load_labels(LABELS / f"{name}.csv")
    assert len(names) == count
    assert len(set(names)) == count
    assert (names[0], names[-1]) == (first, last)


def test_kinetics_ids_are_alphabetical():
    # Kinetics' usual ids are the sorted class names.
    for name in ("kinetics400", "kinetics600"):
        names = load_labels(LABELS / f"{name}.csv")
        assert names == sorted(names), name


def test_ssv2_names_with_commas_survive_csv():
    names = load_labels(LABELS / "ssv2.csv")
    assert names[28] == "Lifting something up completely, then letting it drop down"


def test_k600_new_derivation_reproduces_file(capsys):
    k400 = load_labels(LABELS / "kinetics400.csv")
    k600 = load_labels(LABELS / "kinetics600.csv")
    new = derive_new_classes(k400, k600)
    assert new == load_labels(LABELS / "kinetics600_new.csv")
    assert len(new) == 220
    # renamed classes are not new, and neither is anything of K400
    assert "dyeing hair" not in new and "tying necktie" not in new
    assert not set(new) & set(k400)
    # without the rename table the 12 renamed classes would count as new
    assert len(derive_new_classes(k400, k600, renames={})) == 232
    assert len(K400_TO_K600_RENAMES) == 12
    assert derive_main(["--check"]) == 0


def test_rename_table_must_name_real_classes():
    with pytest.raises(ValueError, match="not a Kinetics-400 class"):
        derive_new_classes(["a"], ["a", "b"], renames={"x": "b"})
    with pytest.raises(ValueError, match="not a Kinetics-600 class"):
        derive_new_classes(["a"], ["b"], renames={"a": "c"})


@pytest.mark.parametrize("content,message", [
    ("idx,label\n0,a\n", r"bad\.csv:1: header"),
    ("id,name\n0,a\n0,b\n", r"bad\.csv:3: duplicate id 0"),
    ("id,name\n0,a\n1,a\n", r"bad\.csv:3: duplicate class name 'a'"),
    ("id,name\n0,a\nx,b\n", r"bad\.csv:3: id 'x' is not an integer"),
    ("id,name\n0,a\n2,b\n", r"bad\.csv: ids must be 0\.\.1; missing id 1"),
    ("id,name\n0,a,extra\n", r"bad\.csv:2: expected 2 fields"),
    ("id,name\n0, \n", r"bad\.csv:2: empty class name"),
    ("", r"bad\.csv: empty labels file"),
])
def test_bad_labels_file_errors_name_file_and_line(tmp_path, content, message):
    path = tmp_path / "bad.csv"
    path.write_text(content)
    with pytest.raises(LabelsError, match=message):
        load_labels(path)


def test_missing_labels_file(tmp_path):
    with pytest.raises(LabelsError, match="nope.csv: labels file not found"):
        load_labels(tmp_path / "nope.csv")


def test_ids_in_any_row_order(tmp_path):
    path = tmp_path / "l.csv"
    path.write_text("id,name\n1,b\n0,a\n")
    assert load_labels(path) == ["a", "b"]
