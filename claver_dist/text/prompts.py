"""Class label lists and interpretive prompt banks: what the text branch reads.

CLAVER gives every action class c a set of A_c text variants: templated class names
("a video of a person {}.") and LLM-written *interpretive prompts* of several kinds
(action decomposition, body parts, synonyms, scene). This module loads

* a label list, ``labels/*.csv`` with header ``id,name`` (``load_labels``), and
* a prompt bank, ``prompts/*.json`` (format in docs/prompts.md; written by
  ``tools/make_prompts.py``), into a ``PromptBank`` (``load_bank``),

and tokenizes texts with open_clip's CLIP BPE tokenizer (``tokenize``,
``count_tokens``). Training draws K variant indices per step (``sample_indices``) and
encodes ``variant_texts(indices)``; evaluation averages over all ``num_variants``.

    from claver_dist.text.prompts import load_bank
    bank = load_bank("labels/ucf101.csv", "prompts/ucf101.json")
    tokens = tokenize(bank.variant_texts([0, 1]))     # (2 * C, 77)

Nothing here reads the environment or the network.
"""

from __future__ import annotations

import csv
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import torch

from claver_dist.errors import BankError, LabelsError

# The reference recipe uses 16 class-name templates (ActionCLIP/X-CLIP lineage); these
# are ours, in the same spirit: short, varied framings of "a person doing <action>".
# The templates come first in every class's variant list, so variant index i < 16 is
# the same template for every class.
TEMPLATES: list[str] = [
    "a video of a person {}.",
    "a photo of the action {}.",
    "human action of {}.",
    "{}, an action.",
    "{}, this is an action.",
    "{}, a video of an action.",
    "playing the action of {}.",
    "{}",
    "playing a kind of action, {}.",
    "doing a kind of action, {}.",
    "look, the human is {}.",
    "can you recognize the action of {}?",
    "video classification of {}.",
    "a video of {}.",
    "the man is {}.",
    "the woman is {}.",
]

# Kinds of interpretive prompt (CLAVER §2). A bank may hold any subset, and other
# kinds too; these are the ones tools/make_prompts.py knows how to ask for.
KINDS: tuple[str, ...] = ("decomposition", "body_parts", "synonyms", "scene")

CONTEXT_LENGTH = 77  # CLIP's text context, SOT and EOT included


# --------------------------------------------------------------------------- labels


