"""Reading dataset annotations: label lists and the input layouts make_shards and make_fewshot accept.

Every layout becomes a list of ``Entry`` (a path under the video root and a label id of the
project's label list), read by the same code for shards, few-shot lists and zero-shot test
sets. Formats (``FORMATS``), detected by ``detect_format`` from the file's name and shape, or
named explicitly:

- ``list`` (X-CLIP / mmaction): lines ``relative/path.ext label_id``, 0-based ids of the
  labels CSV (``one_based=True`` for a list counted from 1). A list whose labels look
  1-based (no 0, and the class count C present) is refused: UCF-101's own split files are
  1-based, and reading them as 0-based trains every class under its neighbour's name;
- ``ucf101``: ``trainlistNN.txt`` (``Class/v_Class_gGG_cCC.avi id``, ids 1-based as in
  ``classInd.txt``, found beside the list) and ``testlistNN.txt`` (no ids: the class is
  the folder);
- ``hmdb51``: the folder ``testTrainMulti_7030_splits`` of per-class files
  ``<class>_test_split<N>.txt`` (lines ``<video>.avi <tag>``: 1 train, 2 test, 0 unused),
  with ``split_id`` N and ``subset`` train/test; videos are ``<class>/<video>.avi``;
- ``ssv2``: Something-Something v2's ``something-something-v2-{train,validation}.json``
  (entries ``{"id", "label", "template", "placeholders"}``) and its class index
  ``labels.json`` (or ``something-something-v2-labels.json``) beside it; an entry's class
  is its template without square brackets, as the official preprocessing reads it; videos
  are ``<id>.webm``;
- ``kinetics``: the Kinetics-400/600/700 CSVs (``label,youtube_id,time_start,time_end,split``
  and extra columns such as ``is_cc``); the video is found as
  ``{youtube_id}_{start:06d}_{end:06d}.*`` under ``root``, ``root/{label}``,
  ``root/{split}`` or ``root/{split}/{label}``; rows are filtered by ``split``;
- ``tree``: a folder per class, ``ANNOTATIONS/{class name}/**/*.mp4`` (classes sorted by
  name unless a labels CSV maps them);
- ``captions``: video-text pairs, no classes: a CSV with a header naming a ``path`` (or
  ``video``) column and a ``caption`` column, or JSON lines ``{"path": ..., "caption": ...}``
  (or ``"captions": [...]``); a video may have any number of rows or captions, all kept in
  order of appearance;
- ``webvid``: WebVid's CSVs (columns ``videoid``, ``name`` = the caption, ``page_dir``); the
  video is ``{page_dir}/{videoid}.*`` or ``{videoid}.*`` under ``root``.

Files are read as the official zips ship them: CRLF line ends and a UTF-8 byte-order mark
are accepted. Class names are matched to the labels CSV by ``normalise_name`` (case, ``_``
and spacing ignored); a name that matches no class or several is an error naming the file
and line. Exceptions: Kinetics rows of classes outside the labels CSV are rejected, not
refused, so that one official CSV serves a label subset (Kinetics-600's 220 new classes).

Labels are a CSV ``id,name`` (a header row is optional), ids 0..C-1. Captioned inputs carry
``label`` -1 and their captions; an input whose captions are all empty is rejected ("no
caption"), named by its path.

Inputs that cannot be used before any decoding (missing file, unknown class in a list or a
Kinetics CSV) come back as rejections with a reason, like the ones the shard builder finds
while decoding.
"""

from __future__ import annotations

import csv
import json
import posixpath
import re
from dataclasses import dataclass, replace
from pathlib import Path

from claver_dist.data.shards import VIDEO_EXTS

FORMATS = ("list", "tree", "kinetics", "ucf101", "hmdb51", "ssv2", "captions", "webvid")
CAPTION_FORMATS = ("captions", "webvid")  # video-text pairs: no classes, label -1

_UCF_LIST = re.compile(r"(train|test)list\d+\.txt", re.IGNORECASE)
_HMDB_FILE = re.compile(r"(.+)_test_split(\d+)\.txt")
_SSV2_INDEX_NAMES = ("labels.json", "something-something-v2-labels.json")
_HMDB_TAGS = {"train": "1", "test": "2"}


@dataclass
class Input:
    path: Path  # absolute file
    rel: str  # as named by the annotation (stored as the sample's source)
    label: int  # -1 for a captioned input
    captions: tuple[str, ...] = ()


@dataclass
class Rejected:
    source: str
    reason: str


