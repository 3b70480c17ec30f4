"""SLURM launcher (launch/slurm.py) against a real SLURM cluster on this machine.

    sudo scripts/slurm_cluster.sh up                 # two nodes, accounting (make test does this)
    python -m pytest -q tests/test_slurm.py          # ~12-15 min on 2 cores

Jobs are real: submitit pickles, sbatch, srun, one elastic agent per node starting 1
DeepSpeed process over gloo on each of 2 nodes. Preemption is SLURM's own (a job in the
higher-tier `urgent` partition), the time limit is a real 1-minute one, cancellation a real
scancel; a crashed rank is a real SIGKILL, a hung one a real SIGSTOP. The dry-run tests
need no cluster; the others skip, saying why, where no cluster runs and none can be
started (not root). Every wait is bounded; on failure the job logs and the cluster's
daemon logs are printed.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from launch import slurm

REPO = Path(__file__).resolve().parent.parent
CLUSTER_SCRIPT = REPO / "scripts/slurm_cluster.sh"
STEPS = 60  # reference and preempted runs
# The time-limit run must need more than two 1-minute jobs' worth of training. A job trains
# at most ~53 s (signal <= 58 s after its start, start-up >= 5 s), so the run gets 120 s of
# steps at the best speed seen on the reference run (its fastest tenth of steps: other load
# on the machine only slows a run down, which means more requeues, never fewer).
TIME_LIMIT_TRAIN_S = 120


# --------------------------------------------------------------------------- cluster and data


@pytest.fixture(scope="module")
def shards(motion_shards) -> Path:
    """4 motion classes x 12 train / 4 val videos (tests/conftest.py)."""
    return motion_shards


# --------------------------------------------------------------------------- helpers


def overrides(data: Path, run_dir: Path, steps: int, *extra: str) -> list[str]:
    return [f"data.train_shards={data}", f"data.val_shards={data}", f"text.labels={data / 'labels.csv'}",
            f"run_dir={run_dir}", "data.batch_size=4", "data.num_workers=0", "log.every_steps=1",
            "log.count_flops=false", "log.progress_bar=false", "train.val_every_epochs=1000", "train.device=cpu",
            "train.precision=fp32", f"train.max_steps={steps}", "checkpoint.every_steps=25", *extra]


def submit(data: Path, run_dir: Path, steps: int, *launcher_args: str, extra: tuple[str, ...] = ()) -> str:
    """`python launch/slurm.py --nodes 2 --gpus-per-node 0 ... configs/debug.yaml ...`, in process."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = slurm.main(["--nodes", "2", "--gpus-per-node", "0", "--time", "10", *launcher_args,
                         str(REPO / "configs/debug.yaml"), *overrides(data, run_dir, steps, *extra)])
    print(out.getvalue())
    assert rc == 0
    m = re.search(r"submitted job (\d+)", out.getvalue())
    assert m, out.getvalue()
    SUBMITTED[m.group(1)] = time.time() - 2
    assert f"{run_dir}/slurm/{m.group(1)}/{m.group(1)}_0_log.out" in out.getvalue()
    return m.group(1)


def sh(*cmd: str, timeout: float = 60) -> str:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout).stdout


def dump_logs(*run_dirs: Path) -> None:
    """What a failing test leaves behind: every task log, accounting, the daemons' logs."""
    for run_dir in run_dirs:
        for f in sorted(run_dir.glob("slurm/*/*_log.*")):
            print(f"==== {f} (tail)\n{f.read_text(errors='replace')[-4000:]}")
    print("==== sacct\n" + sh("sacct", "-D", "-X", "-S", "now-1hour", "-o", "JobID,JobName,Partition,State,ExitCode,"
                               "Start,End,NodeList,Reason"))
    print(sh("bash", str(CLUSTER_SCRIPT), "logs"))


@contextlib.contextmanager
def logs_on_failure(*run_dirs: Path):
    try:
        yield
    except BaseException:
        dump_logs(*run_dirs)
        raise


