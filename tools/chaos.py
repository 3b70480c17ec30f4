"""Chaos run: a small 2-node training on SLURM while faults are injected, checked against an
uninterrupted run.

    sudo scripts/slurm_cluster.sh up          # the local 2-node test cluster (or any SLURM with 2 CPU nodes)
    sudo python tools/chaos.py --seed 0        # root: the checkpoints live on a tmpfs it fills up

At steps drawn from ``--seed`` it injects, one at a time, each of:

  kill       SIGKILL of one rank's trainer          -> restart inside the allocation
  stop       SIGSTOP of one rank's trainer          -> the others' watchdog -> restart
  preempt    a job in the higher-priority partition  -> USR2, checkpoint, requeue
  timelimit  the job's time limit cut to ~1 minute   -> USR2, checkpoint, requeue
  save       the checkpoint file system filled up    -> the save fails, restart (space freed)

and waits for the run to recover before the next one. At the end the exported weights must
equal the uninterrupted run's bit for bit (fp32, CPU), and a table says what each fault
cost: how long until it was handled, how many steps were computed again, and the run's wall
time against the uninterrupted one. Exit status 0 when the weights are equal.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
FAULTS = ("kill", "stop", "preempt", "timelimit", "save")
SIGNAL_DELAY = 120  # --signal-delay of the runs: the 'timelimit' fault cuts the limit to within it


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="claver-chaos", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seed", type=int, default=0, help="draws the fault order, ranks and steps")
    p.add_argument("--steps", type=int, default=400, help="optimiser steps of the run (default 400: the run must "
                   "outlast SLURM's time-limit warning, which comes up to 30 s late)")
    p.add_argument("--faults", default=",".join(FAULTS), help=f"comma-separated subset of {','.join(FAULTS)}")
    p.add_argument("--out", default=str(REPO / "runs" / "chaos"), help="work folder (runs, shards, logs)")
    p.add_argument("--shards", default=None, help="shards to train on (default: synthetic motion shards)")
    p.add_argument("--timeout", type=float, default=1500, help="seconds for the whole chaos run")
    return p.parse_args(argv)


def log(msg: str) -> None:
    print(f"[chaos {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def sh(*cmd: str, check: bool = True) -> str:
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    if check and res.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed: {res.stderr.strip()}")
    return res.stdout


# --------------------------------------------------------------------------- the runs


def build_shards(out: Path) -> Path:
    """4 synthetic motion classes x 12 training videos, through the real shard builder."""
    from claver_dist.data.synthetic import MotionSpec, write_motion_dataset
    from tools.make_shards import main as make_shards

    shards = out / "shards"
    if (shards / "manifest.json").exists():
        return shards
    paths = write_motion_dataset(out / "videos", num_classes=4, per_class=12, val_per_class=2,
                                 spec=MotionSpec(width=80, height=64, min_frames=16, max_frames=20), seed=0)
    for split in ("train", "val"):
        rc = make_shards([str(paths[split]), "--labels", str(paths["labels"]), "--out", str(shards), "--split", split,
                          "--short-side", "64", "--workers", "1", "--no-progress"])
        if rc != 0:
            raise RuntimeError(f"make_shards failed for {split}")
    (shards / "labels.csv").write_text(paths["labels"].read_text())
    return shards


def overrides(shards: Path, run_dir: Path, steps: int) -> list[str]:
    return [f"data.train_shards={shards}", f"data.val_shards={shards}", f"text.labels={shards / 'labels.csv'}",
            f"run_dir={run_dir}", "data.batch_size=4", "data.num_workers=0", "log.every_steps=1",
            "log.count_flops=false", "log.progress_bar=false", "train.val_every_epochs=1000", "train.device=cpu",
            "train.precision=fp32", f"train.max_steps={steps}", "checkpoint.every_steps=5", "checkpoint.keep_last=1",
            "train.hang_timeout_s=20"]


def submit(shards: Path, run_dir: Path, steps: int, jobs: Path) -> str:
    import contextlib
    import io

    from launch import slurm

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = slurm.main(["--nodes", "2", "--gpus-per-node", "0", "--time", "10", "--signal-delay", str(SIGNAL_DELAY),
                         "--max-failures", "4", "--max-requeues", "4", "--folder", str(jobs / "%j"),
                         str(REPO / "configs/debug.yaml"), *overrides(shards, run_dir, steps)])
    if rc != 0:
        raise RuntimeError(f"submission failed: {out.getvalue()}")
    return out.getvalue().split("submitted job ")[1].split(":")[0]


def logged_step(run_dir: Path, since: float = 0.0) -> int:
    """The highest training step logged (after the time ``since``)."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return 0
    best = 0
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if "loss" in row and row["time"] > since:
            best = max(best, row["step"])
    return best


def records(run_dir: Path) -> list[dict]:
    path = run_dir / "restarts.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def trainer(run_dir: Path, rank: int):
    from launch.elastic import find_trainer

    return find_trainer(run_dir, rank)