@dataclass
class Entry:
    """One annotated video before its file is looked up."""

    rel: str  # the video under the root, as the annotation names it (Kinetics: the file stem)
    label: int  # id in the project's label list
    where: str  # "file:line" (or "file: entry N") for messages
    candidates: tuple[str, ...] = ()  # relative paths to try in order; () -> (rel,)
    captions: tuple[str, ...] = ()  # captioned formats (label -1)


@dataclass
class Options:
    """What a format needs besides the file; each field applies to the formats named."""

    fmt: str = "auto"  # one of FORMATS, or "auto" (detect_format)
    split: str = "train"  # kinetics: the rows' split column
    split_id: int | None = None  # hmdb51: N of *_test_splitN.txt
    subset: str | None = None  # hmdb51: "train" (tag 1) or "test" (tag 2)
    one_based: bool = False  # list: ids count from 1
    class_index: str | Path | None = None  # ucf101: classInd.txt; ssv2: labels.json (default: beside the file)


def normalise_name(name: str) -> str:
    return " ".join(name.strip().strip('"').replace("_", " ").lower().split())


def read_lines(path: Path) -> list[str]:
    """Lines of a text annotation file; utf-8-sig drops the byte-order mark of Windows tools."""
    try:
        return path.read_text(encoding="utf-8-sig").splitlines()
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e})") from None


def read_labels(path: str | Path) -> list[str]:
    """``id,name`` CSV -> names indexed by id; ids must be exactly 0..C-1."""
    rows = [r for r in csv.reader(read_lines(Path(path))) if r and any(c.strip() for c in r)]
    if rows and not rows[0][0].strip().lstrip("-").isdigit():
        rows = rows[1:]  # header
    names: dict[int, str] = {}
    for n, r in enumerate(rows, 1):
        if len(r) < 2:
            raise ValueError(f"{path}: row {n} {r!r} is not 'id,name'")
        i = int(r[0])
        if i in names:
            raise ValueError(f"{path}: id {i} appears twice")
        names[i] = ",".join(r[1:]).strip()
    if sorted(names) != list(range(len(names))):
        raise ValueError(f"{path}: ids must be 0..{len(names) - 1} without gaps")
    return [names[i] for i in range(len(names))]


class _ClassIndex:
    """Class name -> id of the labels CSV, by ``normalise_name``; several ids is an error, not a pick."""

    def __init__(self, labels: list[str]):
        self.ids: dict[str, list[int]] = {}
        for i, name in enumerate(labels):
            self.ids.setdefault(normalise_name(name), []).append(i)
        self.labels = labels

    def get(self, name: str, where: str) -> int | None:
        ids = self.ids.get(normalise_name(name), [])
        if len(ids) > 1:
            raise ValueError(
                f"{where}: class {name!r} matches several classes of the labels CSV "
                f"({', '.join(f'{i} {self.labels[i]!r}' for i in ids)}); rename one of them"
            )
        return ids[0] if ids else None

    def require(self, name: str, where: str) -> int:
        i = self.get(name, where)
        if i is None:
            raise ValueError(f"{where}: class {name!r} is not in the labels CSV ({len(self.labels)} classes)")
        return i


# --------------------------------------------------------------------------- detection


def detect_format(annotations: str | Path) -> str:
    """The format of an annotation file or folder, from its name first and then its content."""
    p = Path(annotations)
    if p.is_dir():
        return "hmdb51" if any(_HMDB_FILE.fullmatch(f.name) for f in p.iterdir() if f.is_file()) else "tree"
    if _HMDB_FILE.fullmatch(p.name):
        return "hmdb51"
    if _UCF_LIST.fullmatch(p.name):
        return "ucf101"
    if p.suffix.lower() == ".json":
        return "ssv2"
    if p.suffix.lower() == ".jsonl":
        return "captions"
    lines = [line.strip() for line in read_lines(p) if line.strip() and not line.lstrip().startswith("#")]
    if not lines:
        return "list"
    header = {c.strip().strip('"').lower() for c in lines[0].split(",")}
    if {"youtube_id", "time_start", "time_end"} <= header:
        return "kinetics"
    if {"videoid", "name", "page_dir"} <= header:
        return "webvid"
    if "caption" in header and header & {"path", "video"}:
        return "captions"
    # paths without labels: UCF-101's test lists, where the folder is the class
    if all(len(line.split()) == 1 and "/" in line for line in lines[:100]):
        return "ucf101"
    return "list"


# --------------------------------------------------------------------------- reading