def wait_job(job_id: str, timeout_s: float) -> str:
    try:
        return slurm.wait(job_id, timeout_s)
    except TimeoutError:
        subprocess.run(["scancel", job_id], timeout=30)
        raise


def steps_logged(run_dir: Path) -> dict[int, float]:
    """step -> loss, the last logged value of each step (a resumed run logs some again)."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return {}
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip().endswith("}")]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def wait_for_step(run_dir: Path, step: int, job_id: str, timeout_s: float = 180) -> int:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        done = max(steps_logged(run_dir), default=0)
        if done >= step:
            return done
        state, _ = slurm.job_state(job_id)
        assert state not in slurm.FINAL_STATES, f"job {job_id} ended ({state}) before step {step}"
        time.sleep(0.5)
    subprocess.run(["scancel", job_id], timeout=30)
    raise AssertionError(f"job {job_id}: step {step} not reached in {timeout_s}s")


SUBMITTED: dict[str, float] = {}  # job id -> time of submission


def attempts(job_id: str, settle_s: float = 60) -> list[str]:
    """The states of every run of a job, oldest first (accounting keeps each requeued attempt;
    records older than the submission belong to an earlier cluster that reused the id).

    Called once the controller says the job is over: slurmdbd records the end a moment later,
    so a last attempt still RUNNING or PENDING there is waited for, up to ``settle_s``."""
    since = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(SUBMITTED[job_id]))
    deadline = time.monotonic() + settle_s
    while True:
        states = sh("sacct", "-n", "-X", "-P", "-D", "-S", since, "-j", job_id, "-o", "State").split()
        if (states and states[-1] in slurm.FINAL_STATES) or time.monotonic() > deadline:
            return states
        time.sleep(1)


def results(run_dir: Path, job_id: str, tasks: int = 2) -> list[str]:
    """Each task's submitit result (the job is over: the result pickles are read at once)."""
    import submitit

    return submitit.SlurmJob(folder=run_dir / "slurm" / job_id, job_id=job_id, tasks=tuple(range(tasks))).results()


def task_log(run_dir: Path, job_id: str, node: int | None = None) -> str:
    """A node's task log (its agent and its trainers), or all of them (which node hosts rank
    0 is the rendezvous' choice)."""
    nodes = [node] if node is not None else (0, 1)
    return "\n".join((run_dir / "slurm" / job_id / f"{job_id}_{n}_log.out").read_text() for n in nodes
                     if (run_dir / "slurm" / job_id / f"{job_id}_{n}_log.out").exists())


def requeue_records(run_dir: Path) -> list[dict]:
    path = run_dir / "slurm" / "requeues.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def restart_records(run_dir: Path) -> list[dict]:
    """<run_dir>/restarts.jsonl: every failure restart and every requeue (launch/elastic.py)."""
    path = run_dir / "restarts.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def trainer_process(run_dir: Path, rank: int, timeout_s: float = 60):
    """The live trainer process of ``rank`` of the run in ``run_dir`` (the test cluster's nodes
    are processes of this machine)."""
    from launch.elastic import find_trainer

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        proc = find_trainer(run_dir, rank)
        if proc is not None:
            return proc
        time.sleep(0.5)
    raise AssertionError(f"no trainer process of rank {rank} for {run_dir}")


def load_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(run_dir / "export" / "model.safetensors"))


# --------------------------------------------------------------------------- dry run (no cluster)