class Chaos:
    def __init__(self, run_dir: Path, job: str, deadline: float, steps: int):
        self.run_dir, self.job, self.deadline, self.steps = run_dir, job, deadline, steps

    def wait(self, what: str, cond, poll: float = 0.5) -> None:
        from launch import slurm

        while not cond():
            state, _ = slurm.job_state(self.job)
            if state in slurm.FINAL_STATES or time.monotonic() > self.deadline:
                if state == "COMPLETED" and cond():
                    return
                hint = " (the run ended first: give it more --steps)" if state == "COMPLETED" else ""
                raise RuntimeError(f"job {self.job} is {state} while waiting for {what}{hint}")
            time.sleep(poll)

    def new_record(self, before: int, kind: str | None = None) -> dict:
        self.wait(f"a record after {before}", lambda: len(records(self.run_dir)) > before and
                  (kind is None or records(self.run_dir)[-1]["kind"] == kind))
        return records(self.run_dir)[-1]

    def recovered(self, rec: dict) -> None:
        """Training goes on after the fault: two steps past its resume point, logged after it."""
        step = min(max(rec.get("resume_step") or 0, rec.get("step") or 0) + 2, self.steps)
        self.wait(f"step {step} after the fault", lambda: logged_step(self.run_dir, since=rec["time"]) >= step)

    # each fault: inject, wait until it has been handled and training goes on; returns its row
    def kill(self, rng: random.Random) -> dict:
        rank, n = rng.randrange(2), len(records(self.run_dir))
        self.wait(f"rank {rank}", lambda: trainer(self.run_dir, rank) is not None)
        trainer(self.run_dir, rank).kill()
        rec = self.new_record(n, "failure")
        return {"what": f"SIGKILL rank {rank}", "handled": "restart", "lost": rec["steps_lost"] or 0, "rec": rec}

    def stop(self, rng: random.Random) -> dict:
        rank, n = rng.randrange(2), len(records(self.run_dir))
        self.wait(f"rank {rank}", lambda: trainer(self.run_dir, rank) is not None)
        trainer(self.run_dir, rank).suspend()
        rec = self.new_record(n, "failure")
        return {"what": f"SIGSTOP rank {rank}", "handled": f"restart ({rec['cause'].split(':')[0]})",
                "lost": rec["steps_lost"] or 0, "rec": rec}

    def preempt(self, rng: random.Random) -> dict:
        n = len(records(self.run_dir))
        nodes = sh("squeue", "-h", "-j", self.job, "-o", "%N").strip()  # the run's nodes, not idle ones
        sh("sbatch", "--parsable", "-p", "urgent", "-N", "2", "-w", nodes, "--exclusive", "-o", "/dev/null",
           "--wrap", "sleep 2")
        rec = self.new_record(n, "requeue")
        return {"what": "preemption (urgent job)", "handled": "requeue", "lost": 0, "rec": rec}

    def timelimit(self, rng: random.Random) -> dict:
        n = len(records(self.run_dir))
        elapsed = sh("squeue", "-h", "-j", self.job, "-o", "%M").strip() or "0:00"
        parts = [int(x) for x in elapsed.replace("-", ":").split(":")]
        seconds = parts[-1] + 60 * (parts[-2] if len(parts) >= 2 else 0) + 3600 * (parts[-3] if len(parts) >= 3 else 0)
        # the whole minute at which the warning (SIGNAL_DELAY s before the limit) is already due,
        # and the limit itself still more than a minute away: SLURM signals at its next check
        minutes = (seconds + SIGNAL_DELAY) // 60
        sh("scontrol", "update", f"JobId={self.job}", f"TimeLimit={minutes}")
        rec = self.new_record(n, "requeue")
        sh("scontrol", "update", f"JobId={self.job}", "TimeLimit=10", check=False)  # the next attempt runs on
        return {"what": f"time limit cut to {minutes} min", "handled": "requeue", "lost": 0, "rec": rec}

    def save(self, rng: random.Random) -> dict:
        n = len(records(self.run_dir))
        disk = self.run_dir / "checkpoints"
        filler = disk / "filler"

        def failed() -> bool:
            # topped up at every poll: filled while a new checkpoint and the one it replaces were
            # both on disk, the pruning of the old one would leave room for every later save
            fill_up(disk, filler, leave=2 * 2**20)  # the next checkpoint (tens of MB) cannot be written
            recs = records(self.run_dir)
            return len(recs) > n and recs[-1]["kind"] == "failure"

        self.wait("a failed checkpoint save", failed)
        rec = records(self.run_dir)[-1]
        filler.unlink()
        return {"what": "checkpoint disk full", "handled": "restart", "lost": rec["steps_lost"] or 0, "rec": rec}


