"""Failures other than preemption, on one machine: launch/local.py over torch's elastic agent,
the run lock, resuming after a config edit, a full disk, a rank that cannot see the run
folder. Everything is real: SIGKILL, SIGSTOP, SIGINT to the launcher, a tmpfs that fills up,
a mount namespace in which the run folder does not exist.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch

from claver_dist import checkpoint as ckpt_lib
from claver_dist.train.metrics import read_metrics

REPO = Path(__file__).resolve().parent.parent
PY = sys.executable
pytestmark = pytest.mark.slow


def overrides(data: Path, run_dir: Path, *extra: str) -> list[str]:
    return [f"data.train_shards={data}", f"data.val_shards={data}", f"text.labels={data / 'labels.csv'}",
            f"run_dir={run_dir}", "data.batch_size=4", "data.num_workers=0", "log.every_steps=1",
            "log.count_flops=false", "train.val_every_epochs=100", "train.precision=fp32", *extra]


LOGS: dict[Path, Path] = {}  # run folder -> its launcher's log (default: next to the folder)


def log_path(run_dir: Path) -> Path:
    return LOGS.get(run_dir, run_dir.parent / f"{run_dir.name}.log")


def start(nproc: int, data: Path, run_dir: Path, *extra: str, launcher_args: tuple[str, ...] = ()) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("CLAVER_LAUNCH_ID", None)
    log = open(log_path(run_dir), "ab")
    return subprocess.Popen([PY, str(REPO / "launch/local.py"), "--nproc", str(nproc), *launcher_args,
                             str(REPO / "configs/debug.yaml"), *overrides(data, run_dir, *extra)],
                            cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)


def finish(proc: subprocess.Popen, timeout: float = 300) -> int:
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        for p in [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]:
            p.kill()
        raise


def log_of(run_dir: Path) -> str:
    return log_path(run_dir).read_text(errors="replace")


def steps(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run_dir) if "loss" in r}


def wait_for_step(run_dir: Path, step: int, proc: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if max(steps(run_dir), default=0) >= step:
            return
        assert proc.poll() is None, f"the launcher exited ({proc.returncode}) before step {step}:\n{log_of(run_dir)[-3000:]}"
        time.sleep(0.2)
    raise AssertionError(f"step {step} not reached in {timeout}s")


def trainer(run_dir: Path, rank: int) -> psutil.Process:
    from launch.elastic import find_trainer

    proc = find_trainer(run_dir, rank)
    assert proc is not None, f"no trainer of rank {rank} for {run_dir}"
    return proc


def catches(pid: int, sig: signal.Signals) -> bool:
    """Whether the process has a handler for ``sig`` (the SigCgt mask in /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigCgt:"):
            return bool(int(line.split()[1], 16) >> (sig - 1) & 1)
    return False


def records(run_dir: Path) -> list[dict]:
    path = run_dir / "restarts.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(run_dir / "export" / "model.safetensors"))


@pytest.fixture(scope="module")
def reference(motion_shards, tmp_path_factory) -> Path:
    """An uninterrupted 2-process run: 24 steps, checkpoints every 6."""
    run_dir = tmp_path_factory.mktemp("faults") / "reference"
    assert finish(start(2, motion_shards, run_dir, "train.max_steps=24", "checkpoint.every_steps=6")) == 0
    return run_dir


def same_weights(a: Path, b: Path) -> bool:
    wa, wb = weights(a), weights(b)
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


# --------------------------------------------------------------------------- restarts


def test_killed_rank_restarts_and_ends_like_the_uninterrupted_run(motion_shards, reference, tmp_path):
    run_dir = tmp_path / "killed"
    proc = start(2, motion_shards, run_dir, "train.max_steps=24", "checkpoint.every_steps=6")
    wait_for_step(run_dir, 8, proc)
    trainer(run_dir, 1).kill()
    assert finish(proc) == 0, log_of(run_dir)[-3000:]
    [record] = records(run_dir)
    assert (record["rank"], record["cause"], record["restarted"], record["resume_step"]) == (1, "killed by SIGKILL",
                                                                                           True, 6)
    assert record["steps_lost"] == record["last_logged_step"] - 6 >= 2
    assert "resumed from" in log_of(run_dir) and (run_dir / "finished").exists()
    assert same_weights(reference, run_dir), "final weights differ from the uninterrupted run"


def test_stopped_rank_is_turned_into_a_restart_by_the_watchdog(motion_shards, reference, tmp_path):
    hang_s = 10
    run_dir = tmp_path / "hung"
    proc = start(2, motion_shards, run_dir, "train.max_steps=24", "checkpoint.every_steps=6",
                 f"train.hang_timeout_s={hang_s}")
    wait_for_step(run_dir, 8, proc)
    stopped = trainer(run_dir, 1)
    t0 = time.time()
    stopped.suspend()
    assert finish(proc) == 0, log_of(run_dir)[-3000:]
    [record] = records(run_dir)
    assert record["cause"].startswith("hang") and record["exitcode"] == 124 and record["rank"] == 0
    assert record["time"] - t0 <= hang_s + 45  # the watchdog's poll, then the agent's teardown of the stopped rank
    [dump] = (run_dir / "hangs").glob("rank0-*.txt")
    assert "no progress for" in dump.read_text() and "claver_dist" in dump.read_text()
    assert same_weights(reference, run_dir)


def test_failures_beyond_max_failures_end_the_run_with_a_summary(motion_shards, tmp_path):
    run_dir = tmp_path / "failing"
    proc = start(2, motion_shards, run_dir, "train.max_steps=400", "checkpoint.every_steps=5",
                 launcher_args=("--max-failures", "1"))
    wait_for_step(run_dir, 3, proc)
    trainer(run_dir, 0).kill()
    deadline = time.monotonic() + 120
    while not (len(records(run_dir)) == 1 and "attempt 1" in log_of(run_dir) and
               max(steps(run_dir), default=0) > records(run_dir)[0]["last_logged_step"]):
        assert time.monotonic() < deadline, log_of(run_dir)[-3000:]
        time.sleep(0.3)
    # the launcher is paused while rank 1 dies, as a busy machine delays the agent: rank 0 sees
    # its peer gone and fails first, yet the record names rank 1 as the cause
    proc.send_signal(signal.SIGSTOP)
    survivor = trainer(run_dir, 0)
    trainer(run_dir, 1).kill()
    deadline = time.monotonic() + 60
    try:
        while survivor.status() != psutil.STATUS_ZOMBIE:  # exited; the paused agent has not reaped it
            assert time.monotonic() < deadline, "rank 0 did not notice that rank 1 died"
            time.sleep(0.2)
    finally:
        proc.send_signal(signal.SIGCONT)
    assert finish(proc) == 1
    first, second = records(run_dir)
    assert first["restarted"] and not second["restarted"] and second["rank"] == 1
    from launch.elastic import _PEER_LOST

    assert _PEER_LOST.search(second["other_causes"]["0"]), second["other_causes"]
    log = log_of(run_dir)
    assert "the run failed: killed by SIGKILL (after 1 restarts, --max-failures 1" in log
    assert "failure 1: rank 0" in log and "failure 2: rank 1" in log


def test_ctrl_c_and_sigterm_to_the_launcher_save_and_exit_zero(motion_shards, tmp_path):
    for sig in (signal.SIGINT, signal.SIGTERM):
        run_dir = tmp_path / sig.name
        proc = start(2, motion_shards, run_dir, "train.max_steps=2000", "checkpoint.every_steps=1000")
        wait_for_step(run_dir, 3, proc)
        proc.send_signal(sig)
        assert finish(proc, 120) == 0, log_of(run_dir)[-3000:]
        log = log_of(run_dir)
        assert log.count("claver-train: stopped") == 2 and "Traceback" not in log
        latest = ckpt_lib.find_latest(run_dir / "checkpoints")
        assert latest is not None and ckpt_lib.read_meta(latest)["step"] >= 3
        assert not (run_dir / "finished").exists() and records(run_dir) == []


@pytest.mark.parametrize("to", ["trainer", "launcher"])
def test_a_stop_signal_during_start_up_is_kept_until_the_first_step(motion_shards, tmp_path, to):
    """SLURM's warning (SIGUSR2) can come while the trainers still import torch or load a
    checkpoint: they keep it, train one step, save and exit 0 (the signal's default action
    would have killed them, counted as a failure). A stop to the launcher before it started
    the trainers is passed to them when they start: the same outcome."""
    run_dir = tmp_path / "early"
    from launch.elastic import find_trainer

    proc = start(1, motion_shards, run_dir, "train.max_steps=2000", "checkpoint.every_steps=1000")
    deadline = time.monotonic() + 120
    while True:
        assert time.monotonic() < deadline and proc.poll() is None, log_of(run_dir)[-3000:]
        child = find_trainer(run_dir, 0)
        if to == "trainer" and child is not None and catches(child.pid, signal.SIGUSR2):
            break  # the trainer's first lines ran (it catches SIGUSR2), torch not imported yet
        if to == "launcher" and catches(proc.pid, signal.SIGTERM):
            assert child is None  # the launcher listens, no trainer yet
            break
        time.sleep(0.01)
    if to == "trainer":
        child.send_signal(signal.SIGUSR2)
    else:
        proc.send_signal(signal.SIGTERM)
    assert finish(proc, 180) == 0, log_of(run_dir)[-3000:]
    log = log_of(run_dir)
    sig = "SIGUSR2" if to == "trainer" else "SIGTERM"
    assert f"received {sig} during start-up: checkpointing after the first step" in log
    assert "claver-train: stopped" in log and records(run_dir) == []
    assert ckpt_lib.read_meta(ckpt_lib.find_latest(run_dir / "checkpoints"))["step"] == 1
    assert max(steps(run_dir)) == 1


def test_config_error_exits_2_once_before_any_process(motion_shards, tmp_path):
    run_dir = tmp_path / "bad"
    proc = start(2, motion_shards, run_dir, "train.grad_accum=0")
    assert finish(proc, 60) == 2
    log = log_of(run_dir)
    assert log.strip() == "claver-local: train.grad_accum must be >= 1, got 0"
    assert not run_dir.exists()


# --------------------------------------------------------------------------- the run folder


def test_a_second_launch_refuses_and_a_dead_holder_is_taken_over(motion_shards, tmp_path):
    run_dir = tmp_path / "locked"
    first = start(1, motion_shards, run_dir, "train.max_steps=2000", "checkpoint.every_steps=1000")
    wait_for_step(run_dir, 2, first)
    second = start(1, motion_shards, run_dir, "train.max_steps=2000")
    assert finish(second, 60) == 2
    holder = json.loads((run_dir / ".lock").read_text())
    assert f"is in use by a live run (host {holder['host']}, pid {holder['pid']}" in log_of(run_dir)
    assert holder["pid"] == trainer(run_dir, 0).pid
    # a holder killed without cleaning up: the next launch takes the folder over, saying so
    victims = [psutil.Process(first.pid), *psutil.Process(first.pid).children(recursive=True)]
    for p in victims:
        p.kill()
    psutil.wait_procs(victims, timeout=30)
    first.wait()
    assert (run_dir / ".lock").exists()
    third = start(1, motion_shards, run_dir, "train.max_steps=4")
    assert finish(third) == 0
    assert f"taking over the run lock of host {holder['host']}, pid {holder['pid']}" in log_of(run_dir)
    assert f"pid {holder['pid']} on {holder['host']} is gone" in log_of(run_dir)
    assert not (run_dir / ".lock").exists()  # released at the end


def test_resuming_after_a_config_edit(motion_shards, tmp_path):
    run_dir = tmp_path / "edited"
    assert finish(start(1, motion_shards, run_dir, "train.max_steps=6", "checkpoint.every_steps=3",
                        "optim.warmup_epochs=0")) == 0
    # changes that would make the resumed run compute something else: refused, listed
    rc = finish(start(1, motion_shards, run_dir, "train.max_steps=12", "optim.lr=0.005", "data.batch_size=2",
                      "optim.warmup_epochs=0"), 60)
    assert rc == 2
    log = log_of(run_dir)
    assert "refused to start: resuming from" in log and "step_00000006 with a config that changes what it" in log
    for change in ("data.batch_size: 4 -> 2", "optim.lr: 0.001 -> 0.005", "train.max_steps: 6 -> 12"):
        assert change in log, change
    # harmless ones are logged and accepted; allowed ones take effect
    rc = finish(start(1, motion_shards, run_dir, "train.max_steps=12", "optim.lr=0.005", "log.every_steps=2",
                      "optim.warmup_epochs=0", "checkpoint.allow_config_change=true"))
    assert rc == 0, log_of(run_dir)[-3000:]
    log = log_of(run_dir)
    assert "resuming with log.every_steps: 1 -> 2" in log
    assert "resuming with changed config (checkpoint.allow_config_change=true): optim.lr: 0.001 -> 0.005" in log
    assert "the LR schedule follows the new config from step 6 of 12" in log
    lrs = {r["step"]: r["lr"] for r in read_metrics(run_dir) if "lr" in r}
    # after step 8 the LR is the new base on the new cosine (12 steps, floor 1% of the base)
    import math

    want = 0.005 * 0.01 + (0.005 - 0.005 * 0.01) * 0.5 * (1 + math.cos(math.pi * 8 / 12))
    assert lrs[8] == pytest.approx(want, rel=1e-6) and max(steps(run_dir)) == 12


def test_a_rank_that_cannot_see_the_run_folder_stops_the_run(motion_shards, tmp_path):
    """Rank 1 runs in its own mount namespace with an empty tmpfs over the run folder's
    parent: the folder rank 0 writes does not exist there, as on a node without the shared
    file system."""
    if os.geteuid() != 0 or not shutil.which("unshare"):
        pytest.fail("needs root and unshare (util-linux) for a private mount namespace")
    parent = tmp_path / "shared"
    parent.mkdir()
    run_dir = parent / "run"
    from claver_dist.distributed import free_port

    env = dict(os.environ, OMP_NUM_THREADS="1", WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(free_port()), LOCAL_WORLD_SIZE="2")
    cmd = [PY, "-m", "claver_dist.train", str(REPO / "configs/debug.yaml"), *overrides(motion_shards, run_dir)]
    rank0 = subprocess.Popen(cmd, cwd=REPO, env=dict(env, RANK="0", LOCAL_RANK="0"), stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    inner = f"mount -t tmpfs tmpfs {parent} && exec " + " ".join(map(str, cmd))
    rank1 = subprocess.Popen(["unshare", "--mount", "--propagation", "private", "sh", "-c", inner], cwd=REPO,
                             env=dict(env, RANK="1", LOCAL_RANK="1"), stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    out0, _ = rank0.communicate(timeout=120)
    out1, _ = rank1.communicate(timeout=120)
    assert rank0.returncode == rank1.returncode == 3, out0[-2000:] + out1[-2000:]
    for out in (out0, out1):
        assert f"{run_dir} is not one folder shared by all ranks: rank 1 on " in out
        assert "cannot see the file rank 0 wrote there" in out
    assert not (run_dir / "checkpoints").exists()


def test_a_full_disk_fails_the_save_cleanly_and_a_relaunch_resumes(motion_shards, tmp_path):
    """A tmpfs of 80 MB holds one checkpoint of the debug model (~50 MB) but not two."""
    if os.geteuid() != 0:
        pytest.fail("needs root to mount a small tmpfs")
    from conftest import small_tmpfs

    with small_tmpfs(tmp_path / "disk", "80m") as disk:
        run_dir = disk / "run"
        LOGS[run_dir] = tmp_path / "run.log"  # not on the disk that fills up
        common = ("train.max_steps=12", "checkpoint.every_steps=4", "checkpoint.keep_last=1")
        proc = start(2, motion_shards, run_dir, *common, launcher_args=("--max-failures", "0"))
        assert finish(proc) == 1
        log = log_of(run_dir)
        line = next(x for x in log.splitlines() if "saving checkpoint" in x and "failed" in x)
        assert f"saving checkpoint {run_dir}/checkpoints/step_00000008 failed: no space left on the device" in line
        assert "GB free of 0.08 GB on the file system of" in line
        assert f"latest is still {run_dir}/checkpoints/step_00000004" in line
        assert not (run_dir / "checkpoints/step_00000008").exists()  # the partial checkpoint is gone
        assert ckpt_lib.find_latest(run_dir / "checkpoints").name == "step_00000004"
        subprocess.run(["mount", "-o", "remount,size=300m", str(disk)], check=True)
        assert finish(start(2, motion_shards, run_dir, *common)) == 0, log_of(run_dir)[-3000:]
        assert f"resumed from {run_dir}/checkpoints/step_00000004 at step 4" in log_of(run_dir)
        assert (run_dir / "finished").exists()