def read_entries(
    annotations: str | Path, labels: list[str] | None, options: Options | None = None
) -> tuple[list[Entry], list[Rejected], list[str] | None, str]:
    """``(entries, rejected, class names, format)``; no video file is looked at (``tree`` aside).

    Class names are ``labels`` (a tree without labels: its folder names; a list without
    labels: None, its ids kept as written; captioned formats: ``[]``, every label -1).
    """
    opt = options or Options()
    path = Path(annotations)
    if not path.exists():
        raise ValueError(f"{path}: no such annotation file or folder")
    fmt = detect_format(path) if opt.fmt == "auto" else opt.fmt
    if fmt not in FORMATS:
        raise ValueError(f"unknown annotation format {fmt!r} (one of {', '.join(FORMATS)})")
    _check_options(path, fmt, opt)
    if fmt == "tree":
        if not path.is_dir():
            raise ValueError(f"{path}: the tree format needs a folder with one sub-folder per class")
        entries, rejected, labels = _tree_entries(path, labels)
        return entries, rejected, labels, fmt
    if fmt != "hmdb51" and path.is_dir():
        raise ValueError(f"{path}: a folder, but the {fmt} format reads a file")
    if fmt in CAPTION_FORMATS:
        if labels:
            raise ValueError(f"{path}: {fmt} annotations pair videos with captions and have no classes; "
                             "drop --labels")
        entries, rejected = _caption_entries(path) if fmt == "captions" else _webvid_entries(path)
        return entries, rejected, [], fmt
    if fmt == "list":
        # without a labels CSV the ids are kept as written (few-shot lists of a list file)
        entries, rejected = _list_entries(path, len(labels) if labels else None, opt.one_based)
        return entries, rejected, labels, fmt
    if labels is None:
        raise ValueError(f"{path}: a labels CSV (--labels) is needed for the {fmt} format")
    index = _ClassIndex(labels)
    rejected: list[Rejected] = []
    if fmt == "ucf101":
        entries = _ucf101_entries(path, index, opt.class_index)
    elif fmt == "hmdb51":
        entries = _hmdb51_entries(path, index, opt.split_id, opt.subset)
    elif fmt == "ssv2":
        entries = _ssv2_entries(path, index, opt.class_index)
    else:
        entries, rejected = _kinetics_entries(path, index, opt.split)
    return entries, rejected, labels, fmt


def resolve(entries: list[Entry], root: Path) -> tuple[list[Input], list[Rejected]]:
    """Look every entry's video up under ``root``; a missing file is a rejection."""
    inputs, rejected = [], []
    for e in entries:
        found = next((c for c in e.candidates or (e.rel,) if (root / c).is_file()), None)
        if found is None:
            rejected.append(Rejected(e.rel, f"file not found under {root}"))
        else:
            inputs.append(Input(root / found, found, e.label, e.captions))
    return inputs, rejected


def default_root(annotations: str | Path, fmt: str) -> Path:
    """Videos sit beside the annotation file by default (a tree holds its own videos)."""
    p = Path(annotations)
    return p if fmt == "tree" else p.parent


def read_inputs(
    annotations: str | Path,
    root: str | Path | None,
    labels: list[str] | None,
    split: str,
    options: Options | None = None,
) -> tuple[list[Input], list[Rejected], list[str]]:
    """``(inputs, rejected, class names)`` for any supported layout, files looked up under ``root``."""
    entries, rejected, classes, fmt = read_entries(annotations, labels, replace(options or Options(), split=split))
    if classes is None:
        raise ValueError(f"{annotations}: a labels CSV (--labels) is needed for the {fmt} format")
    base = default_root(annotations, fmt) if fmt == "tree" or not root else Path(root)
    inputs, missing = resolve(entries, base)
    return inputs, rejected + missing, classes


def _check_options(path: Path, fmt: str, opt: Options) -> None:
    # an option that a format ignores would be a silent guess about what the user meant
    unused = [
        name for name, given, used_by in (
            ("--one-based", opt.one_based, ("list",)),
            ("--split-id", opt.split_id is not None, ("hmdb51",)),
            ("--subset", opt.subset is not None, ("hmdb51",)),
            ("--class-index", opt.class_index is not None, ("ucf101", "ssv2")),
        ) if given and fmt not in used_by
    ]  # fmt: skip
    if unused:
        raise ValueError(f"{path}: {', '.join(unused)} does not apply to the {fmt} format")


