"""The video loader on both backends (CPU: PyAV workers; DALI on CPU with VP9 shards), real shards.

Frame-numbered videos (each frame paints its index in binary bands) show which frames
a loader really decoded.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import shutil
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

from claver_dist.data.augment import CLIP_MEAN, CLIP_STD
from claver_dist.data.config import DataConfig
from claver_dist.data.loader import build_loader
from claver_dist.data.plan import Partition
from claver_dist.data.sampling import STREAM_FRAMES, clip_indices, sample_rng
from claver_dist.data.shards import ShardError, ShardSet, ShardWriter, dump_json, resolve_shards
from claver_dist.data.synthetic import MotionSpec, frame_number_frames, motion_frames, read_frame_number, write_video
from tools.make_shards import main as make_shards

LENGTHS = [5, 9, 12, 16, 20, 24, 29, 33, 40, 47, 52, 60]  # 12 videos; 5 < num_frames repeats frames


def _build(root: Path, out: Path, codec: str, extra: list[str] = ()) -> Path:
    argv = [str(root / "list.txt"), "--labels", str(root / "labels.csv"), "--out", str(out), "--codec", codec,
            "--short-side", "0", "--shard-samples", "5", "--workers", "2", "--no-progress", *extra]  # fmt: skip
    assert make_shards(argv) == 0
    return out


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("loader")
    numbered = tmp / "numbered"
    lines = []
    for i, n in enumerate(LENGTHS):
        write_video(numbered / f"v{i:02d}.mp4", frame_number_frames(n, 64, 48))
        lines.append(f"v{i:02d}.mp4 {i % 3}")
    (numbered / "list.txt").write_text("\n".join(lines) + "\n")
    (numbered / "labels.csv").write_text("id,name\n0,a\n1,b\n2,c\n")
    motion = tmp / "motion"
    rng = np.random.default_rng(0)
    spec = MotionSpec(width=64, height=48, min_frames=12, max_frames=20)
    lines = []
    for i in range(8):
        write_video(motion / f"m{i}.mp4", motion_frames(i, rng, spec))
        lines.append(f"m{i}.mp4 {i}")
    (motion / "list.txt").write_text("\n".join(lines) + "\n")
    (motion / "labels.csv").write_text("id,name\n" + "".join(f"{i},c{i}\n" for i in range(8)))
    return {
        "h264": _build(numbered, tmp / "num_h264", "h264"),
        "vp9": _build(numbered, tmp / "num_vp9", "vp9"),
        "motion": _build(motion, tmp / "motion_vp9", "vp9", ["--short-side", "48"]),
    }


BACKENDS = [("cpu", "h264"), ("cpu", "vp9"), ("dali", "vp9")]


def _cfg(shards: Path, backend: str, **kw) -> DataConfig:
    base = dict(backend=backend, train_shards=str(shards), val_shards=str(shards), val_split="train",
                num_frames=8, image_size=32, batch_size=4, num_workers=0)  # fmt: skip
    base.update(kw)
    return DataConfig(**base)


def _numbers(video: torch.Tensor) -> list[int]:
    """Frame numbers painted in ``[T, 3, S, S]`` normalised frames."""
    mean = torch.tensor(CLIP_MEAN).view(3, 1, 1)
    std = torch.tensor(CLIP_STD).view(3, 1, 1)
    return [read_frame_number(((f * std + mean) * 255).permute(1, 2, 0).numpy()) for f in video]


def _frames_of(shards_dir: Path) -> dict[str, int]:
    s = ShardSet(*resolve_shards(str(shards_dir), "train"))
    return {s.keys[i]: s.load(i)[1]["frames"] for i in range(len(s))}


def _epoch(loader) -> list[dict]:
    return [dict(b, video=b["video"].clone()) for b in loader]


# --------------------------------------------------------------------------- frames


@pytest.mark.parametrize("backend,codec", BACKENDS)
def test_decoded_frames_are_the_tsn_indices(data, backend, codec):
    frames = _frames_of(data[codec])
    # val: segment centres, 2 temporal clips x 1 crop
    loader = build_loader(_cfg(data[codec], backend), "val", views=(2, 1))
    seen = 0
    for batch in loader:
        assert batch["video"].shape[1:] == (2, 8, 3, 32, 32)
        for key, video, ok in zip(batch["key"], batch["video"], batch["valid"]):
            if not ok:
                continue
            want = clip_indices(frames[key], 8, train=False, clips=2)
            assert _numbers(video[0]) + _numbers(video[1]) == want, key
            seen += 1
    assert seen == len(frames) and not loader.skipped
    # train: random offsets from the sample's own stream (crop keeps whole bands: scale 1 only)
    cfg = _cfg(data[codec], backend, crop_scales=[1.0], color_jitter_prob=0.0, grayscale_prob=0.0)
    loader = build_loader(cfg, "train", seed=3)
    loader.set_epoch(2)
    for batch in loader:
        for key, video in zip(batch["key"], batch["video"]):
            want = clip_indices(frames[key], 8, train=True, rng=sample_rng(3, 2, key, STREAM_FRAMES))
            assert _numbers(video) == want, key


def test_backends_agree_on_indices_and_images(data):
    for split, views in (("train", (1, 1)), ("val", (2, 3))):
        out = {}
        for backend in ("cpu", "dali"):
            loader = build_loader(_cfg(data["motion"], backend, image_size=40, batch_size=2), split, seed=5, views=views)
            loader.set_epoch(1)
            out[backend] = _epoch(loader)
        assert len(out["cpu"]) == len(out["dali"]) == 4
        for a, b in zip(out["cpu"], out["dali"]):
            assert a["key"] == b["key"] and torch.equal(a["label"], b["label"])
            diff = (a["video"] - b["video"]).abs()
            # same crop/flip/colour; only YUV->RGB conversion and resampling differ (~1-3/255)
            assert diff.mean() < 0.05, (split, diff.mean())
            assert diff.flatten().quantile(0.99) < 0.3
    # the same frames: frame-numbered VP9 shards through both backends, train offsets
    cfg = dict(crop_scales=[1.0], color_jitter_prob=0.0, grayscale_prob=0.0)
    nums = {}
    for backend in ("cpu", "dali"):
        loader = build_loader(_cfg(data["vp9"], backend, **cfg), "train", seed=9)
        nums[backend] = [(k, _numbers(v)) for b in loader for k, v in zip(b["key"], b["video"])]
    assert nums["cpu"] == nums["dali"]


# --------------------------------------------------------------------------- ranks


def test_uint8_batches_finished_by_the_loader_equal_float_batches_from_the_workers(data):
    """A GPU run's CPU backend hands over uint8 pixels with their colours (a quarter of the
    bytes) and the loader finishes them on its device; a CPU run's workers finish them. The
    batches are the same (1e-5), val padding and bad slots still zero."""
    from claver_dist.data.cpu import CpuBackend

    for split, views in (("train", (1, 1)), ("val", (2, 3))):
        cfg = _cfg(data["motion"], "cpu", image_size=40, batch_size=5, num_workers=1)
        float_loader = build_loader(cfg, split, seed=5, views=views)
        uint8_loader = build_loader(cfg, split, seed=5, views=views)
        uint8_loader.backend.close()
        uint8_loader.backend = CpuBackend(uint8_loader.shards, uint8_loader.ctx, cfg, "cpu", finish_in_worker=False)
        raw = next(iter(uint8_loader.backend.run(uint8_loader.partition.jobs(0, 0, {}), 0)))
        assert raw["video"].dtype == torch.uint8 and raw["color"].shape == (5, 3, 3)
        a, b = _epoch(float_loader), _epoch(uint8_loader)
        assert len(a) == len(b) == len(float_loader)
        for x, y in zip(a, b):
            assert x["key"] == y["key"] and torch.equal(x["valid"], y["valid"]) and "color" not in y
            assert y["video"].dtype == torch.float32 and (x["video"] - y["video"]).abs().max() < 1e-5
            assert not y["video"][~y["valid"]].any()
        float_loader.close()
        uint8_loader.close()


@pytest.mark.parametrize("n,world,batch", [(12, 2, 4), (13, 2, 4), (17, 3, 2), (7, 4, 1), (30, 8, 3)])
def test_partition_policy(n, world, batch):
    for train in (True, False):
        orders = [Partition(n, batch, r, world, train, seed=1).order(4).tolist() for r in range(world)]
        jobs = [j for r in range(world) for j in Partition(n, batch, r, world, train, seed=1).jobs(4, 0, {})]
        assert {len(j.gids) for j in jobs} == {batch}
        real = [g for o in orders for g in o if g >= 0]
        assert len(real) == len(set(real))  # no sample twice
        assert len({len(o) for o in orders}) == 1  # same number of batches everywhere
        if train:
            assert len(real) == world * batch * (n // world // batch)  # drop only the remainder
        else:
            assert sorted(real) == list(range(n))  # every sample exactly once


def _step_sets(n: int, layouts: list[tuple[int, int, int, int]], epoch: int = 3) -> list[set[int]]:
    """Sample ids of each optimiser step of one epoch walked by ``layouts``: (world, batch,
    grad_accum, steps; -1 = to the end), each beginning where the previous stopped."""
    steps: list[set[int]] = []
    start = 0
    for world, batch, accum, count in layouts:
        parts = [Partition(n, batch, r, world, True, seed=7, multiple_of=accum) for r in range(world)]
        jobs = [list(p.jobs(epoch, 0, {}, start=start)) for p in parts]
        total = len(jobs[0]) // accum if count < 0 else count
        for s in range(total):
            steps.append({g for js in jobs for j in js[s * accum:(s + 1) * accum] for g in j.gids})
        start += total * world * batch * accum
    return steps


@pytest.mark.parametrize("n", [500, 487])
def test_resizing_mid_epoch_keeps_every_step_sample_for_sample(n):
    """16 ranks x 1 x accum 3 -> 8 x 1 x 6 -> 12 x 1 x 4 (48 clips per step throughout): each
    step takes the same samples as the uninterrupted 16-rank epoch, and the epoch visits its
    permutation once, dropping only the remainder of n / 48."""
    reference = _step_sets(n, [(16, 1, 3, -1)])
    resized = _step_sets(n, [(16, 1, 3, 3), (8, 1, 6, 2), (12, 1, 4, -1)])
    assert resized == reference and len(reference) == n // 48
    seen = [g for s in resized for g in s]
    assert len(seen) == len(set(seen)) == n // 48 * 48
    # another total batch (allowed explicitly): still each position once, the drop at the end grows at most
    other = _step_sets(n, [(16, 1, 3, 3), (5, 2, 1, -1)])
    seen = [g for s in other for g in s]
    assert len(seen) == len(set(seen)) and len(seen) > n - 48 - 10 and set(seen) >= set().union(*reference[:3])


def test_loader_restored_on_another_world_size_continues_the_epoch(data):
    """A 2-rank loader state (batch 2: 3 batches each per epoch) restored into 1 rank x batch 2
    and into 4 ranks x batch 1: the rest of the epoch is exactly the samples not yet seen."""
    cfg = _cfg(data["h264"], "cpu", batch_size=2)
    seen: list[str] = []
    states = []
    for rank in range(2):
        loader = build_loader(cfg, "train", rank=rank, world_size=2, seed=9)
        batch = next(iter(loader))
        seen += batch["key"]
        states.append(loader.state_dict())
        loader.close()
    assert states[0]["consumed"] == 4 and states[0]["epoch"] == 0
    epoch_keys = set(_frames_of(data["h264"]))
    for world, batch_size in ((1, 2), (4, 1)):
        rest: list[str] = []
        for rank in range(world):
            loader = build_loader(_cfg(data["h264"], "cpu", batch_size=batch_size), "train", rank=rank,
                                  world_size=world, seed=9)
            loader.load_state_dict(json.loads(json.dumps(states[rank % 2])))
            assert loader.position == (0, 4)
            rest += [k for b in loader for k in b["key"]]
            assert loader.position == (1, 0)
            loader.close()
        assert not set(rest) & set(seen) and len(rest) == len(set(rest)) == 8
        assert set(rest) | set(seen) == epoch_keys


@pytest.mark.parametrize("backend,codec", [("cpu", "h264"), ("dali", "vp9")])
def test_two_ranks_split_an_epoch(data, backend, codec):
    keys = set(_frames_of(data[codec]))
    for split in ("train", "val"):
        per_rank = []
        for rank in range(2):
            loader = build_loader(_cfg(data[codec], backend, batch_size=3), split, rank=rank, world_size=2, seed=1)
            assert len(loader) == 2
            got = [k for b in loader for k, ok in zip(b["key"], b["valid"]) if ok]
            per_rank.append(got)
        union = per_rank[0] + per_rank[1]
        assert len(union) == len(set(union)) and set(union) == keys  # 12 = 2 ranks x 2 batches x 3


@pytest.mark.slow
def test_two_processes_split_an_epoch(data):
    """Real ranks: two processes (gloo) each iterate their loader and gather what they saw."""
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")  # never fork a process that runs threads (DALI, torch pools)
    q = ctx.Queue()
    init = f"file://{data['h264'].parent / 'dist_init'}"
    procs = [ctx.Process(target=_rank_main, args=(r, 2, init, str(data["h264"]), q)) for r in range(2)]
    for p in procs:
        p.start()
    results = [q.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    by_rank = dict(results)
    assert by_rank[0]["gathered"] == by_rank[1]["gathered"]
    for split in ("train", "val"):
        union = [k for r in (0, 1) for k in by_rank[r]["gathered"][split][r]]
        assert len(union) == len(set(union)) == 12
        assert by_rank[0]["len"][split] == by_rank[1]["len"][split]


def _rank_main(rank: int, world: int, init: str, shards: str, q) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    out = {"gathered": {}, "len": {}}
    for split in ("train", "val"):
        loader = build_loader(_cfg(Path(shards), "cpu", batch_size=3, num_workers=1), split, rank, world, seed=2)
        mine = [k for b in loader for k, ok in zip(b["key"], b["valid"]) if ok]
        gathered = [None] * world
        dist.all_gather_object(gathered, mine)
        out["gathered"][split], out["len"][split] = gathered, len(loader)
        loader.close()
    dist.destroy_process_group()
    q.put((rank, out))


# --------------------------------------------------------------------------- resume


@pytest.mark.parametrize("backend,codec,workers", [("cpu", "h264", 2), ("dali", "vp9", 1)])
def test_restore_continues_with_exactly_the_next_batches(data, backend, codec, workers):
    cfg = _cfg(data[codec], backend, batch_size=2, num_workers=workers)  # 6 batches per epoch
    full = []
    loader = build_loader(cfg, "train", seed=4)
    for epoch in range(2):
        loader.set_epoch(epoch)
        full += _epoch(loader)
    loader.close()
    assert len(full) == 12
    for stop in (4, 6, 9):  # mid-epoch, exactly at the epoch boundary, in the second epoch
        loader, got = build_loader(cfg, "train", seed=4), []
        for epoch in range(2):
            loader.set_epoch(epoch)
            for batch in loader:
                got.append(dict(batch, video=batch["video"].clone()))
                if len(got) == stop:
                    break
            if len(got) == stop:
                break
        state = loader.state_dict()
        loader.close()
        assert state["epoch"] * 6 + state["batch"] == stop and state["samples"] == state["batch"] * 2
        restored = build_loader(cfg, "train", seed=4)
        restored.load_state_dict(json.loads(json.dumps(state)))  # survives a JSON/torch.save round trip
        for epoch in range(restored.epoch, 2):
            restored.set_epoch(epoch)  # keeps the restored position in the restored epoch
            got += _epoch(restored)
        restored.close()
        assert [b["key"] for b in got] == [b["key"] for b in full]
        for a, b in zip(got, full):
            assert torch.equal(a["video"], b["video"]) and torch.equal(a["label"], b["label"])


def test_epoch_bookkeeping(data):
    loader = build_loader(_cfg(data["h264"], "cpu", batch_size=4), "train")
    assert len(loader) == 3 and loader.num_samples == 12 and loader.samples_per_epoch == 12
    first = [b["key"] for b in loader]
    assert loader.state_dict()["epoch"] == 1 and loader.state_dict()["batch"] == 0
    second = [b["key"] for b in loader]  # iterating again continues with the next epoch
    assert first != second and sorted(sum(first, [])) == sorted(sum(second, []))
    loader.set_epoch(0)
    assert [b["key"] for b in loader] == first  # an epoch's order is a function of (seed, epoch)


# --------------------------------------------------------------------------- bad samples


def _corrupt(src: Path, dst: Path) -> tuple[str, str]:
    """Copy a shard set; damage one stored video in place and append a planted non-video sample.

    Returns (damaged key, planted key). The planted one has consistent size/crc metadata,
    so only a decoder can find it: the path DALI dies on.
    """
    shutil.copytree(src, dst)
    shards = ShardSet(*resolve_shards(str(dst), "train"))
    off, size = shards.component(3, ShardSet.VIDEO)
    ext = shards.load(3)[1]["ext"]
    with open(shards.tars[shards.shard_of[3]], "r+b") as f:
        f.seek(off + 16)
        f.write(b"\x00garbage" * (size // 16))
    planted = b"definitely not a video " * 40
    good_meta = shards.load(0)[1]
    meta = dict(good_meta, key="planted", source="planted.webm", bytes=len(planted), crc32=zlib.crc32(planted))
    meta.pop("ext")
    w = ShardWriter(dst / "train-000099.tar")
    w.add("planted", {ext: planted, "cls": b"1", "json": dump_json(meta)})
    w.close()
    m = json.loads((dst / "manifest.json").read_text())
    m["splits"]["train"]["shards"].append({"tar": "train-000099.tar", "idx": "train-000099.idx", "samples": 1,
                                           "bytes": (dst / "train-000099.tar").stat().st_size})
    (dst / "manifest.json").write_text(json.dumps(m))
    assert make_shards(["--reindex", str(dst)]) == 0  # a new shard list needs its compact index
    return shards.keys[3], "planted"


@pytest.mark.parametrize("backend,codec", [("cpu", "h264"), ("dali", "vp9")])
def test_corrupt_samples_are_skipped_counted_and_named(data, backend, codec, tmp_path, caplog):
    damaged, planted = _corrupt(data[codec], tmp_path / "bad")
    caplog.set_level(logging.WARNING, logger="claver_dist.data")
    cfg = _cfg(tmp_path / "bad", backend, batch_size=2)  # 13 samples
    train = build_loader(cfg, "train", seed=0)
    for epoch in range(2):
        train.set_epoch(epoch)
        batches = _epoch(train)
        assert len(batches) == len(train) == 6  # every step happens: bad slots are refilled
        for b in batches:
            assert b["valid"].all() and b["video"].shape == (2, 8, 3, 32, 32) and (b["label"] >= 0).all()
            assert damaged not in b["key"] and planted not in b["key"]
    # batch size 1: a bad sample is a whole bad batch, refilled from further along the rank's order
    single = _epoch(build_loader(_cfg(tmp_path / "bad", backend, batch_size=1), "train", seed=1))
    assert len(single) == 13 and not {damaged, planted} & {k for b in single for k in b["key"]}
    val = build_loader(cfg, "val")
    seen = {k: bool(ok) for b in val for k, ok in zip(b["key"], b["valid"]) if k}
    assert seen.pop(damaged) is False and seen.pop(planted) is False and all(seen.values()) and len(seen) == 11
    for loader in (train, val):
        reasons = loader.skipped
        assert set(reasons) <= {damaged, planted}
    assert "crc32" in val.skipped[damaged]
    assert ("DALI decode failed" if backend == "dali" else "cannot open") in val.skipped[planted]
    assert val.skip_events == 2
    logged = caplog.text
    assert damaged in logged and planted in logged and "train-000099.tar" in logged


def test_bad_sample_policy_units():
    from claver_dist.data.plan import BatchJob, SampleResult, assemble

    ok = lambda g, v: SampleResult(g, f"k{g}", g % 3, torch.full((2,), float(v)))  # noqa: E731
    bad = lambda g: SampleResult(g, f"k{g}", error="broken")  # noqa: E731
    job = BatchJob(0, 0, [0, 1, 2, 3], lookahead=[4, 5])
    b = assemble(job, [bad(0), ok(1, 1), bad(2), ok(3, 3)], True, (2,))
    assert b["key"] == ["k1", "k1", "k3", "k3"] and b["valid"].all() and b["video"][:, 0].tolist() == [1, 1, 3, 3]
    assert [s[1] for s in b["skipped"]] == ["k0", "k2"]
    b = assemble(job, [bad(0), ok(1, 1), bad(2), SampleResult(-1, "")], False, (2,))
    assert b["valid"].tolist() == [False, True, False, False] and b["label"].tolist() == [-1, 1, -1, -1]
    assert b["key"] == ["k0", "k1", "k2", ""] and b["video"][0].abs().sum() == 0
    b = assemble(job, [bad(g) for g in range(4)], True, (2,), fetch_more=lambda: ([ok(5, 5)], [(4, "k4", "broken")]))
    assert b["key"] == ["k5"] * 4 and len(b["skipped"]) == 5
    with pytest.raises(RuntimeError, match="all unusable .first: k0: broken.*shards look broken"):
        assemble(job, [bad(g) for g in range(4)], True, (2,), fetch_more=lambda: ([], []))


# --------------------------------------------------------------------------- errors and GPU


def test_clear_errors(data, tmp_path):
    with pytest.raises(ValueError, match="rebuild the shards with `make_shards.py --codec vp9`"):
        build_loader(_cfg(data["h264"], "dali"), "train")
    with pytest.raises(ShardError, match="no split 'test'"):
        build_loader(_cfg(data["h264"], "cpu", val_split="test"), "val")
    with pytest.raises(ShardError, match="cannot read shard manifest"):
        build_loader(_cfg(tmp_path, "cpu"), "train")
    with pytest.raises(ShardError, match="fewer than batch_size x world_size"):
        build_loader(_cfg(data["h264"], "cpu", batch_size=7), "train", world_size=2)
    with pytest.raises(ShardError, match="shards have 3 classes"):
        build_loader(_cfg(data["h264"], "cpu"), "train", num_classes=400)
    # a brace pattern of tars works without the manifest
    loader = build_loader(_cfg(str(data["h264"]) + "/train-00000{0..2}.tar", "cpu"), "val")
    assert loader.num_samples == 12
    # a shard the manifest lists but that is gone: an error at start, naming it
    import shutil

    copy = tmp_path / "lost"
    shutil.copytree(data["h264"], copy)
    (copy / "train-000001.tar").unlink()
    with pytest.raises(ShardError, match=r"train-000001.tar: shard missing \(the manifest lists it; 1 of 3"):
        build_loader(_cfg(copy, "cpu"), "train")


def _dali_installed() -> bool:
    try:
        return importlib.util.find_spec("nvidia.dali") is not None
    except ImportError:  # no nvidia namespace package at all
        return False


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.skipif(shutil.which("ffmpeg") is None,
                    reason="the shards of this module are re-encoded by ffmpeg, which is not installed "
                           "(tests/test_gpu.py checks the DALI decode on --copy shards)")
@pytest.mark.skipif(not _dali_installed(), reason="DALI is not installed: its mixed decode is not checked here")
def test_dali_gpu_decodes_h264_indices(data):
    frames = _frames_of(data["h264"])
    loader = build_loader(_cfg(data["h264"], "auto"), "val", device="cuda", views=(2, 3))
    assert loader.backend_name == "dali"
    for batch in loader:
        assert batch["video"].is_cuda and batch["video"].shape[1:] == (6, 8, 3, 32, 32)
        for key, video, ok in zip(batch["key"], batch["video"].cpu(), batch["valid"]):
            if ok:
                want = clip_indices(frames[key], 8, train=False, clips=2)
                assert _numbers(video[0]) + _numbers(video[3]) == want