def test_dry_run_eight_nodes_of_eight_gpus(tmp_path, monkeypatch, capsys):
    """The L/14 recipe on 8 x 8 GPUs: 64 nccl ranks, one agent task per node starting 8
    processes, the requeue signal, nothing submitted, no SLURM needed (PATH without sbatch/srun)."""
    from claver_dist.config import load_config, to_dict

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PATH", str(tmp_path))
    assert slurm.main(["--nodes", "8", "--dry-run", str(REPO / "configs/k400_l14.yaml")]) == 0
    out = capsys.readouterr().out
    assert "8 nodes x 8 processes = 64 ranks (nccl, 8 GPUs/node, 8 CPUs/process)" in out
    for line in ("#SBATCH --nodes=8", "#SBATCH --ntasks-per-node=1", "#SBATCH --cpus-per-task=64",
                 "#SBATCH --gpus-per-node=8",
                 "#SBATCH --signal=USR2@120", "#SBATCH --requeue", "#SBATCH --time=1440",
                 "#SBATCH --job-name=k400_l14", "#SBATCH --open-mode=append"):
        assert line in out.splitlines(), line
    srun = next(line for line in out.splitlines() if line.startswith("srun "))
    assert f"{sys.executable} -u -m submitit.core._submit" in srun
    assert f"{tmp_path}/runs/k400_l14/slurm/%j/%j_%t_log.out" in srun
    config = out.split("# ---- resolved config\n")[1].split("# ---- sbatch script")[0]
    expected = json.loads(json.dumps(to_dict(load_config(REPO / "configs/k400_l14.yaml"))))  # tuples -> lists
    assert yaml.safe_load(config) == expected
    assert not (tmp_path / "runs").exists()


def test_dry_run_cpu_partition_and_bad_requests(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    cfg = str(REPO / "configs/debug.yaml")
    assert slurm.main(["--nodes", "2", "--gpus-per-node", "0", "--partition", "cpu", "--qos", "low",
                       "--account", "vision", "--mem", "16G", "--dry-run", cfg]) == 0
    out = capsys.readouterr().out
    assert "2 nodes x 1 processes = 2 ranks (gloo, 0 GPUs/node, 1 CPUs/process)" in out
    assert "#SBATCH --ntasks-per-node=1" in out and "gpus-per-node" not in out
    for line in ("#SBATCH --partition=cpu", "#SBATCH --qos=low", "#SBATCH --account=vision", "#SBATCH --mem=16G"):
        assert line in out.splitlines(), line
    bad = {("--nodes", "0"): "--nodes must be >= 1",
           ("--nodes", "1", "--tasks-per-node", "4"): "one task per GPU",
           ("--nodes", "1", "--time", "1", "--signal-delay", "60"): "not shorter than --time",
           ("--nodes", "1", "--max-failures", "-1"): "--max-failures must be >= 0",
           ("--nodes", "1", "--gpus-per-node", "2", "train.device=cpu"): "train.device=cpu"}
    for args, message in bad.items():
        opts = [a for a in args if "=" not in a]
        over = [a for a in args if "=" in a]
        assert slurm.main([*opts, "--dry-run", cfg, *over]) == 2, args
        assert message in capsys.readouterr().err
    assert slurm.main(["--nodes", "1", "--dry-run", cfg, "optim.lrr=1"]) == 2
    assert "optim.lrr" in capsys.readouterr().err


def test_dist_env_from_slurm_task_variables():
    """What every task computes from srun's variables (the same numbers a real job printed)."""
    from claver_dist.distributed import DistEnv

    env = {"SLURM_PROCID": "5", "SLURM_NTASKS": "6", "SLURM_LOCALID": "1", "SLURM_STEP_ID": "0",
           "SLURM_NODEID": "2", "SLURM_STEP_TASKS_PER_NODE": "2(x3)", "SLURM_NTASKS_PER_NODE": "2",
           "SLURM_JOB_NODELIST": "n[1-3]", "SLURM_JOB_ID": "123456"}
    d = DistEnv.from_environ(env, device="cpu")
    assert (d.source, d.rank, d.world_size, d.local_rank, d.local_world_size) == ("slurm", 5, 6, 1, 2)
    assert (d.master_addr, d.backend) == ("n1", "gloo")
    rank0 = DistEnv.from_environ(dict(env, SLURM_PROCID="0", SLURM_LOCALID="0", SLURM_NODEID="0"), device="cpu")
    assert d.master_port == rank0.master_port and 15000 <= d.master_port < 30000  # below the ephemeral ports
    # `srun -n 3` without --ntasks-per-node: three tasks on one node (no SLURM_NTASKS_PER_NODE)
    env = {"SLURM_PROCID": "2", "SLURM_NTASKS": "3", "SLURM_LOCALID": "2", "SLURM_STEP_ID": "0",
           "SLURM_NODEID": "0", "SLURM_STEP_TASKS_PER_NODE": "3", "SLURM_JOB_NODELIST": "n1", "SLURM_JOB_ID": "7"}
    assert DistEnv.from_environ(env, device="cpu").local_world_size == 3
    # uneven: 2 tasks on the first node, 1 on the second
    env.update(SLURM_STEP_TASKS_PER_NODE="2,1", SLURM_NODEID="1", SLURM_LOCALID="0")
    assert DistEnv.from_environ(env, device="cpu").local_world_size == 1


LATE_SIGNAL = """
# Fault injection (test only): rank 0 is asked to stop right after the stop agreement (the
# all-reduce) of step LATE_STOP_AFTER, where SLURM's signal can land; rank 1 is never asked.
# No real signal can be timed to land there.
import os, sys
from claver_dist.train.trainer import Trainer
real = Trainer._agree_to_stop
at = int(os.environ.get("LATE_STOP_AFTER", "0"))
def late_signal(self):
    out = real(self)
    if self.dist.rank == 0 and self.step == at:
        self.request_stop()
    return out
Trainer._agree_to_stop = late_signal
from claver_dist.train.main import main
sys.exit(main(sys.argv[1:]))
"""


def train_two_ranks(shards: Path, run_dir: Path, steps: int, stop_after: int = 0) -> str:
    """A 2-rank torchrun of the trainer; with ``stop_after``, rank 0 alone gets a stop request
    just after that step's agreement. Returns the output; a deadlock fails the test."""
    from claver_dist.distributed import free_port

    script = run_dir.parent / "late_signal.py"
    script.write_text(LATE_SIGNAL)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port()),
           str(script), str(REPO / "configs/debug.yaml"), *overrides(shards, run_dir, steps)]
    env = dict(os.environ, OMP_NUM_THREADS="1", LATE_STOP_AFTER=str(stop_after))
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=180)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        out = proc.communicate()[0]
        raise AssertionError(f"ranks deadlocked after a one-sided stop request:\n{out[-3000:]}")
    assert proc.returncode == 0, out[-3000:]
    return out