def load_labels(path: str | Path) -> list[str]:
    """Read an ``id,name`` CSV and return the names in id order.

    Ids must be the integers 0..N-1 (any row order), names non-empty and distinct.
    Every error is one line naming the file (and the line, where there is one).
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise LabelsError(f"{path}: labels file not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise LabelsError(f"{path}: cannot read labels file ({e})") from None
    rows = list(csv.reader(text.splitlines()))
    if not rows:
        raise LabelsError(f"{path}: empty labels file (expected a header 'id,name')")
    header = [h.strip() for h in rows[0]]
    if header != ["id", "name"]:
        raise LabelsError(f"{path}:1: header is {','.join(rows[0])!r}, expected 'id,name'")
    by_id: dict[int, str] = {}
    seen: dict[str, int] = {}
    for lineno, row in enumerate(rows[1:], start=2):
        if not row or all(not cell.strip() for cell in row):
            continue  # blank line
        if len(row) != 2:
            raise LabelsError(f"{path}:{lineno}: expected 2 fields 'id,name', got {len(row)}: {row!r}")
        raw_id, name = row[0].strip(), row[1].strip()
        try:
            cid = int(raw_id)
        except ValueError:
            raise LabelsError(f"{path}:{lineno}: id {raw_id!r} is not an integer") from None
        if not name:
            raise LabelsError(f"{path}:{lineno}: empty class name for id {cid}")
        if cid in by_id:
            raise LabelsError(f"{path}:{lineno}: duplicate id {cid}")
        if name in seen:
            raise LabelsError(f"{path}:{lineno}: duplicate class name {name!r} (also line {seen[name]})")
        by_id[cid] = name
        seen[name] = lineno
    if not by_id:
        raise LabelsError(f"{path}: no classes (only a header)")
    missing = sorted(set(range(len(by_id))) - set(by_id))
    if missing:
        raise LabelsError(f"{path}: ids must be 0..{len(by_id) - 1}; missing id {missing[0]}")
    return [by_id[i] for i in range(len(by_id))]


_CAMEL = re.compile(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])")


def readable_name(name: str) -> str:
    """The class name as words, for templates: label lists keep each dataset's own
    spelling (UCF-101 ``ApplyEyeMakeup``, HMDB-51 ``brush_hair``) so that folder names
    map to ids verbatim, but CLIP should read "apply eye makeup"."""
    words = name.replace("_", " ")
    if " " not in words and words[:1].isupper() and not words.isupper():
        words = _CAMEL.sub(" ", words).lower()  # UCF-101's CamelCase identifiers
    return " ".join(words.split())


# --------------------------------------------------------------------------- tokens


def _clip_tokenizer():
    # Imported lazily: open_clip pulls in torchvision, and the label/bank readers
    # should stay cheap for tools that only validate files.
    from open_clip import tokenizer as open_clip_tokenizer

    return open_clip_tokenizer._tokenizer


def tokenize(texts: list[str], context_length: int = CONTEXT_LENGTH) -> torch.LongTensor:
    """CLIP BPE tokens, ``(len(texts), context_length)``, zero-padded.

    open_clip truncates an over-long text (keeping EOT last); banks are checked with
    ``count_tokens`` when loaded, so that never happens to a bank text.
    """
    return _clip_tokenizer()(list(texts), context_length=context_length)


def trim_padding(tokens: torch.Tensor) -> torch.Tensor:
    """Host token ids ``[..., ctx]`` without the padding columns after the longest text's EOT
    (EOT has the largest id in CLIP's vocabulary). Under CLIP's causal mask no token attends
    to later positions, so the features are unchanged and the text tower runs on ~20
    positions instead of 77. Done once on the host: finding the length on the GPU would
    stall it at every step."""
    return tokens[..., : int(tokens.argmax(dim=-1).max()) + 1]


def count_tokens(text: str) -> int:
    """Number of CLIP tokens of ``text`` including SOT and EOT (must be <= 77)."""
    return len(_clip_tokenizer().encode(text)) + 2


# --------------------------------------------------------------------------- banks


def read_bank_file(path: str | Path) -> dict[str, Any]:
    """Parse and structurally validate a bank JSON (see docs/prompts.md).

    Returns the JSON object. Errors name the file and the bad key, e.g.
    ``prompts/x.json: classes[3].prompts.synonyms[1]: expected a string``.
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise BankError(f"{path}: prompt bank not found") from None
    except json.JSONDecodeError as e:
        raise BankError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
    if not isinstance(data, dict):
        raise BankError(f"{path}: top level must be an object with 'provenance' and 'classes'")
    for key in ("provenance", "classes"):
        if key not in data:
            raise BankError(f"{path}: missing key '{key}'")
    unknown = sorted(set(data) - {"provenance", "classes"})
    if unknown:
        raise BankError(f"{path}: unknown key '{unknown[0]}'")
    if not isinstance(data["provenance"], dict):
        raise BankError(f"{path}: provenance: expected an object")
    classes = data["classes"]
    if not isinstance(classes, list):
        raise BankError(f"{path}: classes: expected a list")
    for i, entry in enumerate(classes):
        where = f"{path}: classes[{i}]"
        if not isinstance(entry, dict):
            raise BankError(f"{where}: expected an object with id, name, prompts")
        for key in ("id", "name", "prompts"):
            if key not in entry:
                raise BankError(f"{where}: missing key '{key}'")
        if entry["id"] != i:
            raise BankError(f"{where}.id: is {entry['id']!r}, expected {i} (classes are in label-id order)")
        if not isinstance(entry["name"], str) or not entry["name"]:
            raise BankError(f"{where}.name: expected a non-empty string")
        prompts = entry["prompts"]
        if not isinstance(prompts, dict):
            raise BankError(f"{where}.prompts: expected an object {{kind: [text, ...]}}")
        for kind, texts in prompts.items():
            if not isinstance(texts, list):
                raise BankError(f"{where}.prompts.{kind}: expected a list of strings")
            for j, t in enumerate(texts):
                if not isinstance(t, str) or not t.strip():
                    raise BankError(f"{where}.prompts.{kind}[{j}]: expected a non-empty string")
    return data


def check_bank_classes(bank_path: str | Path, bank: dict[str, Any], labels_path: str | Path,
                       names: list[str]) -> None:
    """The bank's classes must be the label list's, same names, same order."""
    got = [c["name"] for c in bank["classes"]]
    for i, (b, l) in enumerate(zip(got, names)):
        if b != l:
            raise BankError(f"{bank_path}: classes[{i}].name is {b!r} but {labels_path} "
                            f"line {i + 2} (id {i}) is {l!r}")
    if len(got) != len(names):
        raise BankError(f"{bank_path}: has {len(got)} classes but {labels_path} has {len(names)}")


def save_bank(path: str | Path, class_names: list[str], prompts: list[dict[str, list[str]]],
              provenance: dict[str, Any]) -> None:
    """Write a bank file (format above) atomically: a temp file renamed into place, so
    a reader never sees half a bank. ``prompts[c]`` is class c's ``{kind: [text, ...]}``."""
    if len(class_names) != len(prompts):
        raise ValueError(f"{len(class_names)} class names but {len(prompts)} prompt dicts")
    data = {"provenance": provenance,
            "classes": [{"id": i, "name": n, "prompts": p}
                        for i, (n, p) in enumerate(zip(class_names, prompts))]}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    tmp.replace(path)
    read_bank_file(path)  # what we wrote must be what readers accept


@dataclass
class PromptBank:
    """Per-class text variants. Class c has ``A_c = len(texts[c])`` variants; the bank
    exposes ``A = max_c A_c`` and wraps: class c's variant i is ``texts[c][i % A_c]``,
    so every index names one text for every class (CLAVER draws the same K indices
    for all classes)."""

    class_names: list[str]
    texts: list[list[str]]

    def __post_init__(self) -> None:
        if len(self.class_names) != len(self.texts):
            raise ValueError(f"{len(self.class_names)} class names but {len(self.texts)} text lists")
        for name, variants in zip(self.class_names, self.texts):
            if not variants:
                raise ValueError(f"class {name!r} has no text variants")

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def num_variants(self) -> int:
        return max(len(t) for t in self.texts)

    def variant_texts(self, indices: list[int]) -> list[str]:
        """``len(indices) * C`` texts, variant-major: all classes of ``indices[0]``,
        then all classes of ``indices[1]`` ... (reshape to ``(K, C)`` after encoding)."""
        out = []
        for k in indices:
            if not 0 <= k < self.num_variants:
                raise IndexError(f"variant index {k} out of range 0..{self.num_variants - 1}")
            out.extend(t[k % len(t)] for t in self.texts)
        return out

    def sample_indices(self, k: int, generator: torch.Generator) -> list[int]:
        """K variant indices: distinct when ``A >= K``, drawn with replacement only
        when the bank has fewer than K variants."""
        a = self.num_variants
        if k <= 0:
            raise ValueError(f"k must be positive, got {k}")
        if a >= k:
            return torch.randperm(a, generator=generator)[:k].tolist()
        return torch.randint(a, (k,), generator=generator).tolist()


def _select_kinds(bank_path: str | Path, bank: dict[str, Any], kinds: Iterable[str]) -> list[str]:
    present: list[str] = []
    for entry in bank["classes"]:
        for kind in entry["prompts"]:
            if kind not in present:
                present.append(kind)
    kinds = list(kinds)
    if not kinds:
        return present
    for kind in kinds:
        if kind not in present:
            raise BankError(f"{bank_path}: no prompts of kind '{kind}' "
                            f"(the bank has: {', '.join(present) or 'none'})")
    return kinds


def load_bank(labels: str, bank: str | None, kinds: list[str] = (), use_templates: bool = True,
              context_length: int = CONTEXT_LENGTH) -> PromptBank:
    """Build every class's text variants: templates first (when ``use_templates``),
    then the bank's prompts of ``kinds`` (all kinds when empty), in that kind order.

    ``bank=None`` gives templates only. The bank must list exactly the label file's
    classes in order; every text must fit ``context_length`` CLIP tokens untruncated.
    """
    names = load_labels(labels)
    if bank is None and not use_templates:
        raise BankError("no texts: bank is None and use_templates is False")
    data = None
    chosen: list[str] = []
    if bank is not None:
        data = read_bank_file(bank)
        check_bank_classes(bank, data, labels, names)
        chosen = _select_kinds(bank, data, kinds)
    elif kinds:
        raise BankError(f"kinds {list(kinds)} given but no bank")

    texts: list[list[str]] = []
    for c, name in enumerate(names):
        variants = [t.format(readable_name(name)) for t in TEMPLATES] if use_templates else []
        if data is not None:
            prompts = data["classes"][c]["prompts"]
            for kind in chosen:
                for j, t in enumerate(prompts.get(kind, [])):
                    t = " ".join(t.split())
                    n = count_tokens(t)
                    if n > context_length:
                        raise BankError(f"{bank}: classes[{c}].prompts.{kind}[{j}] has {n} CLIP "
                                        f"tokens, more than {context_length}")
                    variants.append(t)
        # A bank text equal to a template (or to another kind's text) would only
        # re-weight that text in the evaluation average.
        variants = list(dict.fromkeys(variants))
        if not variants:
            raise BankError(f"{bank}: class {c} ({name!r}) has no prompts of kinds {chosen}")
        texts.append(variants)
    return PromptBank(class_names=names, texts=texts)
