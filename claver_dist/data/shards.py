"""The shard format: tar files of samples, their index files, the manifest, and reading.

A shard set is a folder written by ``tools/make_shards.py``::

    OUT/manifest.json            classes, per-split shard lists and counts, encode
                                 settings, seed, rejected inputs with reasons
    OUT/{split}-000000.tar       webdataset tar: per sample KEY.mp4 (or .webm, ...),
                                 KEY.cls (label id as text), KEY.json (metadata)
    OUT/{split}-000000.idx       DALI ``wds2idx`` index (v1.2): one line per sample with
                                 ``ext offset size name`` per component
    OUT/.build/{split}-000000.json   per-shard build record (what made it; resume)

The tars are plain webdataset shards (``webdataset.WebDataset`` and ``tar -t`` read
them; DALI's ``readers.webdataset`` reads them with the index files). The loader uses
the same index files to read any sample by byte offset, which is what gives it exact
per-sample shuffling, rank partitioning and resumption (see ``claver_dist.data.loader``).

Sample metadata (``KEY.json``): ``frames`` (decoded frame count, exact), ``fps``,
``width``, ``height``, ``duration``, ``codec``, ``cfr``, ``keyint``, ``bytes`` and
``crc32`` of the video component (checked at load time, so corruption after the build
is caught before a decoder sees it), ``label``, ``class_name``, ``source``.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import re
import tarfile
import zlib
from pathlib import Path
from typing import Any

import numpy as np

MANIFEST = "manifest.json"
FORMAT = "claver-shards/1"
INDEX_VERSION = "v1.2"
VIDEO_EXTS = ("mp4", "webm", "mkv", "avi", "mov", "m4v", "ogv", "mpg", "mpeg", "flv", "3gp", "ts", "gif")
META_EXTS = ("json", "cls")


class ShardError(ValueError):
    """A shard, index or manifest problem; the message names the file."""


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


class ShardSet:
    """All samples of one split, addressable by a global sample id.

    Sample ids follow the shards' order then the order inside each shard; the loader
    permutes them per epoch. The table is kept in flat arrays (a few dozen bytes per
    sample) because DataLoader workers each get a copy. Reading goes by byte offset
    (``os.pread``); file handles are opened lazily per process.
    """

    # component slots in the offset table
    VIDEO, JSON, CLS = 0, 1, 2

    def __init__(self, tars: list[Path], manifest: dict[str, Any] | None = None):
        self.tars = [Path(t) for t in tars]
        self.manifest = manifest
        self.keys: list[str] = []
        shard_of, table, ext_of = [], [], []
        self.exts: list[str] = []  # distinct video extensions; ext_of indexes into it
        for si, tar in enumerate(self.tars):
            idx = tar.with_suffix(".idx")
            if not idx.is_file():
                raise ShardError(f"{tar}: index file {idx.name} missing (make it with: python -m wds2idx {tar} {idx})")
            for key, comps in read_index(idx):
                row = [[-1, -1], [-1, -1], [-1, -1]]
                ext = ""
                for e, off, size in comps:
                    e = e.lower()
                    if e in VIDEO_EXTS and row[0][0] < 0:
                        row[0], ext = [off, size], e
                    elif e == "json":
                        row[1] = [off, size]
                    elif e == "cls":
                        row[2] = [off, size]
                if ext not in self.exts:
                    self.exts.append(ext)
                self.keys.append(key)
                shard_of.append(si)
                table.append(row)
                ext_of.append(self.exts.index(ext))
        if not self.keys:
            raise ShardError(f"no samples in {[str(t) for t in self.tars]}")
        self.shard_of = np.asarray(shard_of, np.int32)
        self.table = np.asarray(table, np.int64)  # [N, 3 components, (offset, size)]
        self.ext_of = np.asarray(ext_of, np.int16)
        self._fds: dict[int, int] = {}
        self._pid = os.getpid()

    def __len__(self) -> int:
        return len(self.keys)

    def __getstate__(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["_fds"] = {}
        return d

    def key(self, i: int) -> str:
        return self.keys[i]

    def where(self, i: int) -> str:
        """``key (shard.tar)``: how logs name a sample."""
        return f"{self.keys[i]} ({self.tars[self.shard_of[i]].name})"

    def component(self, i: int, slot: int) -> tuple[int, int] | None:
        off, size = self.table[i, slot]
        return None if off < 0 else (int(off), int(size))

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
        try:
            meta = json.loads(self.read(i, self.JSON))
            frames = int(meta["frames"])
        except (ValueError, KeyError, TypeError) as e:
            raise SampleError(f"bad metadata: {e!r}") from e
        if "label" not in meta:
            try:
                meta["label"] = int(self.read(i, self.CLS))
            except ValueError as e:
                raise SampleError(f"bad .cls: {e}") from e
        if frames < 1:
            raise SampleError(f"metadata says {frames} frames")
        data = self.read(i, self.VIDEO)
        if verify:
            if "bytes" in meta and len(data) != int(meta["bytes"]):
                raise SampleError(f"video is {len(data)} bytes, metadata says {meta['bytes']}")
            if "crc32" in meta and zlib.crc32(data) != int(meta["crc32"]):
                raise SampleError("video crc32 does not match metadata (corrupted after build)")
        meta["ext"] = self.exts[self.ext_of[i]]
        return data, meta

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds = {}


class SampleError(RuntimeError):
    """One sample cannot be used (corrupt, empty, not a video); the loader skips it."""


def dump_json(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, default=_default).encode()


def _default(o: Any) -> Any:
    if dataclasses.is_dataclass(o):
        return dataclasses.asdict(o)
    if isinstance(o, Path):
        return str(o)
    raise TypeError(type(o))
