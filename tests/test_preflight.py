"""Preflight (claver_dist/preflight.py) through the launchers: launch/local.py with 2 ranks
(a slow rank made by the test hook is flagged as the straggler), launch/slurm.py on 2 nodes of
the local SLURM cluster, and the pure parts (straggler rule, checks, estimate) without processes.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from claver_dist import preflight as pf

REPO = Path(__file__).resolve().parent.parent
PY = sys.executable
COLUMNS = ("matmul_gflops", "allreduce_busbw_gbs", "read_mbs", "clips_per_s", "free_gb")


def overrides(data: Path, run_dir: Path, *extra: str) -> list[str]:
    return [f"data.train_shards={data}", f"data.val_shards={data}", f"text.labels={data / 'labels.csv'}",
            f"run_dir={run_dir}", "data.batch_size=4", "data.num_workers=0", *extra]


def local_preflight(data: Path, run_dir: Path, env: dict[str, str] | None = None, *extra: str) -> tuple[int, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **(env or {}))
    env.pop("CLAVER_LAUNCH_ID", None)
    res = subprocess.run([PY, str(REPO / "launch/local.py"), "--preflight", "--nproc", "2",
                          str(REPO / "configs/debug.yaml"), *overrides(data, run_dir, *extra)],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    return res.returncode, res.stdout + res.stderr


def assert_measured(report: dict, world: int) -> None:
    """Every column holds a measured positive number for every rank."""
    assert set(COLUMNS) <= set(report["columns"])
    assert [r["rank"] for r in report["ranks"]] == list(range(world))
    for r in report["ranks"]:
        for key in report["columns"]:
            assert isinstance(r[key], float) and r[key] > 0, (r["rank"], key, r[key])
        assert r["shared"] is True and r["errors"] == {}
        assert r["device"] and r["clips_timed"] > 0 and r["read_bytes"] > 0
        assert isinstance(r["clock_skew_s"], float) and r["clock_skew_bound_s"] >= 0
    e = report["estimate"]
    assert e["step_s"] > 0 and e["epoch_s"] > 0 and e["run_s"] >= e["epoch_s"] and e["mfu_assumed"] == 0.4
    assert report["model"]["vision_flops_per_clip"] > 0 and report["model"]["text_flops_per_step"] > 0


@pytest.mark.slow
def test_local_preflight_measures_every_rank_and_flags_a_slow_one(motion_shards, tmp_path):
    run_dir = tmp_path / "run"
    rc, out = local_preflight(motion_shards, run_dir)
    assert rc == 0, out[-4000:]
    report = json.loads((run_dir / pf.RESULT_FILE).read_text())
    assert_measured(report, 2)
    assert report["passed"] and report["failed"] == []
    assert {c["name"] for c in report["checks"]} == {"shared_folder", "free_space", "clock_skew", "measurements"}
    # the table, printed by rank 0 through the launcher
    assert "node 0 (" in out and "GFLOP/s  all-reduce GB/s  read MB/s  clips/s" in out
    assert report["text"].splitlines()[2] in out  # the header row as written to the JSON
    assert "assumed MFU 0.40" in out and "claver-preflight: passed" in out
    # nothing of a training run: no lock, no checkpoints, no metrics, no restart records
    assert sorted(p.name for p in run_dir.iterdir()) == [pf.RESULT_FILE]

    # the test hook: rank 1 sleeps inside its timed measurements
    slow_dir = tmp_path / "slow"
    rc, out = local_preflight(motion_shards, slow_dir, env={pf.SLOW_RANK_ENV: "1"})
    assert rc == 0, out[-4000:]  # stragglers are reported, not failed
    report = json.loads((slow_dir / pf.RESULT_FILE).read_text())
    assert_measured(report, 2)
    flagged = {s["rank"] for s in report["stragglers"]}
    assert flagged == {1}, report["stragglers"]
    # the hook cuts rank 1's rates to a sixth; matmul has the least noise of its own (the
    # ranks' videos differ, and other jobs on a test machine come and go)
    columns = {s["column"] for s in report["stragglers"]}
    assert "matmul_gflops" in columns and len(columns) >= 2, report["stragglers"]
    assert "* straggler: rank 1" in out


@pytest.mark.slow
def test_a_failed_check_exits_non_zero_naming_it(motion_shards, tmp_path):
    """A run folder on a file system without the room for the run's checkpoints."""
    if os.geteuid() != 0:
        pytest.skip("needs root to mount a small tmpfs")
    from conftest import small_tmpfs

    with small_tmpfs(tmp_path / "small", "8m") as mnt:
        rc, out = local_preflight(motion_shards, mnt / "run")
        report = json.loads((mnt / "run" / pf.RESULT_FILE).read_text())
    assert rc != 0, out[-3000:]
    assert report["failed"] == ["free_space"] and not report["passed"]
    assert "claver-preflight: FAILED: free_space: need" in out
    assert "preflight failed: free_space" in out


# --------------------------------------------------------------------------- without processes