@pytest.mark.slow
def test_stop_request_after_the_all_reduce_stops_all_ranks_together(shards, tmp_path):
    """A stop request on one rank between the step's all-reduce and its end used to make that
    rank checkpoint alone while the other stepped on: a deadlock (a SLURM time-limit run hung
    until killed). The request now waits for the next all-reduce: both ranks save step 6."""
    from claver_dist import checkpoint as ckpt_lib

    run_dir = tmp_path / "run"
    out = train_two_ranks(shards, run_dir, 20, stop_after=5)
    assert out.count("claver-train: stopped") == 2, out[-3000:]
    assert ckpt_lib.find_latest(run_dir / "checkpoints").name == ckpt_lib.tag_for(6)
    assert not (run_dir / "finished").exists()


@pytest.mark.slow
def test_stop_agreed_at_the_last_step_saves_it_and_the_next_start_only_finishes(shards, tmp_path):
    """A time-limit signal during the last step: the ranks save it and stop (the final
    validation and export may not fit in the time left); the next start trains nothing,
    exports and marks the run finished."""
    from claver_dist import checkpoint as ckpt_lib
    from claver_dist.train.metrics import read_metrics

    run_dir = tmp_path / "run"
    out = train_two_ranks(shards, run_dir, 8, stop_after=7)
    assert out.count("claver-train: stopped") == 2, out[-3000:]
    assert ckpt_lib.find_latest(run_dir / "checkpoints").name == ckpt_lib.tag_for(8)
    assert not (run_dir / "finished").exists() and not (run_dir / "export").exists()
    trained = [r["step"] for r in read_metrics(run_dir) if "loss" in r]
    assert max(trained) == 8

    out = train_two_ranks(shards, run_dir, 8)
    assert out.count("claver-train: finished") == 2 and f"{run_dir}/checkpoints/step_00000008 at step 8" in out, \
        out[-3000:]
    assert (run_dir / "finished").read_text() == "step 8\n"
    assert (run_dir / "export" / "model.safetensors").exists()
    assert [r["step"] for r in read_metrics(run_dir) if "loss" in r] == trained  # no step trained again


