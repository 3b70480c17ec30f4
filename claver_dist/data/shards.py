"""The shard format: tar files of samples, their index files, the manifest, and reading.

A shard set is a folder written by ``tools/make_shards.py``::

    OUT/manifest.json            classes, per-split shard lists and counts, encode
                                 settings, seed, rejected inputs with reasons, and per
                                 split the compact index that belongs to the shard list
    OUT/{split}-000000.tar       webdataset tar: per sample KEY.mp4 (or .webm, ...),
                                 KEY.cls (label id as text), KEY.json (metadata)
    OUT/{split}-000000.idx       DALI ``wds2idx`` index (v1.2): one line per sample with
                                 ``ext offset size name`` per component
    OUT/{split}.index/           the split's compact index (below): what the loader reads
    OUT/.build/{split}-000000.json   per-shard build record (what made it; resume)

The tars are plain webdataset shards (``webdataset.WebDataset`` and ``tar -t`` read
them; DALI's ``readers.webdataset`` reads them with the index files). The loader reads
any sample by byte offset, which is what gives it exact per-sample shuffling, rank
partitioning and resumption (see ``claver_dist.data.loader``).

Compact index (``OUT/{split}.index/``, format ``claver-index/1``): the ``.idx`` files of
the whole split as flat ``.npy`` arrays that every process memory-maps
(``np.load(mmap_mode="r")``), so the local ranks of a node and their DataLoader workers
share one copy in the page cache instead of each parsing text into Python objects.
Sample ``i`` is the ``i``-th sample in shard order, then in order inside its shard::

    meta.json       format, split, num_samples, shards_sha256, exts, arrays (name -> dtype, shape)
    shard.npy       int32 [N]          shard number (position in the manifest's shard list)
    ext.npy         uint8 [N]          video extension, an index into meta.json's exts ("" = none)
    offset.npy      int32|int64 [N, 3] byte offset of the (video, .json, .cls) member data, -1 if absent
    size.npy        int32|int64 [N, 3] byte size of the same members, -1 if absent
    key_offset.npy  int32|int64 [N+1]  key i is key_blob[key_offset[i]:key_offset[i + 1]]
    key_blob.npy    uint8 [sum of key lengths]  the keys' UTF-8 bytes, back to back
    by_key.npy      int32|int64 [N]    sample ids sorted by key bytes (key lookups by bisection)

Integer arrays are int32 where every value fits, else int64 (the dtype is in each file's
header). The manifest's split entry names it: ``"index": {"format", "path",
"num_samples", "shards_sha256"}``, where ``shards_sha256`` hashes the split's shard list
(tar name, sample count, bytes). Opening checks that the manifest, ``meta.json`` and the
shard list agree and that every tar has its recorded size; a mismatch is an error naming
the file, never a silently wrong sample. Sets without an index (older builds, brace
patterns) are read from their ``.idx`` files as before;
``python tools/make_shards.py --reindex OUT`` adds the index to an existing set.

Sample metadata (``KEY.json``): ``frames`` (decoded frame count, exact), ``fps``,
``width``, ``height``, ``duration``, ``codec``, ``cfr``, ``keyint``, ``bytes`` and
``crc32`` of the video component (checked at load time, so corruption after the build
is caught before a decoder sees it), ``label``, ``class_name``, ``source``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import operator
import os
import re
import shutil
import stat
import tarfile
import zlib
from array import array
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, overload

import numpy as np

from claver_dist.errors import SampleError, ShardError

logger = logging.getLogger("claver_dist.data")

MANIFEST = "manifest.json"
FORMAT = "claver-shards/1"
INDEX_VERSION = "v1.2"
VIDEO_EXTS = ("mp4", "webm", "mkv", "avi", "mov", "m4v", "ogv", "mpg", "mpeg", "flv", "3gp", "ts", "gif")
META_EXTS = ("json", "cls")


def sample_key(relative_path: str, max_len: int = 96) -> str:
    """A webdataset-safe, human-readable key from a source path.

    webdataset and DALI split a member name at its first dot, so keys must not contain
    dots; slashes would create tar folders. ``a/b.c/x.y.mp4`` -> ``a__b_c__x_y``.
    """
    stem = relative_path
    for ext in VIDEO_EXTS:
        if stem.lower().endswith("." + ext):
            stem = stem[: -len(ext) - 1]
            break
    key = "__".join(re.sub(r"[^A-Za-z0-9_-]+", "_", part) for part in Path(stem).parts if part not in ("", "/"))
    return key[-max_len:] or "sample"


# --------------------------------------------------------------------------- writing


def write_index(tar_path: Path, idx_path: Path) -> int:
    """Write the DALI index (same format as the ``wds2idx`` tool) for ``tar_path``.

    Returns the number of samples. Components of one sample are consecutive members
    sharing the part of the name before the first dot.
    """
    samples: list[list[tuple[str, int, int, str]]] = []
    last = None
    with tarfile.open(tar_path) as tf:
        for m in tf:
            if not m.isreg():
                continue
            base = m.name[m.name.rfind("/") + 1 :]
            dot = m.name.find(".", m.name.rfind("/") + 1)
            if dot < 0 or base.startswith("."):
                continue
            stem, ext = m.name[:dot], m.name[dot + 1 :]
            if stem != last:
                samples.append([])
                last = stem
            samples[-1].append((ext, m.offset_data, m.size, m.name))
    if not samples:
        raise ShardError(f"{tar_path}: no samples")
    tmp = idx_path.with_suffix(".idx.tmp")
    with open(tmp, "w") as f:
        f.write(f"{INDEX_VERSION} {len(samples)}\n")
        for comps in samples:
            f.write(" ".join(f"{e} {o} {s} {n}" for e, o, s, n in comps) + "\n")
    os.replace(tmp, idx_path)
    return len(samples)


class ShardWriter:
    """Writes one tar shard atomically (``.tmp`` then rename) and its index file."""

    def __init__(self, tar_path: Path):
        self.tar_path = Path(tar_path)
        self.tmp = self.tar_path.with_suffix(".tar.tmp")
        self._tf = tarfile.open(self.tmp, "w", format=tarfile.USTAR_FORMAT)
        self.count = 0
        self.bytes = 0

    def add(self, key: str, components: dict[str, bytes]) -> None:
        for ext, data in components.items():
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size = len(data)
            info.mtime = 0  # reproducible tars
            info.mode = 0o644
            self._tf.addfile(info, io.BytesIO(data))
            self.bytes += len(data) + 512
        self.count += 1

    def close(self) -> int:
        self._tf.close()
        os.replace(self.tmp, self.tar_path)
        return write_index(self.tar_path, self.tar_path.with_suffix(".idx"))

    def abort(self) -> None:
        self._tf.close()
        self.tmp.unlink(missing_ok=True)


# --------------------------------------------------------------------------- reading


def read_index(idx_path: Path) -> list[tuple[str, list[tuple[str, int, int]]]]:
    """Parse a ``wds2idx`` index: ``[(key, [(ext, offset, size), ...]), ...]``."""
    try:
        lines = Path(idx_path).read_text().splitlines()
    except OSError as e:
        raise ShardError(f"{idx_path}: cannot read index ({e}); rebuild with tools/make_shards.py") from e
    if not lines or not lines[0].startswith("v1."):
        raise ShardError(f"{idx_path}: not a wds2idx index file")
    out = []
    for n, line in enumerate(lines[1:], 2):
        parts = line.split()
        if len(parts) % 4 or not parts:
            raise ShardError(f"{idx_path}:{n}: malformed index line")
        comps, key = [], None
        for i in range(0, len(parts), 4):
            ext, off, size, name = parts[i : i + 4]
            comps.append((ext, int(off), int(size)))
            key = name[: name.find(".", name.rfind("/") + 1)]
        out.append((key, comps))
    return out


def load_manifest(folder: str | Path) -> dict[str, Any]:
    path = Path(folder) / MANIFEST
    try:
        m = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ShardError(f"{path}: cannot read shard manifest ({e})") from e
    if m.get("format") != FORMAT:
        raise ShardError(f"{path}: unknown format {m.get('format')!r} (expected {FORMAT!r})")
    return m


def resolve_shards(spec: str, split: str) -> tuple[list[Path], dict[str, Any] | None]:
    """Tar paths for ``split`` from a shard folder (manifest) or a brace/glob pattern."""
    if not spec:
        raise ShardError(f"no shards configured for split {split!r} (set data.train_shards / data.val_shards)")
    p = Path(spec)
    if p.is_dir():
        m = load_manifest(p)
        splits = m.get("splits", {})
        if split not in splits:
            raise ShardError(f"{p / MANIFEST}: no split {split!r} (has {sorted(splits)})")
        return [p / s["tar"] for s in splits[split]["shards"]], m
    import glob

    import braceexpand

    paths: list[Path] = []
    for pat in braceexpand.braceexpand(spec):
        hits = sorted(glob.glob(pat)) if any(c in pat for c in "*?[") else [pat]
        paths += [Path(h) for h in hits]
    missing = [str(x) for x in paths if not x.is_file()]
    if not paths or missing:
        raise ShardError(f"shard pattern {spec!r}: missing files {missing[:5] or '(none matched)'}")
    return paths, None


# --------------------------------------------------------------------------- compact index

INDEX_FORMAT = "claver-index/1"
INDEX_ARRAYS = ("shard", "ext", "offset", "size", "key_offset", "key_blob", "by_key")
_NO_COMPONENT = (-1, -1)
_told_to_reindex: set[str] = set()  # shard folders already told that an index would help (log once)


def index_dir(folder: str | Path, split: str) -> Path:
    return Path(folder) / f"{split}.index"


def shards_digest(shard_entries: list[dict[str, Any]]) -> str:
    """sha256 of a split's shard list (tar name, samples, bytes), as the manifest holds it.

    An index built for another list (a rebuilt, added or removed shard) no longer matches."""
    h = hashlib.sha256()
    for s in shard_entries:
        h.update(f"{s['tar']}\t{int(s['samples'])}\t{int(s['bytes'])}\n".encode())
    return h.hexdigest()


def _fit_int(values: np.ndarray | int) -> np.ndarray | type:
    """int32 when every value fits (half the bytes of int64), else int64."""
    hi = int(np.max(values)) if np.size(values) else 0
    return np.int32 if hi < 2**31 else np.int64


@dataclasses.dataclass
class IndexArrays:
    """A split's samples as flat arrays (the compact index's layout; see the module docstring)."""

    shard: np.ndarray
    ext: np.ndarray
    offset: np.ndarray
    size: np.ndarray
    key_offset: np.ndarray
    key_blob: np.ndarray
    exts: list[str]
    by_key: np.ndarray | None = None  # computed on first use when the arrays come from .idx files

    @classmethod
    def from_columns(cls, shard: Any, ext: Any, offset: Any, size: Any, keys: list[bytes], exts: list[str],
                     sort_keys: bool = False) -> IndexArrays:  # fmt: skip
        lengths = np.fromiter((len(k) for k in keys), np.int64, len(keys))
        key_offset = np.zeros(len(keys) + 1, np.int64)
        np.cumsum(lengths, out=key_offset[1:])
        offset = np.asarray(offset, np.int64).reshape(-1, 3)
        size = np.asarray(size, np.int64).reshape(-1, 3)
        a = cls(
            shard=np.asarray(shard, np.int32),
            ext=np.asarray(ext, np.uint8),
            offset=offset.astype(_fit_int(offset)),
            size=size.astype(_fit_int(size)),
            key_offset=key_offset.astype(_fit_int(key_offset[-1])),
            key_blob=np.frombuffer(b"".join(keys), np.uint8),
            exts=list(exts),
        )
        if sort_keys:
            a.by_key = key_order(keys)
        return a

    def __len__(self) -> int:
        return len(self.shard)


def key_order(keys: list[bytes]) -> np.ndarray:
    """Sample ids sorted by key bytes (ties by id); numpy's ``S`` order is Python's bytes order
    for keys without NUL bytes, which the bisection in ``ShardSet.ids_of`` relies on."""
    if not keys:
        return np.zeros(0, np.int32)
    width = max(1, max(len(k) for k in keys))
    order = np.argsort(np.array(keys, dtype=f"S{width}"), kind="stable")
    return order.astype(_fit_int(len(keys)))


def parse_idx_files(tars: list[Path]) -> tuple[IndexArrays, list[bytes]]:
    """The arrays of a split from its shards' ``.idx`` files (and the keys as a list)."""
    shard, ext_of, offset, size = array("i"), array("B"), array("q"), array("q")
    keys: list[bytes] = []
    exts: list[str] = []
    ext_id: dict[str, int] = {}
    video_exts = frozenset(VIDEO_EXTS)
    for si, tar in enumerate(tars):
        idx = tar.with_suffix(".idx")
        if not idx.is_file():
            raise ShardError(f"{tar}: index file {idx.name} missing (make it with: python -m wds2idx {tar} {idx})")
        try:
            lines = idx.read_text().splitlines()
        except OSError as e:
            raise ShardError(f"{idx}: cannot read index ({e}); rebuild with tools/make_shards.py") from e
        if not lines or not lines[0].startswith("v1."):
            raise ShardError(f"{idx}: not a wds2idx index file")
        for n, line in enumerate(lines[1:], 2):
            parts = line.split()
            if len(parts) % 4 or not parts:
                raise ShardError(f"{idx}:{n}: malformed index line")
            row = [-1, -1, -1, -1, -1, -1]  # (offset, size) of video, json, cls
            ext = ""
            try:
                for i in range(0, len(parts), 4):
                    e = parts[i].lower()
                    if e in video_exts and row[0] < 0:
                        row[0], row[1], ext = int(parts[i + 1]), int(parts[i + 2]), e
                    elif e == "json":
                        row[2], row[3] = int(parts[i + 1]), int(parts[i + 2])
                    elif e == "cls":
                        row[4], row[5] = int(parts[i + 1]), int(parts[i + 2])
            except ValueError as e:
                raise ShardError(f"{idx}:{n}: malformed index line ({e})") from e
            name = parts[-1]
            keys.append(name[: name.find(".", name.rfind("/") + 1)].encode())
            if ext not in ext_id:
                ext_id[ext] = len(exts)
                exts.append(ext)
            shard.append(si)
            ext_of.append(ext_id[ext])
            offset.extend(row[0::2])
            size.extend(row[1::2])
    if not keys:
        raise ShardError(f"no samples in {[str(t) for t in tars]}")
    return IndexArrays.from_columns(shard, ext_of, offset, size, keys, exts), keys


