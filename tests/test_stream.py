"""Streaming shards by URL (claver_dist/data/stream.py) from real local servers: an HTTP
server and moto's stand-alone S3 server, both started here; credentials come from the
environment. The HTTP server can cut a response short mid-shard: the only way to make a
real server drop a connection on cue (``FaultyHandler``)."""

from __future__ import annotations

import functools
import json
import http.server
import logging
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from claver_dist.data.config import DataConfig
from claver_dist.data.loader import build_loader
from claver_dist.data.shards import ShardSet, resolve_shards
from claver_dist.data.stream import StreamPlan, StreamShard
from conftest import build_motion_shards

BATCH = 2


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """48 train clips in 10 shards (5 per shard, the last 3), 16 val clips in 4."""
    return build_motion_shards(tmp_path_factory.mktemp("streamed"), shard_args=("--shard-samples", "5"))


class FaultyHandler(http.server.SimpleHTTPRequestHandler):
    """Python's file server; a GET of a file named in ``drops`` sends half its body and then
    closes the connection (``drops[name]`` times)."""

    drops: dict[str, int] = {}
    gets: dict[str, int] = {}

    def log_message(self, *args) -> None:
        pass

    def copyfile(self, source, outputfile) -> None:
        name = self.path.rsplit("/", 1)[-1]
        self.gets[name] = self.gets.get(name, 0) + 1
        if self.drops.get(name, 0) > 0:
            self.drops[name] -= 1
            data = source.read()
            outputfile.write(data[: len(data) // 2])
            outputfile.flush()
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        super().copyfile(source, outputfile)


@pytest.fixture(scope="module")
def http_url(shards, tmp_path_factory):
    """The shard folder served over HTTP, one sample's video corrupted after the build: the
    first of the shard that rank 0's first stream reads first in epoch 0 (seed 5, 2 x 2)."""
    root = tmp_path_factory.mktemp("served") / "shards"
    shutil.copytree(shards, root)
    tars, manifest = resolve_shards(str(root), "train")
    s = ShardSet(tars, manifest)
    counts = [int(e["samples"]) for e in manifest["splits"]["train"]["shards"]]
    plan = StreamPlan([StreamShard(str(t), n) for t, n in zip(tars, counts)], BATCH, 0, 2, 2, True, 5, 4)
    first = plan.layout(0).streams[0][0]
    gid = sum(counts[:first])
    off, size = s.component(gid, ShardSet.VIDEO)
    with open(s.tars[first], "r+b") as f:
        f.seek(off + size // 2)
        f.write(b"\xff" * 16)
    bad = s.keys[gid]
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(FaultyHandler, directory=str(root)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", bad
    server.shutdown()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def s3_url(shards):
    """moto's stand-alone S3 server with the shard folder uploaded to s3://claver/k400."""
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    env = {"AWS_ACCESS_KEY_ID": "claver", "AWS_SECRET_ACCESS_KEY": "claver-secret", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"}  # fmt: skip
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        deadline = time.time() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert proc.poll() is None and time.time() < deadline, "moto server did not start"
                time.sleep(0.2)
        import s3fs

        fs = s3fs.S3FileSystem()  # endpoint and credentials from the environment, as the loader's
        fs.mkdir("claver")
        fs.put(str(shards) + "/", "claver/k400", recursive=True)
        s3fs.S3FileSystem.clear_instance_cache()
        yield "s3://claver/k400"
    finally:
        proc.terminate()
        proc.wait(10)
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def config(url: str, workers: int = 2, **kw) -> DataConfig:
    return DataConfig(train_shards=url, val_shards=url, batch_size=BATCH, num_workers=workers, image_size=32,
                      num_frames=4, stream_buffer=4, **kw)  # fmt: skip


def epoch_keys(loader) -> list[str]:
    return [k for batch in loader for k in batch["key"]]


def run_from(loader, n: int) -> tuple[dict, list[tuple[list[str], torch.Tensor]]]:
    """The position after ``n`` batches, and every batch after it to the end of the epoch."""
    it = iter(loader)
    for _ in range(n):
        next(it)
    state = loader.state_dict()
    return state, [(b["key"], b["video"]) for b in it]


def assert_resumes(cfg: DataConfig, rank: int = 0, world: int = 2, n: int = 3) -> None:
    first = build_loader(cfg, "train", rank, world, seed=5, num_classes=4)
    state, rest = run_from(first, n)
    again = build_loader(cfg, "train", rank, world, seed=5, num_classes=4)
    again.load_state_dict(state)
    got = [(b["key"], b["video"]) for b in again]
    assert [k for k, _ in got] == [k for k, _ in rest] and rest
    for (_, a), (_, b) in zip(got, rest):
        assert torch.equal(a, b)
    first.close()
    again.close()


def test_two_ranks_two_workers_read_disjoint_shards_over_http(http_url, shards):
    url, bad = http_url
    cfg = config(url)
    seen, skipped = {}, {}
    for rank in range(2):
        loader = build_loader(cfg, "train", rank, 2, seed=5, num_classes=4)
        assert loader.backend_name == "stream" and len(loader) == 10  # per stream: its smallest shards
        keys = epoch_keys(loader)
        assert len(keys) == 10 * BATCH
        seen[rank], skipped[rank] = keys, (dict(loader.skipped), loader.skip_events)
        loader.close()
    # the corrupted clip is skipped, named and counted on the rank that read it; its slot
    # holds another clip of the batch
    hit = [r for r in range(2) if bad in skipped[r][0]]
    assert len(hit) == 1 and "crc32" in skipped[hit[0]][0][bad] and skipped[hit[0]][1] == 1
    everything = seen[0] + seen[1]
    assert bad not in everything
    # a bad slot repeats a clip of its batch; otherwise no clip twice in the epoch across ranks
    repeats = len(everything) - len(set(everything))
    assert repeats <= 1 and not set(seen[0]) & set(seen[1])
    assert len(set(everything)) >= 40 - 1

    # the next epoch reads the shards in another order
    loader = build_loader(cfg, "train", 0, 2, seed=5, num_classes=4)
    loader.set_epoch(1)
    assert epoch_keys(loader) != seen[0]


def test_mid_epoch_resume_is_exact_over_http_and_s3(http_url, s3_url):
    assert_resumes(config(http_url[0]))
    assert_resumes(config(s3_url), rank=1)
    assert_resumes(config(s3_url, workers=0), n=5)


def test_a_dropped_connection_is_retried_then_counted(http_url, caplog):
    url, _ = http_url
    cfg = config(url, workers=0, stream_retries=2)
    clean = build_loader(cfg, "train", 0, 1, seed=5, num_classes=4)
    ref = [(b["key"], b["video"]) for b in clean]
    shard = clean.layout().streams[0][0]  # the first shard read in epoch 0
    name = clean.plan.shards[shard].url.rsplit("/", 1)[-1]

    FaultyHandler.drops[name] = 2  # cut twice: the second retry reads it
    caplog.set_level(logging.WARNING, "claver_dist.data")
    again = build_loader(cfg, "train", 0, 1, seed=5, num_classes=4)
    got = [(b["key"], b["video"]) for b in again]
    assert [k for k, _ in got] == [k for k, _ in ref]
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(got, ref))
    assert "retry 2 of 2" in caplog.text

    FaultyHandler.drops[name] = 3  # one more than the retries: its unread clips are counted, the epoch goes on
    lost = build_loader(cfg, "train", 0, 1, seed=5, num_classes=4)
    keys = epoch_keys(lost)
    assert len(keys) == len(ref) * BATCH
    gone = [k for k in lost.skipped if k.startswith(f"{url}/{name}#")]
    assert gone and all("unreadable after 2 retries" in lost.skipped[k] for k in gone)
    assert not any(k.startswith(url) for k in keys)
    clean.close()


def test_another_layout_goes_on_without_the_started_shards(http_url, caplog):
    url, _ = http_url
    before = [build_loader(config(url, workers=1), "train", r, 2, seed=5, num_classes=4) for r in range(2)]
    states, read = [], []
    for loader in before:
        it = iter(loader)
        read += [k for _ in range(2) for k in next(it)["key"]]
        states.append(loader.state_dict())
        del it
    caplog.set_level(logging.WARNING, "claver_dist.data")
    after = build_loader(config(url, workers=2), "train", 0, 1, seed=5, num_classes=4)
    after.load_state_dict(states[0])
    assert "goes on with the" in caplog.text and after.position == (0, 0)
    rest = epoch_keys(after)
    assert rest and not set(rest) & set(read)
    assert after.epoch == 1


def test_plan_gives_every_rank_the_same_batches_in_every_epoch():
    shards = [StreamShard(f"s{i}", n) for i, n in enumerate([7, 7, 7, 7, 7, 3, 7, 7, 5])]
    for world, workers in [(1, 1), (2, 2), (3, 1), (2, 3)]:
        plans = [StreamPlan(shards, 2, r, world, workers, True, seed=1, buffer=4, multiple_of=2) for r in range(world)]
        for epoch in range(4):
            layouts = [p.layout(epoch) for p in plans]
            assert len({len(lay.schedule) for lay in layouts}) == 1 and len(layouts[0].schedule) % 2 == 0
            assert len(layouts[0].schedule) == plans[0].num_batches
            read = [s for lay in layouts for stream in lay.streams for s in stream]
            assert sorted(read) == list(range(len(shards)))  # disjoint, and together every shard
            for lay in layouts:  # no stream asked for more batches than its samples hold
                assert all(q * 2 <= sum(shards[s].samples for s in st) for q, st in zip(lay.quotas, lay.streams))
    with pytest.raises(Exception, match="too few for 4 ranks"):
        StreamPlan(shards[:2], 8, 0, 4, 1, True, seed=1, buffer=4)



def test_streams_take_the_shards_webdatasets_node_and_worker_splitters_give(monkeypatch):
    """The plan applies split_by_node then split_by_worker to the epoch's shard order, with
    explicit indices (it needs every rank's share); here webdataset's own splitters, told the
    rank and worker through their environment variables, must give each stream the same shards."""
    import webdataset as wds

    shards = [StreamShard(f"s{i}", 5 + i % 3) for i in range(11)]
    for world, workers in [(2, 2), (3, 2), (1, 3)]:
        for epoch in range(2):
            order = StreamPlan(shards, 2, 0, world, workers, True, seed=3, buffer=4).order(epoch)
            for r in range(world):
                layout = StreamPlan(shards, 2, r, world, workers, True, seed=3, buffer=4).layout(epoch)
                for w in range(workers):
                    for k, v in {"RANK": r, "WORLD_SIZE": world, "WORKER": w, "NUM_WORKERS": workers}.items():
                        monkeypatch.setenv(k, str(v))
                    assert layout.streams[w] == list(wds.split_by_worker(wds.split_by_node(iter(order))))

@pytest.mark.slow
def test_training_streams_from_s3_and_resumes_exactly(s3_url, shards, tmp_path):
    """2 DeepSpeed ranks x 1 data worker train on shards streamed from S3; a run resumed from
    the step-4 checkpoint repeats steps 5-8 exactly (the position lives in rank 0's state)."""
    from test_train import launch, losses

    common = (f"data.train_shards={s3_url}", f"data.val_shards={s3_url}", "data.num_workers=1",
              "data.stream_buffer=4", "train.max_steps=8", "checkpoint.every_steps=4", "train.precision=fp32")
    ref = tmp_path / "ref"
    launch(2, shards, ref, *common)
    got = losses(ref)
    assert sorted(got) == list(range(1, 9))
    resumed = tmp_path / "resumed"
    launch(2, shards, resumed, *common, f"checkpoint.resume={ref / 'checkpoints/step_00000004'}")
    again = losses(resumed)
    assert sorted(again) == [5, 6, 7, 8] and all(again[s] == got[s] for s in again), (again, got)

    # the preflight reads the streamed shards as the loader does, and times the loader
    from claver_dist.preflight import RESULT_FILE
    from test_preflight import local_preflight

    rc, out = local_preflight(shards, tmp_path / "pf", None, *common)
    assert rc == 0, out[-3000:]
    report = json.loads((tmp_path / "pf" / RESULT_FILE).read_text())
    assert report["passed"] and all(r["read_bytes"] > 0 and r["clips_timed"] > 0 for r in report["ranks"])


def test_a_position_does_not_cross_between_streamed_and_random_access(shards):
    streamed = build_loader(config(f"file://{shards}", workers=0), "train", 0, 1, seed=5, num_classes=4)
    local = build_loader(config(str(shards), workers=0), "train", 0, 1, seed=5, num_classes=4)
    assert streamed.backend_name == "stream" and local.backend_name == "cpu"
    with pytest.raises(ValueError, match="streamed one"):
        local.load_state_dict(streamed.state_dict())
    with pytest.raises(ValueError, match="random-access loader's"):
        streamed.load_state_dict(local.state_dict())


def test_a_shell_command_streams_through_webdatasets_pipe(shards):
    """data.stream_command: the manifest and the shards read through webdataset's pipe:."""
    cfg = config(str(shards), workers=2, access="stream", stream_command="cat {url}")
    loader = build_loader(cfg, "train", 0, 1, seed=5, num_classes=4)
    via_fsspec = build_loader(config(str(shards), workers=2, access="stream"), "train", 0, 1, seed=5, num_classes=4)
    assert epoch_keys(loader) == epoch_keys(via_fsspec)
    assert_resumes(cfg, world=1)
    broken = config(str(shards), workers=0, access="stream", stream_command="cat {url}.missing", stream_retries=0)
    with pytest.raises(Exception, match="cannot read the shard manifest"):
        build_loader(broken, "train", 0, 1, seed=5, num_classes=4)