def fill_up(disk: Path, filler: Path, leave: int) -> None:
    """Grow ``filler`` until ``disk`` has about ``leave`` bytes free. The run keeps saving while
    this happens, so the free space measured a moment ago may be gone: on ENOSPC, measure
    again and ask for less."""
    with open(filler, "ab") as f:  # grows an earlier filler
        for _ in range(50):
            st = os.statvfs(disk)
            want = os.fstat(f.fileno()).st_size + st.f_bavail * st.f_frsize - leave
            if want <= os.fstat(f.fileno()).st_size:
                return
            try:
                os.posix_fallocate(f.fileno(), 0, want)
                return
            except OSError as e:
                if e.errno != errno.ENOSPC:
                    raise
        raise RuntimeError(f"could not fill {disk} to {leave} bytes free")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    faults = [f for f in args.faults.split(",") if f]
    unknown = sorted(set(faults) - set(FAULTS))
    if unknown:
        print(f"chaos: unknown faults {unknown} (known: {', '.join(FAULTS)})", file=sys.stderr)
        return 2
    if "save" in faults and os.geteuid() != 0:
        print("chaos: the 'save' fault mounts a tmpfs: run as root, or leave it out with --faults", file=sys.stderr)
        return 2
    sys.path.insert(0, str(REPO))
    from launch import slurm
    from safetensors.torch import load_file

    out = Path(args.out).absolute()
    if out.exists():
        subprocess.run(["umount", "-l", str(out / "chaos" / "checkpoints")], capture_output=True)
        subprocess.run(["rm", "-rf", str(out)], check=True)
    out.mkdir(parents=True)
    shards = Path(args.shards).absolute() if args.shards else build_shards(out)
    rng = random.Random(args.seed)
    order = rng.sample(faults, len(faults))
    if "timelimit" in order:  # first: SLURM sends the warning up to 30 s late, the run must outlast that
        order.remove("timelimit")                # (at ~6 steps/s on 2 idle cores: keep --steps >= 400)
        order.insert(0, "timelimit")
    points = sorted(rng.sample(range(int(0.1 * args.steps), int(0.8 * args.steps)), len(order)))

    log(f"reference run: {args.steps} steps, 2 nodes x 1 process")
    t0 = time.monotonic()
    ref_dir = out / "reference"
    ref_job = submit(shards, ref_dir, args.steps, out / "jobs")
    if slurm.wait(ref_job, args.timeout) != "COMPLETED":
        raise RuntimeError(f"the reference job {ref_job} did not complete")
    ref_wall = time.monotonic() - t0

    run_dir = out / "chaos"
    if "save" in faults:  # the checkpoints on a small file system the 'save' fault can fill
        (run_dir / "checkpoints").mkdir(parents=True)
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=200m", "tmpfs", str(run_dir / "checkpoints")], check=True)
    log(f"chaos run: faults {order} at steps {points}")
    t0 = time.monotonic()
    job = submit(shards, run_dir, args.steps, out / "jobs")
    chaos = Chaos(run_dir, job, time.monotonic() + args.timeout, args.steps)
    rows = []
    try:
        for fault, step in zip(order, points):
            chaos.wait(f"step {step}", lambda: logged_step(run_dir) >= step)
            at, t_inject = logged_step(run_dir), time.time()
            row = getattr(chaos, fault)(rng)
            row.update(fault=fault, at=at, detected_s=row["rec"]["time"] - t_inject)
            log(f"{fault} at step {at}: {row['handled']} ({row['rec'].get('cause', 'requeued')})")
            chaos.recovered(row["rec"])
            rows.append(row)
        state = slurm.wait(job, max(60.0, chaos.deadline - time.monotonic()))
    except BaseException:
        # the tool itself failed: stop the run before its checkpoint folder is unmounted under it
        # (a run left going would meet an empty folder and restart from step 0, a second fault)
        subprocess.run(["scancel", job], capture_output=True)
        slurm.wait(job, 120)
        raise
    finally:
        if "save" in faults:
            subprocess.run(["umount", "-l", str(run_dir / "checkpoints")], capture_output=True)
    wall = time.monotonic() - t0
    a, b = load_file(str(ref_dir / "export/model.safetensors")), load_file(str(run_dir / "export/model.safetensors"))
    equal = state == "COMPLETED" and a.keys() == b.keys() and all(bool((a[k] == b[k]).all()) for k in a)
    failures = sum(r["kind"] == "failure" for r in records(run_dir))
    restarts = sum(r["handled"].startswith("restart") for r in rows)
    requeues = sum(r["kind"] == "requeue" for r in records(run_dir))

    print(f"\nchaos run, seed {args.seed}: {args.steps} steps on 2 nodes (gloo, CPU), job {job}")
    print("| fault | at step | injected | handled by | handled after (s) | steps recomputed |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['fault']} | {r['at']} | {r['what']} | {r['handled']} | {r['detected_s']:.1f} | {r['lost']} |")
    print(f"\nfaults injected: {len(rows)}; restarts in the allocation: {restarts}; requeues: {requeues}; "
          f"steps recomputed: {sum(r['lost'] for r in rows)} (failure records: {failures}; a failure seen on "
          "both nodes is recorded by each)")
    print(f"wall time: {wall:.0f} s against {ref_wall:.0f} s uninterrupted (overhead {wall - ref_wall:+.0f} s, "
          f"{100 * (wall / ref_wall - 1):+.0f}%)")
    print(f"final job state: {state}; final weights bitwise equal to the uninterrupted run: {'yes' if equal else 'NO'}")
    return 0 if equal else 1


if __name__ == "__main__":
    sys.exit(main())