# --------------------------------------------------------------------------- real cluster


@pytest.fixture(scope="module")
def reference_run(slurm_cluster, shards, tmp_path_factory) -> tuple[Path, str]:
    """An uninterrupted 2-node run. The submitting process carries stale torchrun variables
    (as after an in-process trainer: DistEnv.init exports them; sbatch copies the submitting
    environment into the job): the tasks must still take their ranks from SLURM."""
    run_dir = tmp_path_factory.mktemp("slurm-runs") / "reference"
    with pytest.MonkeyPatch.context() as mp:
        for k, v in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_PORT": "1"}.items():
            mp.setenv(k, v)
        job = submit(shards, run_dir, STEPS)
    with logs_on_failure(run_dir):
        assert wait_job(job, 300) == "COMPLETED"
    return run_dir, job


@pytest.mark.slurm
def test_two_nodes_train_checkpoint_and_finish(reference_run):
    from claver_dist import checkpoint as ckpt_lib

    run_dir, job = reference_run
    with logs_on_failure(run_dir):
        assert results(run_dir, job) == ["finished", "finished"]
        assert attempts(job) == ["COMPLETED"]
        nodes, ranks = set(), set()
        for node in (0, 1):
            log = task_log(run_dir, job, node)
            banner = re.search(rf"claver-slurm: job {job} restart 0 node (n\d) \({node} of 2\) 1 processes "
                               rf"rendezvous n1:\d+", log)
            assert banner, log[-3000:]
            nodes.add(banner.group(1))
            ranks |= {int(r) for r in re.findall(r"claver-train: rank (\d)/2 local 0 on \S+ master \S+ gloo "
                                                  r"attempt 0", log)}
        assert nodes == {"n1", "n2"} and ranks == {0, 1}  # one agent on each node, one rank each
        assert "2 processes (gloo, cpu)" in task_log(run_dir, job)
        latest = ckpt_lib.find_latest(run_dir / "checkpoints")
        assert latest.name == ckpt_lib.tag_for(STEPS)
        assert ckpt_lib.read_meta(latest)["world_size"] == 2
        assert sorted(p.name for p in (run_dir / "checkpoints").glob("step_*")) == \
            [ckpt_lib.tag_for(50), ckpt_lib.tag_for(STEPS)]  # every 25 steps, keep_last 2
        assert sorted(steps_logged(run_dir)) == list(range(1, STEPS + 1))
        assert (run_dir / "finished").read_text() == f"step {STEPS}\n"
        assert (run_dir / "export" / "model.safetensors").is_file()
        assert (run_dir / "config.yaml").is_file()
        assert requeue_records(run_dir) == [] and restart_records(run_dir) == []