def write_split_index(folder: str | Path, split: str, shard_entries: list[dict[str, Any]],
                      arrays: IndexArrays | None = None) -> dict[str, Any]:  # fmt: skip
    """Write ``folder/{split}.index/`` for the shard list ``shard_entries`` (the manifest's
    ``splits[split]["shards"]``) and return the manifest's ``index`` entry for it.

    ``arrays`` default: parsed from the shards' ``.idx`` files, whose sample counts must
    match the list. The folder is replaced as a whole (written beside it, then renamed), so
    a reader sees the old index or the new one, and the manifest decides which is valid."""
    folder = Path(folder)
    tars = [folder / s["tar"] for s in shard_entries]
    keys: list[bytes] | None = None
    if arrays is None:
        arrays, keys = parse_idx_files(tars)
    counts = np.bincount(arrays.shard, minlength=len(tars)) if len(arrays) else np.zeros(len(tars), np.int64)
    for tar, s, c in zip(tars, shard_entries, counts.tolist()):
        if c != int(s["samples"]):
            raise ShardError(f"{tar.with_suffix('.idx')}: {c} samples, the manifest lists {s['samples']}; "
                             "rebuild the split with tools/make_shards.py")  # fmt: skip
    if arrays.by_key is None:
        arrays.by_key = key_order(keys if keys is not None else list(Keys(arrays.key_blob, arrays.key_offset).raw_iter()))
    digest = shards_digest(shard_entries)
    final = index_dir(folder, split)
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    shapes = {}
    for name in INDEX_ARRAYS:
        a = getattr(arrays, name)
        np.save(tmp / f"{name}.npy", a)
        shapes[name] = [str(a.dtype), list(a.shape)]
    meta = {"format": INDEX_FORMAT, "split": split, "num_samples": len(arrays), "shards_sha256": digest,
            "exts": arrays.exts, "arrays": shapes}  # fmt: skip
    (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
    old = final.with_name(final.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)
    return {"format": INDEX_FORMAT, "path": final.name, "num_samples": len(arrays), "shards_sha256": digest}


def _stale(path: Path, why: str, folder: Path) -> ShardError:
    return ShardError(f"{path}: stale compact index ({why}); rebuild it with "
                      f"python tools/make_shards.py --reindex {folder}")  # fmt: skip


def open_split_index(folder: Path, split: str, entry: dict[str, Any], shard_entries: list[dict[str, Any]],
                     tar_sizes: list[int]) -> tuple[IndexArrays, Path]:  # fmt: skip
    """Memory-map the compact index the manifest names, after checking that it belongs to
    this shard list (see the module docstring)."""
    manifest = folder / MANIFEST
    path = folder / str(entry.get("path", f"{split}.index"))
    if entry.get("format") != INDEX_FORMAT:
        raise ShardError(f"{manifest}: split {split!r} names an index of unknown format {entry.get('format')!r} "
                         f"(expected {INDEX_FORMAT!r}); rebuild it with python tools/make_shards.py --reindex {folder}")
    digest = shards_digest(shard_entries)
    if entry.get("shards_sha256") != digest:
        raise _stale(path, f"the manifest's shard list of split {split!r} changed after the index was written", folder)
    try:
        meta = json.loads((path / "meta.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise _stale(path / "meta.json", f"cannot read it: {e}", folder) from e
    if meta.get("format") != INDEX_FORMAT or meta.get("shards_sha256") != digest or meta.get("split") != split:
        raise _stale(path / "meta.json", f"written for another shard list or split than {manifest} lists", folder)
    total = sum(int(s["samples"]) for s in shard_entries)
    if not int(meta["num_samples"]) == int(entry.get("num_samples", -1)) == total:
        raise _stale(path, f"{meta['num_samples']} samples, the manifest lists {total}", folder)
    for s, size in zip(shard_entries, tar_sizes):
        if size != int(s["bytes"]):
            raise _stale(path, f"{folder / s['tar']} is {size} bytes, the index was written for {s['bytes']}: "
                               "the shard was rewritten", folder)  # fmt: skip
    arrays = {}
    for name in INDEX_ARRAYS:
        f = path / f"{name}.npy"
        try:
            arrays[name] = np.load(f, mmap_mode="r")
        except (OSError, ValueError) as e:
            raise _stale(f, f"cannot map it: {e}", folder) from e
        want = meta["arrays"].get(name)
        if want is None or [str(arrays[name].dtype), list(arrays[name].shape)] != want:
            raise _stale(f, f"dtype/shape {arrays[name].dtype}{list(arrays[name].shape)}, meta.json says {want}", folder)
    return IndexArrays(**arrays, exts=list(meta["exts"])), path


def _map_index(path: Path) -> IndexArrays:
    """Re-open an index already checked by this process's parent (pickled ShardSet)."""
    meta = json.loads((path / "meta.json").read_text())
    arrays = {name: np.load(path / f"{name}.npy", mmap_mode="r") for name in INDEX_ARRAYS}
    return IndexArrays(**arrays, exts=list(meta["exts"]))


class Keys(Sequence[str]):
    """The sample keys of a split without a Python object per sample: ``len``, ``keys[i]``
    (a str), slicing, iteration and ``==`` behave like a list of str."""

    _CHUNK = 1 << 16

    def __init__(self, blob: np.ndarray, offsets: np.ndarray):
        self._blob, self._off = blob, offsets

    def __len__(self) -> int:
        return len(self._off) - 1

    def raw(self, i: int) -> bytes:
        i = int(i)
        return self._blob[int(self._off[i]) : int(self._off[i + 1])].tobytes()

    @overload
    def __getitem__(self, i: int) -> str: ...
    @overload
    def __getitem__(self, i: slice) -> list[str]: ...

    def __getitem__(self, i: int | slice) -> str | list[str]:
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        n = len(self)
        i = operator.index(i)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"sample id {i} out of range ({n} samples)")
        return self.raw(i).decode()

    def raw_iter(self) -> Iterator[bytes]:
        """Every key's bytes in sample order, reading the blob a chunk at a time."""
        n = len(self)
        for a in range(0, n, self._CHUNK):
            off = self._off[a : min(n, a + self._CHUNK) + 1].tolist()
            buf = self._blob[off[0] : off[-1]].tobytes()
            base = off[0]
            for j in range(len(off) - 1):
                yield buf[off[j] - base : off[j + 1] - base]

    def __iter__(self) -> Iterator[str]:
        return (k.decode() for k in self.raw_iter())

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Sequence) or isinstance(other, (str, bytes)):
            return NotImplemented
        return len(self) == len(other) and all(a == b for a, b in zip(self, other))

    __hash__ = None  # type: ignore[assignment]  # mutable-list semantics: compared by value

    def __repr__(self) -> str:
        return f"Keys({len(self)} keys)"


def _split_of(tars: list[Path], manifest: dict[str, Any]) -> tuple[str, dict[str, Any]] | None:
    """The manifest split whose shard list is exactly ``tars`` (how resolve_shards built them)."""
    # plain strings: pathlib objects cost ~20 us each, seconds over 100k shards
    paths = [os.path.split(str(t)) for t in tars]
    folder = paths[0][0] if paths else ""
    names = [name for _, name in paths]
    for split, entry in manifest.get("splits", {}).items():
        shards = entry.get("shards", [])
        if [s["tar"] for s in shards] == names and all(d == folder for d, _ in paths):
            return split, entry
    return None


class ShardSet:
    """All samples of one split, addressable by a global sample id.

    Sample ids follow the shards' order then the order inside each shard; the loader
    permutes them per epoch. The table is kept in flat arrays: memory-mapped from the
    split's compact index when the manifest names one (shared by every process on the
    node through the page cache; a pickled ShardSet re-maps the files by path), else
    parsed from the ``.idx`` files (a few dozen bytes per sample, copied into DataLoader
    workers). Reading goes by byte offset (``os.pread``); file handles are opened lazily
    per process.
    """

    # component slots in the offset table
    VIDEO, JSON, CLS = 0, 1, 2

    def __init__(self, tars: list[Path], manifest: dict[str, Any] | None = None):
        self.tars = [t if isinstance(t, Path) else Path(t) for t in tars]
        self.manifest = manifest
        sizes, missing = [], []
        for t in self.tars:
            try:
                st = os.stat(t)
                sizes.append(st.st_size)
                if not stat.S_ISREG(st.st_mode):
                    missing.append(t)
            except FileNotFoundError:
                missing.append(t)
        if missing:  # else every sample of it would be skipped one by one, and the run "finish"
            where = "the manifest lists" if manifest is not None else "the pattern names"
            raise ShardError(f"{missing[0]}: shard missing ({where} it; {len(missing)} of {len(self.tars)} "
                             "shards missing): restore it or rebuild the split with tools/make_shards.py")
        self.index_path: Path | None = None  # the compact index in use, None when parsed from .idx
        found = _split_of(self.tars, manifest) if manifest is not None and self.tars else None
        folder = self.tars[0].parent if self.tars else Path()
        if found is not None and found[1].get("index"):
            split, entry = found
            arrays, self.index_path = open_split_index(folder, split, entry["index"], entry["shards"], sizes)
        else:
            if found is not None and str(folder) not in _told_to_reindex:
                _told_to_reindex.add(str(folder))
                logger.warning("data: %s has no compact index: every process parses the .idx files of split %r; "
                               "python tools/make_shards.py --reindex %s writes one (faster start, shared memory)",
                               folder, found[0], folder)  # fmt: skip
            arrays, _ = parse_idx_files(self.tars)
        if len(arrays) == 0:
            raise ShardError(f"no samples in {[str(t) for t in self.tars]}")
        self._set_arrays(arrays)
        self._fds: dict[int, int] = {}
        self._pid = os.getpid()

    def _set_arrays(self, a: IndexArrays) -> None:
        self._arrays = a
        self.keys = Keys(a.key_blob, a.key_offset)
        self.shard_of = a.shard  # [N] shard number of each sample
        self.offsets, self.sizes = a.offset, a.size  # [N, 3 components (video, json, cls)]
        self.ext_of = a.ext
        self.exts = a.exts  # distinct video extensions; ext_of indexes into it

    def __len__(self) -> int:
        return len(self.keys)

    def __getstate__(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["_fds"] = {}
        if self.index_path is not None:  # workers map the same files instead of receiving copies
            for name in ("_arrays", "keys", "shard_of", "offsets", "sizes", "ext_of", "exts"):
                d.pop(name)
        return d

    def __setstate__(self, d: dict[str, Any]) -> None:
        self.__dict__.update(d)
        if self.index_path is not None and "_arrays" not in d:
            self._set_arrays(_map_index(self.index_path))

    def key(self, i: int) -> str:
        return self.keys[i]

    def ids_of(self, keys: Iterable[str]) -> dict[str, int]:
        """Sample ids of the given keys that this split holds (absent keys are left out).

        Bisection over the key-sorted id array: O(log N) per key and no table of all N keys."""
        a = self._arrays
        if a.by_key is None:
            a.by_key = key_order(list(self.keys.raw_iter()))
        order, n, out = a.by_key, len(self), {}
        for k in set(keys):
            kb = k.encode()
            lo, hi = 0, n
            while lo < hi:
                mid = (lo + hi) // 2
                if self.keys.raw(order[mid]) < kb:
                    lo = mid + 1
                else:
                    hi = mid
            if lo < n and self.keys.raw(order[lo]) == kb:
                out[k] = int(order[lo])
        return out

    def where(self, i: int) -> str:
        """``key (shard.tar)``: how logs name a sample."""
        return f"{self.keys[i]} ({self.tars[self.shard_of[i]].name})"

    def component(self, i: int, slot: int) -> tuple[int, int] | None:
        off, size = int(self.offsets[i, slot]), int(self.sizes[i, slot])
        return None if off < 0 else (off, size)

    def _fd(self, shard: int) -> int:
        if self._pid != os.getpid():  # forked: never share handles with the parent
            self._fds, self._pid = {}, os.getpid()
        fd = self._fds.get(shard)
        if fd is None:
            fd = self._fds[shard] = os.open(self.tars[shard], os.O_RDONLY)
        return fd

    def read(self, i: int, slot: int) -> bytes:
        comp = self.component(i, slot)
        if comp is None:
            raise SampleError(f"no {('video', '.json', '.cls')[slot]} component")
        off, size = comp
        data = os.pread(self._fd(int(self.shard_of[i])), size, off)
        if len(data) != size:
            raise SampleError(f"short read ({len(data)} of {size} bytes): shard truncated?")
        return data

    def load(self, i: int, verify: bool = True) -> tuple[bytes, dict[str, Any]]:
        """The video bytes and metadata of sample ``i``; raises SampleError if unusable."""
        read_cls = lambda: self.read(i, self.CLS)  # noqa: E731 - read only when the .json has no label
        meta = check_meta(self.read(i, self.JSON), read_cls)
        data = self.read(i, self.VIDEO)
        check_video(data, meta, verify)
        meta["ext"] = self.exts[self.ext_of[i]]
        return data, meta

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds = {}


def check_meta(meta_bytes: bytes, read_cls) -> dict[str, Any]:
    """A sample's parsed ``.json`` metadata, its label filled from ``read_cls()`` (the ``.cls``
    bytes) when the metadata has none; raises SampleError if it is unusable."""
    try:
        meta = json.loads(meta_bytes)
        frames = int(meta["frames"])
    except (ValueError, KeyError, TypeError) as e:
        raise SampleError(f"bad metadata: {e!r}") from e
    if "captions" in meta:  # a captioned sample: no class
        meta.setdefault("label", -1)
        if not isinstance(meta["captions"], list) or not meta["captions"]:
            raise SampleError(f"bad captions in metadata: {meta['captions']!r}")
    elif "label" not in meta:
        try:
            meta["label"] = int(read_cls())
        except ValueError as e:
            raise SampleError(f"bad .cls: {e}") from e
    if frames < 1:
        raise SampleError(f"metadata says {frames} frames")
    return meta


def check_video(data: bytes, meta: dict[str, Any], verify: bool) -> None:
    """With ``verify``: the video bytes have the size and crc32 the metadata recorded."""
    if verify:
        if "bytes" in meta and len(data) != int(meta["bytes"]):
            raise SampleError(f"video is {len(data)} bytes, metadata says {meta['bytes']}")
        if "crc32" in meta and zlib.crc32(data) != int(meta["crc32"]):
            raise SampleError("video crc32 does not match metadata (corrupted after build)")


def dump_json(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, default=_default).encode()


def _default(o: Any) -> Any:
    if dataclasses.is_dataclass(o):
        return dataclasses.asdict(o)
    if isinstance(o, Path):
        return str(o)
    raise TypeError(type(o))