def _list_entries(path: Path, num_classes: int | None, one_based: bool) -> tuple[list[Entry], list[Rejected]]:
    parsed = []
    for n, line in enumerate(read_lines(path), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        parts = line.strip().rsplit(maxsplit=1)
        if len(parts) != 2 or not parts[1].lstrip("-").isdigit():
            raise ValueError(f"{path}:{n}: expected 'relative/path.ext label_id', got {line.strip()!r}")
        parsed.append((parts[0], int(parts[1]), n))
    labels = {label for _, label, _ in parsed}
    if one_based:
        if 0 in labels:
            n = next(n for _, label, n in parsed if label == 0)
            raise ValueError(f"{path}:{n}: label 0 in a list read with --one-based")
        parsed = [(rel, label - 1, n) for rel, label, n in parsed]
    elif num_classes and 0 not in labels and num_classes in labels:
        n = next(n for _, label, n in parsed if label == num_classes)
        raise ValueError(
            f"{path}:{n}: labels look 1-based (no label 0, and label {num_classes} of {num_classes} classes, "
            f"ids 0..{num_classes - 1}); "
            "for a UCF-101 split file use --format ucf101 (classInd.txt beside it), for another 1-based list "
            "--one-based"
        )
    entries, rejected = [], []
    for rel, label, n in parsed:
        if num_classes is not None and not 0 <= label < num_classes:
            rejected.append(Rejected(rel, f"label {label} not in labels (0..{num_classes - 1})"))
        else:
            entries.append(Entry(rel, label, f"{path}:{n}"))
    return entries, rejected


def _beside(path: Path, given: str | Path | None, names: tuple[str, ...], what: str) -> Path | None:
    if given is not None:
        if not Path(given).is_file():
            raise ValueError(f"{given}: {what} not found (--class-index)")
        return Path(given)
    # matched without case: the zips were made on Windows, where classInd.txt and ClassInd.txt are one file
    by_name = {f.name.lower(): f for f in path.parent.iterdir() if f.is_file()}
    return next((by_name[n.lower()] for n in names if n.lower() in by_name), None)


def _ucf101_entries(path: Path, index: _ClassIndex, class_index: str | Path | None) -> list[Entry]:
    ind = _beside(path, class_index, ("classInd.txt",), "class index")
    # classInd.txt: "1 ApplyEyeMakeup", 1-based, the order of labels/ucf101.csv
    classes: dict[int, tuple[str, int]] = {}  # official id -> (name, project id)
    if ind is not None:
        for n, line in enumerate(read_lines(ind), 1):
            if not line.strip():
                continue
            parts = line.split()
            if len(parts) != 2 or not parts[0].isdigit():
                raise ValueError(f"{ind}:{n}: expected 'id ClassName', got {line.strip()!r}")
            if int(parts[0]) in classes:
                raise ValueError(f"{ind}:{n}: id {parts[0]} appears twice")
            classes[int(parts[0])] = (parts[1], index.require(parts[1], f"{ind}:{n}"))
    by_folder = {normalise_name(name): label for name, label in classes.values()}
    entries = []
    for n, line in enumerate(read_lines(path), 1):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        parts = line.strip().rsplit(maxsplit=1)
        labelled = len(parts) == 2 and parts[1].isdigit()
        rel = parts[0] if labelled else line.strip()
        folder = posixpath.dirname(rel).split("/")[0]
        if not folder:
            raise ValueError(f"{where}: expected 'ClassName/video.avi [class id]', got {line.strip()!r}")
        if labelled:
            if ind is None:
                raise ValueError(f"{where}: a class id needs classInd.txt beside {path.name} (or --class-index)")
            cid = int(parts[1])
            if cid not in classes:
                raise ValueError(f"{where}: class id {cid} is not in {ind} (ids 1..{len(classes)})")
            name, label = classes[cid]
            if normalise_name(folder) != normalise_name(name):
                raise ValueError(f"{where}: class id {cid} is {name!r} in {ind}, but the video is in folder {folder!r}")
        elif ind is not None:
            label = by_folder.get(normalise_name(folder))
            if label is None:
                raise ValueError(f"{where}: class folder {folder!r} is not in {ind}")
        else:
            label = index.require(folder, where)
        entries.append(Entry(rel, label, where))
    return entries


def _hmdb51_entries(path: Path, index: _ClassIndex, split_id: int | None, subset: str | None) -> list[Entry]:
    if subset not in _HMDB_TAGS:
        raise ValueError(f"{path}: hmdb51 needs --subset train or test (tags 1 and 2 of the split files)")
    if path.is_dir():
        files = {f: m for f in sorted(path.iterdir()) if (m := _HMDB_FILE.fullmatch(f.name))}
        ids = sorted({int(m.group(2)) for m in files.values()})
        if split_id is None:
            raise ValueError(f"{path}: hmdb51 needs --split-id (this folder has splits {ids})")
        files = {f: m for f, m in files.items() if int(m.group(2)) == split_id}
        if not files:
            raise ValueError(f"{path}: no *_test_split{split_id}.txt files (this folder has splits {ids})")
    else:
        m = _HMDB_FILE.fullmatch(path.name)
        if m is None:
            raise ValueError(f"{path}: expected a folder of <class>_test_split<N>.txt files or one such file")
        if split_id is not None and split_id != int(m.group(2)):
            raise ValueError(f"{path}: a split {m.group(2)} file, but --split-id {split_id}")
        files = {path: m}
    tag = _HMDB_TAGS[subset]
    entries = []
    for f, m in files.items():
        cls = m.group(1)
        label = index.require(cls, str(f))
        for n, line in enumerate(read_lines(f), 1):
            if not line.strip():
                continue
            # no comment lines: HMDB video names may start with '#' ("#20_Rhythm_clap_...")
            parts = line.strip().rsplit(maxsplit=1)
            if len(parts) != 2 or parts[1] not in ("0", "1", "2"):
                raise ValueError(f"{f}:{n}: expected '<video>.avi <0|1|2>', got {line.strip()!r}")
            if parts[1] == tag:
                entries.append(Entry(f"{cls}/{parts[0]}", label, f"{f}:{n}"))
    return entries


def _ssv2_entries(path: Path, index: _ClassIndex, class_index: str | Path | None) -> list[Entry]:
    data = _read_json(path)
    if isinstance(data, dict):
        raise ValueError(
            f"{path}: a class index (template -> id), not a video list; pass "
            "something-something-v2-train.json or -validation.json (the class index is read from beside it)"
        )
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of {{'id', 'template', ...}} entries")
    ind = _beside(path, class_index, _SSV2_INDEX_NAMES, "class index")
    if ind is None:
        raise ValueError(f"{path}: no {' or '.join(_SSV2_INDEX_NAMES)} beside it (or --class-index)")
    names = _read_json(ind)
    if not isinstance(names, dict) or not all(str(v).strip().isdigit() for v in names.values()):
        raise ValueError(f"{ind}: expected a JSON object {{template: id}}")
    project = {name: index.require(name, f"{ind}: class {int(i)}") for name, i in names.items()}
    others = tuple(f".{ext}" for ext in VIDEO_EXTS if ext != "webm")
    entries = []
    for n, e in enumerate(data, 1):
        if not isinstance(e, dict) or "id" not in e:
            raise ValueError(f"{path}: entry {n}: expected an object with 'id', got {e!r}"[:300])
        where = f"{path}: entry {n} (id {e['id']})"
        if "template" not in e:
            raise ValueError(f"{where}: no template (the test list has no labels to train or score on)")
        # the official preprocessing: the class is the template with its brackets removed
        name = str(e["template"]).replace("[", "").replace("]", "")
        if name not in project:
            raise ValueError(f"{where}: template {e['template']!r} -> {name!r} is not in {ind}")
        vid = str(e["id"]).strip()
        entries.append(Entry(f"{vid}.webm", project[name], where, (f"{vid}.webm", *(vid + x for x in others))))
    return entries


def _read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8-sig"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{e.lineno}: not JSON ({e.msg})") from None


