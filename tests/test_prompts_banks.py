"""The shipped prompt banks in prompts/: complete, within CLIP's context, no empty or
duplicate texts, provenance present, and loadable by training."""

import json
import re
from pathlib import Path

import pytest

from claver_dist.text.prompts import (
    CONTEXT_LENGTH, TEMPLATES, count_tokens, load_bank, load_labels, read_bank_file,
)

ROOT = Path(__file__).resolve().parent.parent

# bank, label list, kinds per class, texts per kind: the three kinds the official training
# uses (decomposition, body parts, synonyms), three texts each
KINDS = ("decomposition", "body_parts", "synonyms")
SHIPPED = [
    ("ucf101", "ucf101", 3, 3),
    ("hmdb51", "hmdb51", 3, 3),
    ("kinetics400", "kinetics400", 3, 3),
    ("kinetics600", "kinetics600", 3, 3),
    ("kinetics600_new", "kinetics600_new", 3, 3),
]


def _norm(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", " ", text.lower()).strip()


@pytest.mark.parametrize("bank,labels,min_kinds,min_variants", SHIPPED)
def test_shipped_bank(bank, labels, min_kinds, min_variants):
    bank_path, labels_path = ROOT / "prompts" / f"{bank}.json", ROOT / "labels" / f"{labels}.csv"
    data = read_bank_file(bank_path)  # structure: ids in order, lists of non-empty strings
    names = load_labels(labels_path)
    assert [c["name"] for c in data["classes"]] == names

    seen: dict[str, str] = {}
    for c in data["classes"]:
        counts = {k: len(v) for k, v in c["prompts"].items()}
        assert tuple(counts) == KINDS[:min_kinds] and set(counts.values()) == {min_variants}, (c["name"], counts)
        for kind, texts in c["prompts"].items():
            for t in texts:
                assert t == " ".join(t.split()) and t, f"{c['name']} {kind}: {t!r}"
                n = count_tokens(t)
                assert n <= CONTEXT_LENGTH, f"{c['name']} {kind}: {n} tokens: {t}"
                key = _norm(t)
                assert key not in seen, f"duplicate text in {c['name']} and {seen[key]}: {t}"
                seen[key] = c["name"]

    prov = data["provenance"]
    for key in ("method", "model", "date", "parameters", "prompt_sha256"):
        assert prov.get(key), f"provenance.{key} missing"
    assert set(prov["parameters"]["kinds"]) == {k for c in data["classes"] for k in c["prompts"]}

    # what training reads: templates first, then every bank text of the class
    pb = load_bank(str(labels_path), str(bank_path))
    assert pb.class_names == names
    assert pb.num_variants >= len(TEMPLATES) + min_kinds * min_variants
    first = data["classes"][0]["prompts"]
    assert pb.texts[0][len(TEMPLATES):] == [t for ts in first.values() for t in ts]


def test_shipped_banks_say_how_they_were_written():
    for bank, labels, *_ in SHIPPED:
        prov = json.loads((ROOT / "prompts" / f"{bank}.json").read_text())["provenance"]
        assert "LLM" in prov["method"] and prov["endpoint"] is None, bank
        assert prov["labels"] == f"{labels}.csv"


def test_kinetics600_bank_reuses_the_kinetics400_texts():
    """A class has the same texts in every bank: the 380 shared classes (12 of them renamed)
    take Kinetics-400's, the 220 new ones the new-class bank's; the file is what the tool derives."""
    from tools.derive_k600_new import K400_TO_K600_RENAMES, main

    k400 = {c["name"]: c["prompts"] for c in read_bank_file(ROOT / "prompts/kinetics400.json")["classes"]}
    new = {c["name"]: c["prompts"] for c in read_bank_file(ROOT / "prompts/kinetics600_new.json")["classes"]}
    k600 = {c["name"]: c["prompts"] for c in read_bank_file(ROOT / "prompts/kinetics600.json")["classes"]}
    assert k600["dyeing hair"] == k400["dying hair"] and k600["abseiling"] == k400["abseiling"]
    assert sum(name in k400 or name in K400_TO_K600_RENAMES.values() for name in k600) == 380
    assert all(k600[name] == texts for name, texts in new.items()) and len(new) == 220
    assert main(["--check"]) == 0
