"""The compact shard index (``OUT/{split}.index/``): what make_shards writes, what ShardSet maps."""

from __future__ import annotations

import json
import logging
import multiprocessing as mp
import pickle
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from claver_dist.data import shards as shards_mod
from claver_dist.data.shards import ShardError, ShardSet, read_index, resolve_shards
from tools.make_shards import main as make_shards


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _manifest(folder: Path) -> dict:
    return json.loads((folder / "manifest.json").read_text())


@pytest.mark.parametrize("split", ["train", "val"])
def test_index_matches_the_idx_files(motion_shards, split):
    tars, manifest = resolve_shards(str(motion_shards), split)
    mapped = ShardSet(tars, manifest)
    assert mapped.index_path == motion_shards / f"{split}.index"
    assert isinstance(mapped.offsets, np.memmap) and isinstance(mapped.shard_of, np.memmap)
    entry = manifest["splits"][split]["index"]
    assert entry["num_samples"] == len(mapped) == manifest["splits"][split]["num_samples"]
    parsed = ShardSet(tars)  # no manifest: the .idx files
    assert parsed.index_path is None
    assert list(mapped.keys) == list(parsed.keys) and mapped.keys == parsed.keys
    assert np.array_equal(mapped.shard_of, parsed.shard_of)
    assert np.array_equal(mapped.offsets, parsed.offsets) and np.array_equal(mapped.sizes, parsed.sizes)
    assert [mapped.exts[e] for e in mapped.ext_of] == [parsed.exts[e] for e in parsed.ext_of]
    # ... and both say what the wds2idx text says, component by component
    gid = 0
    for si, tar in enumerate(tars):
        for key, comps in read_index(tar.with_suffix(".idx")):
            assert mapped.keys[gid] == key and mapped.shard_of[gid] == si
            by_ext = {e: (o, s) for e, o, s in comps}
            assert mapped.component(gid, ShardSet.VIDEO) == by_ext["mp4"]
            assert mapped.component(gid, ShardSet.JSON) == by_ext["json"]
            assert mapped.component(gid, ShardSet.CLS) == by_ext["cls"]
            gid += 1
    assert gid == len(mapped)
    data, meta = mapped.load(len(mapped) - 1)
    assert meta["key"] == mapped.keys[-1] and meta["ext"] == "mp4" and len(data) == meta["bytes"]


def test_keys_behave_like_a_list(motion_shards):
    keys = ShardSet(*resolve_shards(str(motion_shards), "train")).keys
    as_list = list(keys)
    assert len(keys) == len(as_list) == 48 and all(isinstance(k, str) for k in as_list)
    assert keys[-1] == as_list[-1] and keys[np.int64(5)] == as_list[5] and keys[3:7] == as_list[3:7]
    assert keys == as_list and keys != as_list[::-1] and as_list[10] in keys
    with pytest.raises(IndexError):
        keys[48]


@pytest.mark.parametrize("mapped", [True, False])
def test_ids_of(motion_shards, mapped):
    tars, manifest = resolve_shards(str(motion_shards), "train")
    shards = ShardSet(tars, manifest if mapped else None)
    every = {k: i for i, k in enumerate(shards.keys)}
    assert shards.ids_of(shards.keys) == every
    some = [shards.keys[7], shards.keys[0], shards.keys[47], shards.keys[7]]
    assert shards.ids_of(some + ["not_a_key", "", shards.keys[7] + "x"]) == {k: every[k] for k in some}
    assert shards.ids_of([]) == {}


