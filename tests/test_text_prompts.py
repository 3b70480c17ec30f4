"""claver_dist.text.prompts: bank loading, variant indexing, tokenization."""

import json
from pathlib import Path

import pytest
import torch

from claver_dist.text.prompts import (
    TEMPLATES, BankError, PromptBank, count_tokens, load_bank, readable_name, tokenize,
)


def _write(tmp_path: Path, names, prompts, provenance=None) -> tuple[str, str]:
    labels = tmp_path / "labels.csv"
    labels.write_text("id,name\n" + "".join(f"{i},{n}\n" for i, n in enumerate(names)))
    bank = tmp_path / "bank.json"
    bank.write_text(json.dumps({
        "provenance": provenance or {"method": "test"},
        "classes": [{"id": i, "name": n, "prompts": p} for i, (n, p) in enumerate(zip(names, prompts))],
    }))
    return str(labels), str(bank)


def test_templates_are_sixteen_with_one_slot():
    assert len(TEMPLATES) == 16 and len(set(TEMPLATES)) == 16
    assert all(t.count("{}") == 1 for t in TEMPLATES)


def test_templates_only_bank(tmp_path):
    labels, _ = _write(tmp_path, ["brush_hair", "ApplyEyeMakeup"], [{}, {}])
    bank = load_bank(labels, None)
    assert bank.class_names == ["brush_hair", "ApplyEyeMakeup"]
    assert bank.num_variants == 16
    assert bank.texts[0][0] == "a video of a person brush hair."
    assert bank.texts[1][0] == "a video of a person apply eye makeup."


def test_templates_then_bank_kinds_in_requested_order(tmp_path):
    labels, path = _write(tmp_path, ["run", "jump"], [
        {"synonyms": ["Jogging fast."], "scene": ["A track.", "A park."]},
        {"synonyms": ["Leaping up."], "scene": ["A gym."]},
    ])
    bank = load_bank(labels, path, kinds=["scene", "synonyms"], use_templates=False)
    assert bank.texts == [["A track.", "A park.", "Jogging fast."], ["A gym.", "Leaping up."]]
    assert bank.num_variants == 3
    # class 1 has 2 variants: index 2 wraps to its variant 0
    assert bank.variant_texts([2, 0]) == ["Jogging fast.", "A gym.", "A track.", "A gym."]
    full = load_bank(labels, path)  # all kinds, in bank order, after the templates
    assert full.texts[0][16:] == ["Jogging fast.", "A track.", "A park."]


def test_sample_indices_distinct_and_reproducible(tmp_path):
    bank = PromptBank(["a", "b"], [[f"t{i}" for i in range(20)], ["u"]])
    idx = bank.sample_indices(5, torch.Generator().manual_seed(3))
    assert len(idx) == 5 and len(set(idx)) == 5 and all(0 <= i < 20 for i in idx)
    assert idx == bank.sample_indices(5, torch.Generator().manual_seed(3))
    assert idx != bank.sample_indices(5, torch.Generator().manual_seed(4))
    small = PromptBank(["a"], [["x", "y"]])
    idx = small.sample_indices(5, torch.Generator().manual_seed(0))
    assert len(idx) == 5 and set(idx) <= {0, 1}  # with replacement only when A < K
    with pytest.raises(IndexError):
        small.variant_texts([2])


def test_bank_must_match_labels(tmp_path):
    labels, path = _write(tmp_path, ["run", "jump"], [{"s": ["Jogging."]}, {"s": ["Leaping."]}])
    other = tmp_path / "other.csv"
    other.write_text("id,name\n0,run\n1,walk\n")
    with pytest.raises(BankError, match=r"classes\[1\]\.name is 'jump' but .*other\.csv line 3 \(id 1\) is 'walk'"):
        load_bank(str(other), path)
    more = tmp_path / "more.csv"
    more.write_text("id,name\n0,run\n1,jump\n2,walk\n")
    with pytest.raises(BankError, match="has 2 classes but .*more.csv has 3"):
        load_bank(str(more), path)


def test_unknown_kind_and_overlong_text(tmp_path):
    labels, path = _write(tmp_path, ["run"], [{"synonyms": ["Jogging."]}])
    with pytest.raises(BankError, match="no prompts of kind 'scene' \\(the bank has: synonyms\\)"):
        load_bank(labels, path, kinds=["scene"])
    labels, path = _write(tmp_path, ["run"], [{"scene": ["word " * 80]}])
    with pytest.raises(BankError, match=r"classes\[0\]\.prompts\.scene\[0\] has 82 CLIP tokens"):
        load_bank(labels, path)


@pytest.mark.parametrize("mutate,message", [
    (lambda d: d.pop("provenance"), "missing key 'provenance'"),
    (lambda d: d.update(extra=1), "unknown key 'extra'"),
    (lambda d: d["classes"][0].update(id=5), r"classes\[0\]\.id: is 5, expected 0"),
    (lambda d: d["classes"][0]["prompts"].update(scene="A park."), r"classes\[0\]\.prompts\.scene: expected a list"),
    (lambda d: d["classes"][0]["prompts"].update(scene=[""]), r"classes\[0\]\.prompts\.scene\[0\]: expected a non-empty"),
])
def test_malformed_bank_errors_name_the_key(tmp_path, mutate, message):
    labels, path = _write(tmp_path, ["run"], [{"scene": ["A park."]}])
    data = json.loads(Path(path).read_text())
    mutate(data)
    Path(path).write_text(json.dumps(data))
    with pytest.raises(BankError, match=message):
        load_bank(labels, path)


def test_bank_not_json(tmp_path):
    labels, path = _write(tmp_path, ["run"], [{}])
    Path(path).write_text("{\n  nope")
    with pytest.raises(BankError, match=r"bank\.json:2: not valid JSON"):
        load_bank(labels, path)


def test_tokenize_and_count():
    toks = tokenize(["a video of a person running.", "jumping"])
    assert toks.shape == (2, 77) and toks.dtype == torch.long
    n = count_tokens("a video of a person running.")
    assert int((toks[0] != 0).sum()) == n == 9  # SOT + 7 BPE tokens + EOT
    assert count_tokens("word " * 75) == 77 and count_tokens("word " * 76) == 78


def test_readable_name():
    assert readable_name("ApplyEyeMakeup") == "apply eye makeup"
    assert readable_name("YoYo") == "yo yo"
    assert readable_name("Archery") == "archery"
    assert readable_name("brush_hair") == "brush hair"
    assert readable_name("passing American football (not in game)") == "passing American football (not in game)"


def test_save_bank_round_trip(tmp_path):
    from claver_dist.text.prompts import save_bank

    labels = tmp_path / "l.csv"
    labels.write_text("id,name\n0,run\n1,jump\n")
    path = tmp_path / "sub" / "b.json"
    save_bank(path, ["run", "jump"], [{"synonyms": ["Jogging."]}, {"synonyms": ["Leaping."]}], {"method": "test"})
    assert not (tmp_path / "sub" / "b.json.tmp").exists()
    bank = load_bank(str(labels), str(path), use_templates=False)
    assert bank.texts == [["Jogging."], ["Leaping."]]
    with pytest.raises(BankError, match=r"classes\[0\]\.prompts\.synonyms\[0\]"):
        save_bank(path, ["run"], [{"synonyms": [""]}], {})