def _kinetics_entries(path: Path, index: _ClassIndex, split: str) -> tuple[list[Entry], list[Rejected]]:
    reader = csv.DictReader(read_lines(path))
    reader.fieldnames = [c.strip() for c in reader.fieldnames or []]
    if "label" not in reader.fieldnames:
        raise ValueError(f"{path}:1: no 'label' column (a test list without labels cannot be used)")
    rows = [(n, r) for n, r in enumerate(reader, 2)]
    splits = {r.get("split", "") for _, r in rows}
    if split in splits:
        rows = [(n, r) for n, r in rows if r.get("split", "") == split]
    elif len(splits) > 1:
        raise ValueError(f"{path}: no rows with split {split!r} (has {sorted(splits)})")
    entries, rejected = [], []
    for n, r in rows:
        where = f"{path}:{n}"
        try:
            stem = f"{r['youtube_id']}_{int(float(r['time_start'])):06d}_{int(float(r['time_end'])):06d}"
        except (TypeError, ValueError):
            raise ValueError(f"{where}: expected youtube_id, time_start, time_end, got {r!r}") from None
        label = index.get(r["label"], where)
        if label is None:
            # a class outside the labels CSV: left out, so that one CSV serves a label subset
            rejected.append(Rejected(stem, f"class {r['label']!r} not in labels"))
            continue
        folders = ("", r["label"], r.get("split", ""), posixpath.join(r.get("split", ""), r["label"]))
        candidates = tuple(posixpath.join(d, f"{stem}.{ext}") for d in folders for ext in VIDEO_EXTS)
        entries.append(Entry(stem, label, where, candidates))
    return entries, rejected