def test_stale_index_is_an_error_naming_it(motion_shards, tmp_path):
    folder = _copy(motion_shards, tmp_path / "set")
    index = folder / "train.index"
    # the shard list changed after the index was written (a second shard added to the manifest)
    m = _manifest(folder)
    for ext in ("tar", "idx"):
        shutil.copy(folder / f"train-000000.{ext}", folder / f"train-000001.{ext}")
    m["splits"]["train"]["shards"].append(dict(m["splits"]["train"]["shards"][0], tar="train-000001.tar",
                                               idx="train-000001.idx"))  # fmt: skip
    (folder / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ShardError, match=rf"{re.escape(str(index))}: stale compact index .*--reindex {re.escape(str(folder))}"):
        ShardSet(*resolve_shards(str(folder), "train"))
    assert make_shards(["--reindex", str(folder)]) == 0
    shards = ShardSet(*resolve_shards(str(folder), "train"))
    assert shards.index_path == index and len(shards) == 96 and shards.shard_of[48] == 1
    assert shards.ids_of([shards.keys[50]]) == {shards.keys[50]: 2}  # a key in both shards: the first
    # a shard rewritten in place without a new manifest: its size differs from the record
    tar = shards.tars[0]
    with open(tar, "ab") as f:
        f.write(b"\0" * 512)
    with pytest.raises(ShardError, match=rf"{re.escape(str(index))}: stale compact index .*{re.escape(str(tar))} is \d+ bytes"):
        ShardSet(*resolve_shards(str(folder), "train"))
    # an index folder that belongs to another build
    shutil.rmtree(index)
    shutil.copytree(motion_shards / "val.index", index)
    with pytest.raises(ShardError, match=rf"{re.escape(str(index / 'meta.json'))}: stale compact index"):
        ShardSet(*resolve_shards(str(folder), "train"))


def test_reindex_counts_must_match_the_manifest(motion_shards, tmp_path):
    folder = _copy(motion_shards, tmp_path / "set")
    m = _manifest(folder)
    m["splits"]["val"]["shards"][0]["samples"] += 1
    (folder / "manifest.json").write_text(json.dumps(m))
    assert make_shards(["--reindex", str(folder)]) == 2
    with pytest.raises(ShardError, match=r"val-000000\.idx: 16 samples, the manifest lists 17"):
        shards_mod.write_split_index(folder, "val", m["splits"]["val"]["shards"])


def test_set_without_index_loads_from_idx_files_and_says_once(motion_shards, tmp_path, caplog):
    folder = _copy(motion_shards, tmp_path / "old")
    m = _manifest(folder)
    for sp in m["splits"].values():
        del sp["index"]
    (folder / "manifest.json").write_text(json.dumps(m))
    for split in ("train", "val"):
        shutil.rmtree(folder / f"{split}.index")
    caplog.set_level(logging.WARNING, logger="claver_dist.data")
    a = ShardSet(*resolve_shards(str(folder), "train"))
    b = ShardSet(*resolve_shards(str(folder), "val"))
    assert a.index_path is None and b.index_path is None
    assert caplog.text.count("has no compact index") == 1 and f"--reindex {folder}" in caplog.text
    reference = ShardSet(*resolve_shards(str(motion_shards), "train"))
    assert a.keys == reference.keys and np.array_equal(a.offsets, reference.offsets)
    assert make_shards(["--reindex", str(folder)]) == 0
    assert ShardSet(*resolve_shards(str(folder), "train")).index_path == folder / "train.index"


def _read_in_worker(payload: bytes) -> tuple[str, bytes, dict, bool]:
    shards = pickle.loads(payload)
    data, meta = shards.load(5)
    return shards.keys[5], data, meta, isinstance(shards.offsets, np.memmap)


def test_pickled_shardset_maps_the_index_in_a_worker(motion_shards):
    shards = ShardSet(*resolve_shards(str(motion_shards), "train"))
    shards.load(0)  # an open handle must not travel either
    payload = pickle.dumps(shards)
    assert len(payload) < 8192  # paths and the manifest, not the arrays
    ctx = mp.get_context("spawn")
    with ctx.Pool(1) as pool:
        key, data, meta, mapped = pool.apply(_read_in_worker, (payload,))
    assert mapped and key == shards.keys[5]
    assert (data, meta) == shards.load(5)