@pytest.mark.slurm
def test_preemption_requeues_and_resumes_exactly(reference_run, shards, tmp_path):
    """A job in the `urgent` partition preempts the run: SLURM sends USR2, every rank saves,
    rank 0 requeues; the run resumes from that checkpoint and ends where the reference did."""
    ref_dir, _ = reference_run
    run_dir = tmp_path / "preempted"
    job = submit(shards, run_dir, STEPS)
    with logs_on_failure(run_dir):
        wait_for_step(run_dir, 12, job)
        nodes = sh("squeue", "-h", "-j", job, "-o", "%N").strip()  # its nodes: the cluster may have idle ones
        urgent = sh("sbatch", "--parsable", "-p", "urgent", "-N", "2", "-w", nodes, "--exclusive", "-o", str(tmp_path / "urgent.out"),
                    "--wrap", "sleep 2").strip()
        assert urgent.isdigit(), urgent
        assert wait_job(urgent, 120) == "COMPLETED"
        assert wait_job(job, 300) == "COMPLETED"
        assert attempts(job) == ["REQUEUED", "COMPLETED"]
        assert slurm.job_state(job)[1] == 1
        [record] = requeue_records(run_dir)
        stop = record["step"]
        assert 12 <= stop < STEPS and record["restart_count"] == 0
        log = task_log(run_dir, job)
        assert "received SIGUSR2" in log
        assert f"resumed from {run_dir}/checkpoints/step_{stop:08d} at step {stop}" in log
        assert results(run_dir, job) == ["finished", "finished"]
        ref, run = steps_logged(ref_dir), steps_logged(run_dir)
        assert sorted(run) == list(range(1, STEPS + 1))
        assert all(run[s] == ref[s] for s in range(stop + 1, STEPS + 1)), "losses after the resume differ"
        a, b = load_weights(ref_dir), load_weights(run_dir)
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), "final weights differ from the uninterrupted run"


@pytest.mark.slurm
def test_finished_run_is_never_restarted(reference_run, shards):
    run_dir, first = reference_run
    before = {p: p.stat().st_mtime_ns for p in run_dir.rglob("*") if p.is_file() and "slurm" not in p.parts}
    job = submit(shards, run_dir, STEPS)
    with logs_on_failure(run_dir):
        assert wait_job(job, 120) == "COMPLETED"
        assert results(run_dir, job) == ["finished", "finished"]
        assert "is finished (finished exists): nothing to do" in task_log(run_dir, job)
        after = {p: p.stat().st_mtime_ns for p in run_dir.rglob("*") if p.is_file() and "slurm" not in p.parts}
        assert after == before  # no checkpoint, metric or export touched


@pytest.mark.slurm
def test_cancel_saves_and_is_not_requeued(slurm_cluster, shards, tmp_path):
    """scancel sends SIGTERM: the trainer saves, but a cancelled job must stay cancelled
    (`scontrol requeue` would happily revive it)."""
    from claver_dist import checkpoint as ckpt_lib

    run_dir = tmp_path / "cancelled"
    job = submit(shards, run_dir, 5000)
    with logs_on_failure(run_dir):
        wait_for_step(run_dir, 5, job)
        subprocess.run(["scancel", job], check=True, timeout=30)
        assert wait_job(job, 120).startswith("CANCELLED")
        deadline = time.monotonic() + 60
        while "not requeued" not in task_log(run_dir, job, 0) and time.monotonic() < deadline:
            time.sleep(0.5)
        stop = re.search(r"stopped at step (\d+) by SIGTERM/SIGUSR1: not requeued", task_log(run_dir, job, 0))
        assert stop, "rank 0 did not report its stop"
        time.sleep(3)  # rank 0 has decided; give a (wrong) requeue the time to show
        assert slurm.job_state(job) == ("CANCELLED", 0)
        assert requeue_records(run_dir) == []
        assert ckpt_lib.find_latest(run_dir / "checkpoints").name == ckpt_lib.tag_for(int(stop.group(1)))
        assert not (run_dir / "finished").exists()