def _grouped(rows: list[tuple[str, list[str], str, tuple[str, ...]]]) -> tuple[list[Entry], list[Rejected]]:
    """Captioned entries, one per video in order of first appearance, every caption kept."""
    by_rel: dict[str, Entry] = {}
    for rel, captions, where, candidates in rows:
        e = by_rel.setdefault(rel, Entry(rel, -1, where, candidates))
        e.captions += tuple(c.strip() for c in captions if c and c.strip())
    entries = [e for e in by_rel.values() if e.captions]
    rejected = [Rejected(e.rel, f"no caption ({e.where})") for e in by_rel.values() if not e.captions]
    return entries, rejected


def _caption_entries(path: Path) -> tuple[list[Entry], list[Rejected]]:
    rows = []
    if path.suffix.lower() == ".jsonl":
        for n, line in enumerate(read_lines(path), 1):
            if not line.strip():
                continue
            where = f"{path}:{n}"
            try:
                r = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: not JSON ({e.msg})") from None
            rel = r.get("path", r.get("video")) if isinstance(r, dict) else None
            caps = r.get("captions", [r["caption"]] if "caption" in r else []) if isinstance(r, dict) else None
            if not isinstance(rel, str) or not rel or not isinstance(caps, list) or \
                    not all(isinstance(c, str) for c in caps):
                raise ValueError(f'{where}: expected {{"path": str, "caption": str}} or '
                                 f'{{"path": str, "captions": [str, ...]}}, got {line.strip()[:200]!r}')
            rows.append((rel, caps, where, ()))
        return _grouped(rows)
    reader = csv.DictReader(read_lines(path))
    reader.fieldnames = [c.strip().lower() for c in reader.fieldnames or []]
    col = "path" if "path" in reader.fieldnames else "video"
    if col not in reader.fieldnames or "caption" not in reader.fieldnames:
        raise ValueError(f"{path}:1: a captions CSV needs a header with 'path' (or 'video') and 'caption' columns, "
                         f"got {reader.fieldnames}")
    for n, r in enumerate(reader, 2):
        rel = (r.get(col) or "").strip()
        if not rel:
            raise ValueError(f"{path}:{n}: no {col}")
        rows.append((rel, [r.get("caption") or ""], f"{path}:{n}", ()))
    return _grouped(rows)


def _webvid_entries(path: Path) -> tuple[list[Entry], list[Rejected]]:
    reader = csv.DictReader(read_lines(path))
    reader.fieldnames = [c.strip() for c in reader.fieldnames or []]
    rows = []
    for n, r in enumerate(reader, 2):
        vid, page = (r.get("videoid") or "").strip(), (r.get("page_dir") or "").strip()
        if not vid:
            raise ValueError(f"{path}:{n}: no videoid")
        rel = posixpath.join(page, vid)
        candidates = tuple(posixpath.join(d, f"{vid}.{ext}") for d in dict.fromkeys((page, "")) for ext in VIDEO_EXTS)
        rows.append((rel, [r.get("name") or ""], f"{path}:{n}", candidates))
    return _grouped(rows)


def _tree_entries(path: Path, labels: list[str] | None) -> tuple[list[Entry], list[Rejected], list[str]]:
    folders = sorted(d for d in path.iterdir() if d.is_dir() and not d.name.startswith("."))
    if labels is None:
        labels = [d.name.replace("_", " ") for d in folders]
    index = _ClassIndex(labels)
    entries, rejected = [], []
    for d in folders:
        files = sorted(f for f in d.rglob("*") if f.is_file() and not f.name.startswith(".") and f.suffix[1:].lower() in VIDEO_EXTS)
        label = index.get(d.name, str(d))
        for f in files:
            rel = str(f.relative_to(path))
            if label is None:
                rejected.append(Rejected(rel, f"class folder {d.name!r} not in labels"))
            else:
                entries.append(Entry(rel, label, rel))
    return entries, rejected, labels
