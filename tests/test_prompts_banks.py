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

# bank, label list, minimum kinds per class, minimum variants per kind (issue 6)
SHIPPED = [
    ("ucf101", "ucf101", 3, 2),
    ("hmdb51", "hmdb51", 3, 2),
    ("kinetics400", "kinetics400", 3, 1),
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
        kinds = {k: v for k, v in c["prompts"].items() if len(v) >= min_variants}
        assert len(kinds) >= min_kinds, f"{c['name']}: {list(c['prompts'])}"
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
    for bank, *_ in SHIPPED:
        prov = json.loads((ROOT / "prompts" / f"{bank}.json").read_text())["provenance"]
        assert "LLM" in prov["method"] and prov["date"] == "2026-11-24"