@pytest.mark.slurm
def test_max_requeues_reached_leaves_the_run_stopped(slurm_cluster, shards, tmp_path):
    """With --max-requeues 0 the requeue signal still saves, and the job then ends cleanly."""
    from claver_dist import checkpoint as ckpt_lib

    run_dir = tmp_path / "no-requeue"
    job = submit(shards, run_dir, 5000, "--max-requeues", "0")
    with logs_on_failure(run_dir):
        wait_for_step(run_dir, 5, job)
        subprocess.run(["scancel", "--signal=USR2", job], check=True, timeout=30)  # what SLURM sends
        assert wait_job(job, 120) == "COMPLETED"
        assert attempts(job) == ["COMPLETED"]
        assert results(run_dir, job) == ["stopped", "stopped"]
        stop = re.search(r"stopped at step (\d+): not requeued, 0 requeues done \(--max-requeues 0\)",
                         task_log(run_dir, job, 0))
        assert stop
        assert ckpt_lib.find_latest(run_dir / "checkpoints").name == ckpt_lib.tag_for(int(stop.group(1)))
        assert requeue_records(run_dir) == [] and not (run_dir / "finished").exists()


def best_steps_per_second(run_dir: Path) -> float:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    t = {r["step"]: r["time"] for r in rows if "loss" in r}
    gaps = sorted(t[s] - t[s - 1] for s in t if s > 5 and s - 1 in t)  # after the warm-up steps
    return 1.0 / gaps[len(gaps) // 10]


@pytest.mark.slurm
def test_time_limit_requeues_until_finished(reference_run, shards, tmp_path):
    """--time 1: SLURM signals each job 30-60 s before its limit (it checks every 30 s); the
    run needs more than two jobs' worth of training, so it is requeued at least twice."""
    rate = best_steps_per_second(reference_run[0])
    steps = round(TIME_LIMIT_TRAIN_S * rate)
    print(f"time limit run: {steps} steps ({rate:.2f} steps/s at best on the reference run)")
    run_dir = tmp_path / "time-limit"
    # how much of each 1-minute job trains depends on the machine (start-up, SLURM's 30 s
    # check): as many requeues as it takes, the test asks for at least two
    job = submit(shards, run_dir, steps, "--time", "1", "--signal-delay", "2", "--max-requeues", "40",
                 extra=("checkpoint.every_steps=1000", "log.every_steps=10"))
    with logs_on_failure(run_dir):
        assert wait_job(job, 1800) == "COMPLETED"
        runs = attempts(job)
        records = requeue_records(run_dir)
        print(f"time limit: attempts {runs}, requeued at steps {[r['step'] for r in records]}")
        assert len(records) >= 2 and runs == ["REQUEUED"] * len(records) + ["COMPLETED"]
        assert [r["restart_count"] for r in records] == list(range(len(records)))
        stops = [r["step"] for r in records]
        # a signal during the last step saves it and requeues: the next job only finishes
        # (final validation, export), which could outlast the time left (docs/slurm.md)
        assert stops == sorted(stops) and len(set(stops)) == len(stops) and stops[-1] <= steps
        log = task_log(run_dir, job)
        for s in stops:
            assert f"resumed from {run_dir}/checkpoints/step_{s:08d} at step {s}" in log
        assert (run_dir / "finished").read_text() == f"step {steps}\n"
        assert max(steps_logged(run_dir)) == steps
        assert results(run_dir, job) == ["finished", "finished"]


# --------------------------------------------------------------------------- failures inside the allocation


def task_errors(run_dir: Path, job_id: str) -> str:
    return "\n".join(p.read_text() for p in sorted((run_dir / "slurm" / job_id).glob(f"{job_id}_*_log.err")))


def wait_for_records(run_dir: Path, count: int, job_id: str, timeout_s: float) -> list[dict]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        records = restart_records(run_dir)
        if len(records) >= count:
            return records
        time.sleep(0.5)
    raise AssertionError(f"job {job_id}: {count} restart records not written in {timeout_s}s: "
                         f"{restart_records(run_dir)}")


@pytest.mark.slurm
def test_killed_rank_restarts_in_the_allocation(reference_run, shards, tmp_path):
    """kill -9 of one node's trainer: the agents of both nodes restart their trainers from the
    latest complete checkpoint in the same job (no requeue), and the run ends with the
    uninterrupted run's weights, bit for bit (fp32, CPU)."""
    ref_dir, _ = reference_run
    run_dir = tmp_path / "killed"
    job = submit(shards, run_dir, STEPS)
    with logs_on_failure(run_dir):
        wait_for_step(run_dir, 30, job)
        trainer_process(run_dir, 1).kill()
        assert wait_job(job, 300) == "COMPLETED"
        assert attempts(job) == ["COMPLETED"]  # restarted inside the allocation
        [record] = restart_records(run_dir)
        assert (record["kind"], record["rank"], record["cause"], record["restarted"]) == \
            ("failure", 1, "killed by SIGKILL", True)
        assert record["resume_step"] == 25 and record["last_logged_step"] >= 30
        assert record["steps_lost"] == record["last_logged_step"] - 25
        assert "attempt 1" in task_log(run_dir, job)
        assert f"resumed from {run_dir}/checkpoints/step_00000025 at step 25" in task_log(run_dir, job)
        assert results(run_dir, job) == ["finished", "finished"]
        a, b = load_weights(ref_dir), load_weights(run_dir)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), "final weights differ"


