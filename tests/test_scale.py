"""Many ranks on the local SLURM cluster: 4 nodes x 4 processes = 16 gloo ranks train,
checkpoint, are preempted and requeued, and are then resized to 8 and to 12 ranks; every
step trains on exactly the clips of an uninterrupted run, and the LR follows the same steps.

The per-step clip sets are checked against an uninterrupted local run with another layout
(1 process x batch 4 x accumulation 12): with the same total batch (48 clips), step k of
any layout takes positions [48k, 48k + 48) of the epoch's permutation.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from launch import slurm
from test_slurm import SUBMITTED, attempts, logs_on_failure, sh, steps_logged, wait_for_step, wait_job
from test_train import step_keys

REPO = Path(__file__).resolve().parent.parent
STEPS = 15          # 3 epochs of 5 steps: 240 clips / 48 per step
TOTAL_BATCH = 48    # 16 x 1 x 3 = 8 x 1 x 6 = 12 x 1 x 4
pytestmark = [pytest.mark.slurm, pytest.mark.slow]


@pytest.fixture(scope="module")
def wide_shards(tmp_path_factory) -> Path:
    """4 motion classes x 60 train videos (240: 5 steps of 48) and 2 val each."""
    from conftest import build_motion_shards

    return build_motion_shards(tmp_path_factory.mktemp("wide"), per_class=60, val_per_class=2)


def overrides(data: Path, run_dir: Path, *extra: str) -> list[str]:
    return [f"data.train_shards={data}", f"data.val_shards={data}", f"text.labels={data / 'labels.csv'}",
            f"run_dir={run_dir}", "data.num_workers=0", "log.every_steps=1", "log.count_flops=false",
            "log.progress_bar=false", "log.sample_keys=true", "train.val_every_epochs=1000", "train.device=cpu",
            "train.precision=fp32", f"train.max_steps={STEPS}", "checkpoint.every_steps=5", *extra]


def submit(data: Path, run_dir: Path, nodes: int, tasks: int) -> str:
    """``launch/slurm.py --nodes N --tasks-per-node T`` with data.batch_size=1 and the
    accumulation a 16-rank run needs for 48 clips per step (resumes recompute it)."""
    import contextlib
    import io
    import re

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = slurm.main(["--nodes", str(nodes), "--gpus-per-node", "0", "--tasks-per-node", str(tasks),
                         "--time", "20", str(REPO / "configs/debug.yaml"),
                         *overrides(data, run_dir, "data.batch_size=1", "train.grad_accum=3")])
    assert rc == 0, out.getvalue()
    job = re.search(r"submitted job (\d+)", out.getvalue()).group(1)
    SUBMITTED[job] = time.time() - 2
    return job


def trainers(run_dir: Path) -> list[psutil.Process]:
    procs = []
    for p in psutil.process_iter(["cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if "claver_dist.train" in cmd and f"run_dir={run_dir}" in cmd:
            procs.append(p)
    return procs


def rss_per_rank_gb(run_dir: Path) -> list[float]:
    out = []
    for p in trainers(run_dir):
        try:
            out.append(p.memory_info().rss / 2**30)
        except psutil.Error:
            pass
    return out


def rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def lrs(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["lr"] for r in rows(run_dir) if "lr" in r}


def test_sixteen_ranks_preempted_requeued_then_resized_to_8_and_12(slurm_cluster, wide_shards, tmp_path):
    ref = tmp_path / "reference"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    subprocess.run([sys.executable, str(REPO / "launch/local.py"), "--nproc", "1", str(REPO / "configs/debug.yaml"),
                    *overrides(wide_shards, ref, "data.batch_size=4", "train.grad_accum=12")],
                   cwd=REPO, env=env, check=True, timeout=900, stdout=subprocess.DEVNULL)
    run_dir = tmp_path / "scaled"
    with logs_on_failure(run_dir):
        # 16 ranks: preempted by a job in `urgent` (USR2: save, requeue), then cancelled (TERM: save)
        job = submit(wide_shards, run_dir, 4, 4)
        wait_for_step(run_dir, 2, job, 900)
        rss16 = rss_per_rank_gb(run_dir)
        urgent = sh("sbatch", "--parsable", "-p", "urgent", "-N", "4", "-w", sh("squeue", "-h", "-j", job, "-o", "%N").strip(),
                    "--exclusive", "-o",
                    str(tmp_path / "urgent.out"), "--wrap", "sleep 2").strip()
        assert urgent.isdigit(), urgent
        assert wait_job(urgent, 600) == "COMPLETED"
        first_stop = max(steps_logged(run_dir))
        wait_for_step(run_dir, first_stop + 2, job, 900)
        sh("scancel", "--signal=TERM", job)
        assert wait_job(job, 300) in ("CANCELLED", "COMPLETED")
        assert attempts(job)[0] == "REQUEUED", attempts(job)
        after16 = len(rows(run_dir))
        stop16 = max(steps_logged(run_dir))
        # 8 ranks, then 12 ranks to the end: the same 48 clips per step
        job8 = submit(wide_shards, run_dir, 2, 4)
        wait_for_step(run_dir, stop16 + 2, job8, 900)
        rss8 = rss_per_rank_gb(run_dir)
        sh("scancel", "--signal=TERM", job8)
        assert wait_job(job8, 300) in ("CANCELLED", "COMPLETED")
        before12 = len(rows(run_dir))
        stop8 = max(steps_logged(run_dir))
        assert stop8 < STEPS
        job12 = submit(wide_shards, run_dir, 3, 4)
        wait_for_step(run_dir, stop8 + 1, job12, 900)
        rss12 = rss_per_rank_gb(run_dir)
        assert wait_job(job12, 900) == "COMPLETED"
        logs = "\n".join(f.read_text(errors="replace") for f in (run_dir / "slurm").glob("*/*_log.*"))
    assert "world size 16 -> 8: train.grad_accum 3 -> 6 keeps the total batch of 48 clips" in logs
    assert "world size 8 -> 12: train.grad_accum 3 -> 4 keeps the total batch of 48 clips" in logs
    assert (run_dir / "finished").read_text() == f"step {STEPS}\n"
    got, want = step_keys(run_dir), step_keys(ref)
    assert sorted(got) == list(range(1, STEPS + 1)) and got == want
    for epoch in range(3):  # each epoch: 240 distinct clips, none twice
        seen = [k for s in range(5 * epoch + 1, 5 * epoch + 6) for k in got[s]]
        assert len(seen) == len(set(seen)) == 240
    a, b = lrs(run_dir), lrs(ref)
    assert all(abs(a[s] - b[s]) <= 1e-12 * max(1.0, abs(b[s])) for s in range(1, STEPS + 1)), (a, b)
    # what each size costs here (2 cores shared by all ranks: relative, not absolute)
    all_rows = rows(run_dir)
    table = [("16 = 4 x 4", all_rows[:after16], rss16), ("8 = 2 x 4", all_rows[after16:before12], rss8),
             ("12 = 3 x 4", all_rows[before12:], rss12)]
    print("\n| ranks | time to first step (s) | step time (s), median | RSS per rank (GB), median / max |")
    print("|---|---|---|---|")
    for name, rs, rss in table:
        starts = [r["startup_s"] for r in rs if "startup_s" in r]
        times = sorted(r["step_time_s"] for r in rs if "step_time_s" in r)
        rss = sorted(rss)
        print(f"| {name} | {starts[-1]:.0f} | {times[len(times) // 2]:.2f} | "
              f"{rss[len(rss) // 2]:.2f} / {rss[-1]:.2f} |")
