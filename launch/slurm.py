"""Start a training run on a SLURM cluster through submitit, restarted inside the allocation
when a rank fails or hangs, and requeued on preemption and time limits until it has finished.

    python launch/slurm.py --nodes 2 configs/k400_b16_8f.yaml              # 2 nodes x 8 GPUs = 16 ranks
    python launch/slurm.py --nodes 8 --dry-run configs/k400_l14.yaml      # print the plan and sbatch script
    python launch/slurm.py --nodes 2 --gpus-per-node 0 --partition cpu configs/debug.yaml   # CPU: 1 rank/node
    python launch/slurm.py --preflight --nodes 4 configs/k400_l14.yaml    # measure the allocation, wait, report

One SLURM task per node runs torch's elastic agent (launch/elastic.py), which starts that
node's trainer processes (one per GPU, ``--tasks-per-node`` on CPU); the agents meet in a
c10d rendezvous on the job's first node. nccl on GPUs, gloo on CPU. The job folder is
``<run_dir>/slurm/<job id>/``: the sbatch script, submitit's pickles, and one log pair per
node (``<job id>_<node>_log.out|err``) holding its agent's and trainers' output.

Failures (docs/slurm.md): a trainer that crashes, is killed or hangs (the watchdog exits
it) makes every node's agent tear its trainers down and start them again from the latest
complete checkpoint, in the same allocation, at most ``--max-failures`` times; then the job
fails with a summary. Every failure and requeue is a line of ``<run_dir>/restarts.jsonl``.

Preemption and time limits: the job asks SLURM for ``--signal=USR2@<delay>`` (sent before
the time limit, and at preemption where the cluster sets preempt_send_user_signal). On
USR2 the trainers save a checkpoint at the end of the step and exit; then node 0 runs
``scontrol requeue`` and the job starts again from that checkpoint, at most
``--max-requeues`` times (SLURM_RESTART_COUNT). SIGTERM and SIGUSR1 (scancel, the end of
the grace time) also save, but never requeue: a cancelled job stays cancelled. A run with
``<run_dir>/finished`` is never trained again.

``--preflight`` submits a short job on the same allocation shape that runs
``claver_dist.preflight`` instead of the trainer (devices, all-reduce, shard reads, loader
clips/s, free space, shared folder, clocks; one table per node, ``<run_dir>/preflight.json``,
an estimate of the run's time), waits for it, prints the tables and exits 0 when every check
passed. No restarts, no requeue; the time limit defaults to 20 minutes.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# signal SLURM sends before the time limit and at preemption: save, then requeue. submitit's
# default too; USR1 and TERM already mean "save and stop" to the trainer, without requeue.
REQUEUE_SIGNAL = "USR2"
# variables a torchrun (or an earlier in-process trainer: DistEnv.init exports them) may have
# left in the submitting shell; sbatch copies that environment into every task, where they
# would take precedence over SLURM's own variables in DistEnv.from_environ.
_INHERITED_DIST_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK",
                        "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID")
# default time limit of a --preflight job, in minutes (it needs one or two)
PREFLIGHT_TIME_MIN = 20
# job states after which nothing more will happen to a job (sacct / squeue spelling)
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
                "DEADLINE", "PREEMPTED", "SPECIAL_EXIT", "REVOKED"}

log = logging.getLogger("claver_dist.slurm")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="claver-slurm", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nodes", type=int, required=True, help="nodes to run on")
    p.add_argument("--gpus-per-node", type=int, default=8,
                   help="GPUs per node, one task each (default 8); 0 = a CPU partition")
    p.add_argument("--tasks-per-node", type=int, default=None,
                   help="trainer processes (ranks) per node (default: one per GPU, or 1 on a CPU partition)")
    p.add_argument("--cpus-per-task", type=int, default=None,
                   help="CPUs per trainer process (default 8 with GPUs, 1 without); sets OMP_NUM_THREADS")
    p.add_argument("--mem", default=None, help="memory per node, sbatch syntax (e.g. 480G; 0 = all of it)")
    p.add_argument("--partition", default=None)
    p.add_argument("--account", default=None)
    p.add_argument("--qos", default=None)
    p.add_argument("--constraint", default=None)
    p.add_argument("--time", type=int, default=None,
                   help="time limit per job in minutes (default 1440; 20 with --preflight)")
    p.add_argument("--signal-delay", type=int, default=120,
                   help="seconds before the time limit that SLURM sends USR2 (default 120; SLURM "
                        "sends it up to 30 s earlier: it checks time limits every 30 s)")
    p.add_argument("--max-requeues", type=int, default=10,
                   help="requeues (time limit, preemption) before a stopped run is left stopped (default 10)")
    p.add_argument("--max-failures", type=int, default=3,
                   help="restarts in the allocation after a crashed or hung rank before the job fails (default 3)")
    p.add_argument("--job-name", default=None, help="default: the config's name")
    p.add_argument("--folder", default=None, help="job folder (default <run_dir>/slurm/%%j)")
    p.add_argument("--preflight", action="store_true",
                   help="measure the allocation with this config instead of training; wait and print the report")
    p.add_argument("--dry-run", action="store_true",
                   help="print the resolved config and the sbatch script; submit nothing")
    p.add_argument("config", help="YAML recipe, e.g. configs/k400_b16_8f.yaml")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.lr=1e-4")
    return p.parse_args(argv)


# --------------------------------------------------------------------------- plan (submit side)


@dataclass
class Plan:
    """What will be submitted: the resolved numbers, sbatch parameters and the task to run."""

    nodes: int
    tasks_per_node: int     # trainer processes per node (one SLURM task per node runs them)
    gpus_per_node: int
    cpus_per_task: int      # per trainer process
    run_dir: Path
    folder: Path
    params: dict[str, Any] = field(default_factory=dict)   # submitit SlurmExecutor parameters

    @property
    def world_size(self) -> int:
        return self.nodes * self.tasks_per_node

    @property
    def backend(self) -> str:
        return "nccl" if self.gpus_per_node > 0 else "gloo"


def make_plan(args: argparse.Namespace, cfg) -> Plan:
    """Resolve defaults and check the numbers; raises ValueError with the offending option."""
    gpus = args.gpus_per_node
    preflight = getattr(args, "preflight", False)
    time_min = args.time if args.time is not None else (PREFLIGHT_TIME_MIN if preflight else 1440)
    tasks = args.tasks_per_node if args.tasks_per_node is not None else max(gpus, 1)
    cpus = args.cpus_per_task if args.cpus_per_task is not None else (8 if gpus else 1)
    for name, value, low in (("--nodes", args.nodes, 1), ("--gpus-per-node", gpus, 0), ("--tasks-per-node", tasks, 1),
                             ("--cpus-per-task", cpus, 1), ("--time", time_min, 1),
                             ("--signal-delay", args.signal_delay, 0), ("--max-requeues", args.max_requeues, 0),
                             ("--max-failures", args.max_failures, 0)):
        if value < low:
            raise ValueError(f"{name} must be >= {low}, got {value}")
    if gpus and tasks != gpus:
        raise ValueError(f"--tasks-per-node {tasks} != --gpus-per-node {gpus}: the trainer runs one task per GPU")
    if gpus and cfg.train.device == "cpu":
        raise ValueError("--gpus-per-node > 0 but the config says train.device=cpu (use --gpus-per-node 0)")
    if args.signal_delay >= time_min * 60:
        raise ValueError(f"--signal-delay {args.signal_delay}s is not shorter than --time {time_min} min")
    run_dir = cfg.resolved_run_dir().absolute()
    folder = Path(args.folder).absolute() if args.folder else run_dir / "slurm" / "%j"
    params: dict[str, Any] = {
        "job_name": args.job_name or (f"{cfg.name}-preflight" if preflight else cfg.name),
        "nodes": args.nodes,
        "ntasks_per_node": 1,  # the node's agent; it starts the node's trainer processes
        "cpus_per_task": cpus * tasks,
        "time": time_min,
        "signal_delay_s": args.signal_delay,
        # pinned rather than submitit's SUBMITIT_PREEMPT_SIGNAL default; --requeue: some
        # clusters set JobRequeue=0, and `scontrol requeue` needs the job to be requeueable
        "additional_parameters": {"signal": f"{REQUEUE_SIGNAL}@{args.signal_delay}", "requeue": True},
    }
    if gpus:
        params["gpus_per_node"] = gpus
    for key in ("partition", "account", "qos", "constraint", "mem"):
        if getattr(args, key) is not None:
            params[key] = getattr(args, key)
    return Plan(args.nodes, tasks, gpus, cpus, run_dir, folder, params)


def sbatch_script(plan: Plan) -> str:
    """The sbatch script submitit writes for this plan (its own generator, no cluster needed)."""
    from submitit.slurm.slurm import _make_sbatch_string

    command = " ".join([shlex.quote(sys.executable), "-u -m submitit.core._submit", shlex.quote(str(plan.folder))])
    return _make_sbatch_string(command=command, folder=plan.folder, **plan.params)


# --------------------------------------------------------------------------- the task (job side)


class TrainTask:
    """What the task on every node runs (pickled by submitit): the node's elastic agent, and
    the requeue when told to.

    Returns "finished" or "stopped" (the submitit result of each node's task), and raises
    when the run failed beyond ``max_failures`` restarts. When the run is requeued, no task
    returns: they exit without a result, so that submitit (and anyone waiting on the job)
    does not take the interrupted attempt for the outcome."""

    def __init__(self, config: str, overrides: list[str], cwd: str, max_requeues: int, max_failures: int = 3,
                 procs_per_node: int = 1, module: str = "claver_dist.train"):
        self.config = config
        self.module = module  # claver_dist.preflight: measure the allocation, no training
        self.overrides = list(overrides)
        self.cwd = cwd
        self.max_requeues = max_requeues
        self.max_failures = max_failures
        self.procs_per_node = procs_per_node
        self._early: list[str] = []

    def _early_signal(self, signum: int, frame) -> None:
        # a signal before the agent runs (a time-limit warning during start-up): remembered
        self._early.append(signal.Signals(signum).name)

    def _prepare_process(self) -> None:
        os.chdir(self.cwd)  # relative paths in the config mean what they meant at submission
        for var in _INHERITED_DIST_VARS:
            os.environ.pop(var, None)
        cpus = int(os.environ.get("SLURM_CPUS_PER_TASK", "0") or 0)
        if cpus:
            os.environ["OMP_NUM_THREADS"] = str(max(1, cpus // self.procs_per_node))
        # replace submitit's USR2 handler, which would requeue and exit at once, mid-save
        for sig in (signal.SIGTERM, signal.SIGUSR1, getattr(signal, "SIG" + REQUEUE_SIGNAL)):
            signal.signal(sig, self._early_signal)

    def __call__(self) -> str:
        self._prepare_process()
        try:
            return self._run()
        finally:
            # the outcome is decided: from now on the requeue signal means nothing. Ignored,
            # it stays ignored while the interpreter shuts down (Python then puts back the
            # default action of the signals it handled, and USR2's kills the process: a
            # finished job was reported FAILED when its time-limit warning came that late)
            signal.signal(getattr(signal, "SIG" + REQUEUE_SIGNAL), signal.SIG_IGN)

    def _run(self) -> str:
        from claver_dist.checkpoint import find_latest, read_meta
        from claver_dist.config import load_config
        from claver_dist.distributed import _first_slurm_host
        from claver_dist.train.metrics import setup_logging
        from claver_dist.train.trainer import FINISHED
        from launch.elastic import TRAIN_MODULE, ElasticRun, append_record, run_elastic

        cfg = load_config(self.config, self.overrides)
        job = os.environ["SLURM_JOB_ID"]
        node = int(os.environ.get("SLURM_NODEID", "0"))
        setup_logging(node)  # node 0's agent speaks for the job
        nnodes = int(os.environ.get("SLURM_NNODES") or os.environ.get("SLURM_JOB_NUM_NODES") or 1)
        restarts = int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0)
        master = _first_slurm_host(os.environ.get("SLURM_JOB_NODELIST", "127.0.0.1"))
        # the same on every node; 15000-29999 stays below Linux's ephemeral range
        port = 15000 + int(job) % 15000
        print(f"claver-slurm: job {job} restart {restarts} node {os.environ.get('SLURMD_NODENAME')} "
              f"({node} of {nnodes}) {self.procs_per_node} processes rendezvous {master}:{port}", flush=True)
        run_dir = cfg.resolved_run_dir()
        if self.module != TRAIN_MODULE:
            return self._run_once(run_dir, job, node, nnodes, restarts, master, port)
        if (run_dir / FINISHED).exists():
            log.info("%s is finished (%s exists): nothing to do", run_dir, FINISHED)
            return "finished"
        # the run lock's owner: every requeue of this job is the same launch
        os.environ["CLAVER_LAUNCH_ID"] = f"slurm-{job}"
        run = ElasticRun(run_dir=run_dir, train_args=[self.config, *self.overrides],
                         nproc_per_node=self.procs_per_node, nnodes=nnodes, max_failures=self.max_failures,
                         rdzv_endpoint=f"{master}:{port}", rdzv_id=f"slurm-{job}-{restarts}",
                         extra_signals=("SIGUSR1", "SIG" + REQUEUE_SIGNAL), is_host=node == 0,
                         stopped_by=list(self._early))
        rc = run_elastic(run)
        if rc != 0:
            raise RuntimeError(f"training failed on node {node} (exit {rc}); every failure is in "
                               f"{run_dir / 'restarts.jsonl'}")
        if (run_dir / FINISHED).exists():
            return "finished"
        latest = find_latest(run_dir / "checkpoints")
        step = read_meta(latest)["step"] if latest is not None else 0
        if "SIG" + REQUEUE_SIGNAL not in run.stopped_by:
            log.info("stopped at step %d by SIGTERM/SIGUSR1: not requeued", step)
            return "stopped"
        if restarts >= self.max_requeues:
            log.warning("stopped at step %d: not requeued, %d requeues done (--max-requeues %d)",
                        step, restarts, self.max_requeues)
            return "stopped"
        if node == 0:
            if not self._requeue(job, restarts, step, run_dir):
                return "stopped"
            append_record(run_dir, {"kind": "requeue", "job": job, "restart_count": restarts, "step": step})
        # requeued: leave without a result (SystemExit is not an error to submitit)
        raise SystemExit(0)

    def _run_once(self, run_dir: Path, job: str, node: int, nnodes: int, restarts: int, master: str,
                  port: int) -> str:
        """Another module than the trainer (the preflight): once, no restarts, no requeue."""
        from launch.elastic import ElasticRun, run_elastic

        os.environ["CLAVER_LAUNCH_ID"] = f"slurm-{job}"
        rc = run_elastic(ElasticRun(run_dir=run_dir, train_args=[self.config, *self.overrides],
                                    nproc_per_node=self.procs_per_node, nnodes=nnodes, max_failures=0,
                                    rdzv_endpoint=f"{master}:{port}", rdzv_id=f"slurm-{job}-{restarts}",
                                    is_host=node == 0, module=self.module))
        if rc != 0:
            raise RuntimeError(f"{self.module} failed on node {node} (exit {rc}); see {run_dir / 'preflight.json'} "
                               "and the node logs")
        return "passed"

    def _requeue(self, job_id: str, restarts: int, step: int, run_dir: Path) -> bool:
        res = subprocess.run(["scontrol", "requeue", job_id], capture_output=True, text=True, timeout=60)
        if res.returncode != 0:
            log.error("scontrol requeue %s failed (%d): %s", job_id, res.returncode, res.stderr.strip())
            return False
        record = {"job_id": job_id, "restart_count": restarts, "step": step, "time": time.time()}
        (run_dir / "slurm").mkdir(parents=True, exist_ok=True)
        with open(run_dir / "slurm" / "requeues.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        log.info("checkpoint at step %d saved; job %s requeued (requeue %d of at most %d)",
                 step, job_id, restarts + 1, self.max_requeues)
        return True


# --------------------------------------------------------------------------- submit and watch


def submit(plan: Plan, task: TrainTask):
    """Submit through submitit; returns its Job (job.job_id, job.paths)."""
    import submitit

    plan.run_dir.mkdir(parents=True, exist_ok=True)
    (plan.run_dir / "slurm").mkdir(exist_ok=True)
    executor = submitit.SlurmExecutor(folder=plan.folder, max_num_timeout=task.max_requeues)
    executor.update_parameters(**plan.params)
    return executor.submit(task)


def job_state(job_id: str) -> tuple[str, int]:
    """(state, restarts) of a job: squeue while slurmctld knows it, then accounting (sacct)."""
    out = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True, timeout=30)
    if out.returncode == 0 and "JobState=" in out.stdout:
        fields = dict(kv.split("=", 1) for kv in out.stdout.split() if "=" in kv)
        return fields["JobState"], int(fields.get("Restarts", "0"))
    out = subprocess.run(["sacct", "-n", "-X", "-P", "-D", "-j", job_id, "-o", "State"],
                         capture_output=True, text=True, timeout=30)
    states = out.stdout.split()
    if out.returncode != 0 or not states:
        return "UNKNOWN", 0
    return states[-1].split()[0], sum(s == "REQUEUED" for s in states)


def wait(job_id: str, timeout_s: float, poll_s: float = 3.0) -> str:
    """Wait, at most ``timeout_s``, until the job is in a final state; return it (else TimeoutError)."""
    deadline = time.monotonic() + timeout_s
    while True:
        state, _ = job_state(job_id)
        if state in FINAL_STATES:
            return state
        if time.monotonic() > deadline:
            raise TimeoutError(f"job {job_id} still {state} after {timeout_s:.0f}s")
        time.sleep(poll_s)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from claver_dist.config import ConfigError, load_config, to_dict

    config = str(Path(args.config).absolute())
    try:
        cfg = load_config(config, args.overrides)
        plan = make_plan(args, cfg)
    except (ConfigError, ValueError) as e:
        print(f"claver-slurm: {e}", file=sys.stderr)
        return 2
    summary = (f"{plan.nodes} nodes x {plan.tasks_per_node} processes = {plan.world_size} ranks "
               f"({plan.backend}, {plan.gpus_per_node} GPUs/node, {plan.cpus_per_task} CPUs/process)")
    if args.dry_run:
        import yaml

        print(f"# claver-slurm dry run: {summary}\n# run folder: {plan.run_dir}\n# job folder: {plan.folder}")
        print("# ---- resolved config")
        print(yaml.safe_dump(to_dict(cfg), sort_keys=False), end="")
        print("# ---- sbatch script")
        print(sbatch_script(plan))
        return 0
    module = "claver_dist.preflight" if args.preflight else "claver_dist.train"
    task = TrainTask(config, args.overrides, os.getcwd(), args.max_requeues, args.max_failures, plan.tasks_per_node,
                     module=module)
    job = submit(plan, task)
    paths = job.task(0).paths
    print(f"submitted job {job.job_id}: {summary}")
    print(f"  run folder: {plan.run_dir}")
    print(f"  job folder: {paths.folder}")
    print(f"  logs:       {paths.stdout} (rank 0), {paths.stderr}; "
          f"{paths.folder}/{job.job_id}_<rank>_log.out|err for the others")
    print(f"  follow: tail -f {paths.stdout}    cancel: scancel {job.job_id}", flush=True)
    if args.preflight:
        return wait_for_preflight(job.job_id, plan.run_dir, paths.folder)
    return 0


def wait_for_preflight(job_id: str, run_dir: Path, folder: Path) -> int:
    """Wait for a preflight job; print its report; 0 when every check passed."""
    print(f"waiting for preflight job {job_id} (Ctrl-C stops waiting, not the job)", flush=True)
    try:
        state = wait(job_id, timeout_s=7 * 86400, poll_s=5.0)
    except KeyboardInterrupt:
        print(f"stopped waiting; the report will be in {run_dir / 'preflight.json'}")
        return 130
    try:
        report = json.loads((run_dir / "preflight.json").read_text())
    except (OSError, ValueError):
        report = None
    if report is None or report.get("launch") != f"slurm-{job_id}":
        print(f"claver-slurm: preflight job {job_id} ended {state} without a report; logs in {folder}",
              file=sys.stderr)
        return 1
    print(report["text"])
    if not report["passed"]:
        print(f"claver-slurm: preflight failed: {', '.join(report['failed'])}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    # run from the package module, so that submitit pickles TrainTask by reference
    # (launch.slurm.TrainTask) rather than by value from __main__
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from launch.slurm import main as _main

    sys.exit(_main())