@pytest.mark.slurm
def test_stopped_rank_is_restarted_by_the_watchdog(slurm_cluster, shards, tmp_path):
    """SIGSTOP of one trainer: the other waits in a collective, its watchdog sees no step for
    train.hang_timeout_s, dumps its stacks and exits; both nodes restart and the run finishes."""
    hang_s = 20
    run_dir = tmp_path / "hung"
    job = submit(shards, run_dir, STEPS, extra=(f"train.hang_timeout_s={hang_s}",))
    with logs_on_failure(run_dir):
        wait_for_step(run_dir, 10, job)
        stopped = trainer_process(run_dir, 1)
        t0 = time.time()
        stopped.suspend()
        [record] = wait_for_records(run_dir, 1, job, hang_s + 90)
        print(f"hang noticed {record['time'] - t0:.1f}s after SIGSTOP (hang_timeout_s={hang_s})")
        assert record["cause"].startswith("hang") and record["exitcode"] == 124 and record["restarted"]
        assert record["time"] - t0 <= hang_s + 45  # the watchdog polls; the agent then tears down
        dumps = list((run_dir / "hangs").glob("rank0-*.txt"))
        assert dumps and "no progress for" in dumps[0].read_text() and "Thread" in dumps[0].read_text()
        assert wait_job(job, 300) == "COMPLETED"
        assert attempts(job) == ["COMPLETED"] and (run_dir / "finished").exists()


@pytest.mark.slurm
def test_max_failures_exhausted_fails_the_job_with_a_summary(slurm_cluster, shards, tmp_path):
    run_dir = tmp_path / "failing"
    job = submit(shards, run_dir, 5000, "--max-failures", "1")
    with logs_on_failure(run_dir):
        wait_for_step(run_dir, 5, job)
        trainer_process(run_dir, 0).kill()
        [first] = wait_for_records(run_dir, 1, job, 60)
        assert first["restarted"] and first["restarts_left"] == 0
        wait_for_step(run_dir, first["last_logged_step"] + 3, job, 120)  # the restarted attempt trains
        trainer_process(run_dir, 0).kill()
        assert wait_job(job, 180) == "FAILED"
        # the other node's agent may record its workers' end too (their peer is gone), in
        # either order with the kill's record
        records = wait_for_records(run_dir, 2, job, 30)
        kills = [r for r in records[1:] if r["rank"] == 0 and r["cause"] == "killed by SIGKILL"]
        assert len(kills) == 1 and not kills[0]["restarted"], records
        assert not any(r["restarted"] for r in records[1:])
        summary = task_errors(run_dir, job)
        assert "the run failed: killed by SIGKILL (after 1 restarts, --max-failures 1" in summary
        assert len(re.findall(r"failure \d: rank 0 on \S+: killed by SIGKILL", summary)) == 2, summary
        assert not (run_dir / "finished").exists()