def rank(r: int, **values) -> pf.RankResult:
    base = dict(matmul_gflops=100.0, allreduce_busbw_gbs=1.0, read_mbs=500.0, clips_per_s=50.0, free_gb=100.0,
                shared=True, clock_skew_s=0.0, clock_skew_bound_s=0.001, steps_per_epoch=10)
    return pf.RankResult(r, r % 2, r // 2, f"n{r // 2}", device="CPU", **{**base, **values})


def test_straggler_rule_is_twenty_percent_below_the_median():
    ranks = [rank(0), rank(1, read_mbs=401.0), rank(2, clips_per_s=39.0), rank(3)]
    out = pf.find_stragglers(ranks, 0.2)
    assert [(s["rank"], s["column"]) for s in out] == [(2, "clips_per_s")]
    assert out[0]["median"] == 50.0
    assert pf.find_stragglers([rank(0, clips_per_s=1.0)], 0.2) == []  # one rank: no median to compare


def test_checks_name_what_failed():
    ranks = [rank(0), rank(1, shared=False, free_gb=0.5, clock_skew_s=45.0), rank(2)]
    ranks[2].errors["loader"] = "ShardError: gone"
    checks = {c.name: c for c in pf.run_checks(ranks, required_bytes=2**30, opts=pf.PreflightOptions())}
    assert not checks["shared_folder"].ok and "rank 1 on n0" in checks["shared_folder"].detail
    assert not checks["free_space"].ok and "rank 1 on n0: 0.50 GB" in checks["free_space"].detail
    assert not checks["clock_skew"].ok and "rank 1 +45.000 s" in checks["clock_skew"].detail
    assert not checks["measurements"].ok and "rank 2 loader: ShardError: gone" in checks["measurements"].detail
    assert all(c.ok for c in pf.run_checks([rank(0), rank(1)], 2**30, pf.PreflightOptions()))


def test_estimate_takes_the_slower_of_compute_and_data():
    from claver_dist.config import load_config

    cfg = load_config(REPO / "configs/debug.yaml", ["data.batch_size=4", "train.epochs=3"])
    cost = {"vision_flops_per_clip": 1e9, "text_flops_per_step": 2e9, "params": 1e6, "trainable_params": 1e6}
    ranks = [rank(0, matmul_gflops=10.0, allreduce_busbw_gbs=None), rank(1, matmul_gflops=20.0,
                                                                         allreduce_busbw_gbs=None)]
    e = pf.estimate(cfg, cost, ranks, 2, pf.PreflightOptions(mfu=0.5), "cpu")
    # 4 clips x 1 GFLOP + 2 GFLOP of text sharded over 2 ranks, at 10 GFLOP/s x 0.5
    assert e["compute_s_per_step"] == pytest.approx(5e9 / 5e9)
    assert e["data_s_per_step"] == pytest.approx(4 / 50.0) and e["bound"] == "compute"
    assert e["epoch_s"] == pytest.approx(10 * e["step_s"]) and e["total_steps"] == 30
    slow_data = [rank(0, clips_per_s=2.0), rank(1)]
    assert pf.estimate(cfg, cost, slow_data, 2, pf.PreflightOptions(), "cpu")["bound"] == "data"


def test_read_ranges_are_distinct_per_rank(tmp_path):
    tars = []
    for i in range(2):
        tars.append(tmp_path / f"s{i}.tar")
        tars[-1].write_bytes(os.urandom(1 << 20))
    mine = [pf.read_ranges(tars, r, 4) for r in range(4)]
    seen = [(p, off) for ranges in mine for p, off, _ in ranges]
    assert len(seen) == len(set(seen)) and all(mine)
    assert sum(n for ranges in mine for _, _, n in ranges) == 2 << 20


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_matmul_is_bf16_and_measured():
    flops, dtype = pf.measure_matmul(torch.device("cuda"), pf.PreflightOptions(matmul_s=0.3), 0)
    assert dtype == "bfloat16" and flops > 1e12
    elements, dtype, note = pf.allreduce_plan(int(5e8), torch.device("cuda"), "bf16", pf.PreflightOptions())
    assert elements == int(5e8) and dtype == torch.bfloat16 and "reduce_bucket_size" in note


# --------------------------------------------------------------------------- SLURM


@pytest.mark.slurm
@pytest.mark.slow
def test_slurm_preflight_on_two_nodes_writes_per_node_tables(slurm_cluster, motion_shards, tmp_path):
    from launch import slurm

    run_dir = tmp_path / "run"
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = slurm.main(["--preflight", "--nodes", "2", "--gpus-per-node", "0", "--tasks-per-node", "1",
                         "--time", "10", str(REPO / "configs/debug.yaml"),
                         *overrides(motion_shards, run_dir, "train.device=cpu")])
    text = out.getvalue()
    print(text)
    if rc != 0:
        for f in sorted(run_dir.glob("slurm/*/*_log.*")):
            print(f"==== {f}\n{f.read_text(errors='replace')[-4000:]}")
    assert rc == 0, text[-3000:]
    report = json.loads((run_dir / pf.RESULT_FILE).read_text())
    assert report["launch"].startswith("slurm-") and report["passed"]
    assert_measured(report, 2)
    assert sorted(r["node"] for r in report["ranks"]) == [0, 1]
    hosts = {r["host"] for r in report["ranks"]}  # SLURMD_NODENAME: one machine, two of its nodes
    assert len(hosts) == 2 and all(h.startswith("n") for h in hosts), hosts
    assert "node 0 (" in text and "node 1 (" in text and "claver-preflight: passed" in text
    assert not (run_dir / "checkpoints").exists() and not (run_dir / "metrics.jsonl").exists()
