"""Run the trainer's processes under torch's elastic agent (torchrun), restarting on failure.

Both launchers use it: ``launch/local.py`` on one machine, ``launch/slurm.py`` on every node
of an allocation (one agent per node, meeting through a c10d rendezvous on the first node).

    rc = run_elastic(ElasticRun(run_dir, train_args=[config, *overrides], nproc_per_node=2,
                                max_failures=3))

- **Restarts.** When a worker exits abnormally (a crash, a signal, 124 from the hang
  watchdog), torch's agent tears the worker group down (on every node: the other agents
  see the rendezvous change) and starts it again; the trainer resumes from the latest
  complete checkpoint. At most ``max_failures`` restarts; then the run fails with a
  summary. Workers that exit 2 (refused to start) or 3 (an error a restart cannot fix:
  ``claver_dist/train/main.py``) are not restarted.
- **Records.** Every failure the agent sees is appended to ``<run_dir>/restarts.jsonl``:
  time, cause, rank, host, exit code, the latest complete checkpoint and the steps lost.
  A node whose workers only lost their peers to another node's failure (recorded there
  within 5 s) says so in its log and writes no record: one failure, one record.
- **Stopping.** SIGINT (Ctrl-C) and SIGTERM to the launcher are passed to the workers as
  SIGTERM: they checkpoint at the end of the step and exit 0, and the launcher exits 0.
  torch's own handling (kill the workers 30 s after forwarding) is switched off for them.
  Trainers start with the stop signals blocked until their handlers are in place, and a
  stop that came before they started is passed to them: a stop is never a failure.

The agent is torch's ``LocalElasticAgent`` with one method extended to write the records
(``RecordingAgent``); everything else (rendezvous, restarts, process groups) is torchrun's.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

# worker exit codes that a restart cannot fix (claver_dist/train/main.py)
FATAL_EXIT_CODES = {2: "refused to start", 3: "an error a restart cannot fix"}
HANG_EXIT_CODE = 124  # claver_dist.watchdog
TRAIN_MODULE = "claver_dist.train"
# what a trainer treats as "checkpoint and stop" (claver_dist.train.signals.STOP_SIGNALS)
WORKER_STOP_SIGNALS = {signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2}


@dataclass
class ElasticRun:
    run_dir: Path
    train_args: list[str]                 # CONFIG [overrides...] for ``python -m <module>``
    nproc_per_node: int = 1
    nnodes: int = 1
    max_failures: int = 3
    rdzv_endpoint: str = "127.0.0.1:0"    # host:port of the c10d store (node 0 hosts it)
    rdzv_id: str = "claver"                # the same on every node and across restarts
    extra_signals: tuple[str, ...] = ()   # more signals passed on to the workers (SLURM: SIGUSR2)
    is_host: bool | None = None           # this node hosts the rendezvous store (None: by hostname)
    stopped_by: list[str] = field(default_factory=list)  # signals received (filled while running)
    module: str = TRAIN_MODULE            # what the workers run (claver_dist.preflight: measure, not train)


_RUN: ElasticRun | None = None  # the run of this launcher process, for the agent and the handlers


def _cause(exitcode: int, message: str) -> str:
    if exitcode == HANG_EXIT_CODE:
        return "hang: the watchdog saw no progress (stacks in <run_dir>/hangs/)"
    if exitcode < 0:
        try:
            return f"killed by {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"killed by signal {-exitcode}"
    if exitcode in FATAL_EXIT_CODES:
        return f"exit {exitcode}: {FATAL_EXIT_CODES[exitcode]}"
    message = _message_text(message)  # a dict when read from the worker's error file (torch's @record)
    first = message.strip().splitlines()[0] if message and "To enable traceback" not in message else ""
    return f"exit {exitcode}" + (f": {first[:600]}" if first else "")


# how a rank reports that another one died under it (gloo's TCP pairs, a socket closed mid-read)
_PEER_LOST = re.compile(r"closed by peer|reset by peer|broken pipe|connection refused", re.IGNORECASE)


def _message_text(message) -> str:
    return str(message.get("message", "")) if isinstance(message, dict) else str(message or "")


def _root_failure(failures: dict) -> tuple[int, object]:
    """(rank, failure) that started it. torch's agent SIGTERMs the rest of the group when one
    process fails and records those too; a rank that lost its peer fails with a connection
    error, and its error file can be stamped before the agent sees the killed one. So: first
    what failed on its own, then lost peers, then SIGTERMs; the earliest, then the lowest rank."""
    def order(kv):
        rank, f = kv
        tier = 2 if f.exitcode == -signal.SIGTERM else 1 if _PEER_LOST.search(_message_text(f.message)) else 0
        return tier, f.timestamp, rank

    return min(failures.items(), key=order)


def _progress(run_dir: Path) -> tuple[int | None, int | None]:
    """(latest complete checkpoint's step, last logged step) of the run folder."""
    from claver_dist.checkpoint import find_latest, read_meta

    latest = find_latest(run_dir / "checkpoints")
    ckpt = read_meta(latest)["step"] if latest is not None else None
    last = None
    metrics = run_dir / "metrics.jsonl"
    if metrics.exists():
        for line in metrics.read_text().splitlines():
            try:
                last = max(last or 0, int(json.loads(line).get("step", 0)))
            except (ValueError, AttributeError):
                continue
    return ckpt, last


def append_record(run_dir: Path, record: dict) -> None:
    """One line of ``<run_dir>/restarts.jsonl`` (failures, requeues)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / "restarts.jsonl", "a") as f:
        f.write(json.dumps({"time": time.time(), "host": socket.gethostname(), **record}) + "\n")


def _make_agent_class():
    from torch.distributed.elastic.agent.server.local_elastic_agent import LocalElasticAgent

    class RecordingAgent(LocalElasticAgent):
        """torch's agent; a failed worker group is recorded, and not restarted when the
        failure is one a restart cannot fix or the user asked the run to stop. Every start of
        the worker group is numbered (``CLAVER_ATTEMPT``, the same on every node: all agents
        meet in each rendezvous), so that the workers of one start never read what an earlier
        start left in the shared store (claver_dist.distributed.DistEnv.init)."""

        _starts = 0

        def _rendezvous(self, worker_group) -> None:
            super()._rendezvous(worker_group)
            RecordingAgent._starts += 1
            os.environ["CLAVER_ATTEMPT"] = str(RecordingAgent._starts - 1)  # inherited by the workers
            # --max-failures is the job's budget, not each node's: torch's agent counts only the
            # restarts its own workers' failures caused, and an agent that followed another
            # node's restart (a membership change) kept its count, so after the budget was spent
            # it would record a restart the closed rendezvous then refuses. Every start after
            # the first spends one restart on every node.
            spent = RecordingAgent._starts - 1
            self._remaining_restarts = min(self._remaining_restarts, worker_group.spec.max_restarts - spent)

        def _start_workers(self, worker_group):
            # The trainers start with the stop signals blocked (a mask survives exec) and unblock
            # them once their handlers are in place (claver_dist.train.signals.hold): a stop
            # sent while one is still starting waits for it instead of killing it.
            blocked = _RUN is not None and _RUN.module == TRAIN_MODULE
            if blocked:
                signal.pthread_sigmask(signal.SIG_BLOCK, WORKER_STOP_SIGNALS)
            try:
                pids = super()._start_workers(worker_group)
            finally:
                if blocked:
                    signal.pthread_sigmask(signal.SIG_UNBLOCK, WORKER_STOP_SIGNALS)
            if blocked and _RUN.stopped_by:  # a stop that came before these workers did
                sig = _worker_signal(getattr(signal, _RUN.stopped_by[-1]))
                for pid in pids.values():
                    try:
                        os.kill(pid, sig)
                    except ProcessLookupError:
                        pass
            return pids

        def _record(self, failure, rank: int, failures: dict, restart: bool, attempt: int) -> None:
            """The failure's line in restarts.jsonl (training runs) and in the node's log."""
            ckpt, last = _progress(_RUN.run_dir)
            if _RUN.module == TRAIN_MODULE:  # restarts.jsonl is the training's history
                append_record(_RUN.run_dir, {
                    "kind": "failure", "cause": _cause(failure.exitcode, failure.message), "rank": rank,
                    "exitcode": failure.exitcode, "failed_ranks": sorted(failures),
                    "other_causes": {str(r): _cause(f.exitcode, f.message)
                                     for r, f in sorted(failures.items()) if r != rank},
                    "restarted": restart, "restarts_left": self._remaining_restarts - 1 if restart else 0,
                    "resume_step": ckpt, "last_logged_step": last,
                    "steps_lost": None if last is None else last - (ckpt or 0), "launch": _RUN.rdzv_id,
                    "attempt": attempt})
            left = self._remaining_restarts - 1 if restart else 0
            print(f"claver-launch: rank {rank} on {socket.gethostname()}: "
                  f"{_cause(failure.exitcode, failure.message)}; "
                  + (f"restarting from step {ckpt or 0} ({left} restarts left)" if restart else "not restarting"),
                  file=sys.stderr, flush=True)

        def _monitor_workers(self, worker_group):
            result = super()._monitor_workers(worker_group)
            if result.is_failed() and _RUN is not None:
                rank, failure = _root_failure(result.failures)
                fatal = failure.exitcode in FATAL_EXIT_CODES or bool(_RUN.stopped_by)
                restart = not fatal and self._remaining_restarts > 0
                attempt = RecordingAgent._starts - 1
                if (_RUN.is_host is not None and _lost_peer(failure)
                        and _failed_elsewhere(_RUN, set(result.failures), attempt=attempt)):
                    # this node's workers died of another node's failure before the agent saw
                    # the membership change: that node records the failure, once
                    print(f"claver-launch: this node's workers lost their peers ({_cause(failure.exitcode, failure.message)}); "
                          f"another node's failure is recorded in {_RUN.run_dir / 'restarts.jsonl'}",
                          file=sys.stderr, flush=True)
                else:
                    self._record(failure, rank, result.failures, restart, attempt)
                if fatal:
                    self._remaining_restarts = 0
            return result

    return RecordingAgent


def _worker_signal(signum: int) -> int:
    """SIGINT and SIGTERM reach the workers as SIGTERM (one orderly stop), the others as they are."""
    return signal.SIGTERM if signum in (signal.SIGINT, signal.SIGTERM) else signum


def _forward(signum, frame) -> None:
    """SIGINT/SIGTERM (and the extra signals) to the launcher: the workers checkpoint and stop."""
    import psutil

    name = signal.Signals(signum).name
    if _RUN is not None:
        _RUN.stopped_by.append(name)
    worker_sig = _worker_signal(signum)
    print(f"claver-launch: received {name}: workers checkpoint and stop", file=sys.stderr, flush=True)
    # the trainers only (the agent's direct children, each in its own session): their data
    # workers must not see the signal
    for child in psutil.Process().children(recursive=False):
        try:
            child.send_signal(worker_sig)
        except psutil.Error:
            pass


def find_trainer(run_dir: Path, rank: int):
    """The live trainer process of ``rank`` of the run in ``run_dir`` on this machine (a
    ``psutil.Process``), or None: for fault injection (tools/chaos.py, the tests)."""
    import psutil

    for p in psutil.process_iter(["cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        try:
            if "claver_dist.train" in cmd and f"run_dir={run_dir}" in cmd and p.environ().get("RANK") == str(rank):
                return p
        except psutil.Error:
            continue
    return None


def _lost_peer(failure) -> bool:
    """A worker that died of another's failure: a closed connection, or its agent's SIGTERM."""
    return failure.exitcode == -signal.SIGTERM or bool(_PEER_LOST.search(_message_text(failure.message)))


def _failed_elsewhere(run: ElasticRun, own_ranks: set[int], wait_s: float = 5.0, attempt: int | None = None) -> bool:
    """Whether another node recorded a failure of its own (not a lost peer) in this launch:
    in start ``attempt`` of the workers, or else a final one. Its agent writes the record as
    it sees the failure, so wait a little for it."""
    path = run.run_dir / "restarts.jsonl"
    deadline = time.monotonic() + wait_s
    while True:
        records = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
        if any(r.get("kind") == "failure" and r.get("launch") == run.rdzv_id
               and (r.get("attempt") == attempt if attempt is not None else not r.get("restarted"))
               and r.get("rank") not in own_ranks and r.get("cause") != "killed by SIGTERM"
               and not _PEER_LOST.search(r.get("cause", "")) for r in records):
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)


def run_elastic(run: ElasticRun) -> int:
    """Run the workers to the end; 0 when they finished or stopped cleanly, else the failure's code."""
    global _RUN
    import torch.distributed.launcher.api as launcher_api
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun

    _RUN = run
    launcher_api.LocalElasticAgent = _make_agent_class()  # the one torch name launch_agent builds
    handled = ["SIGINT", "SIGTERM", *run.extra_signals]
    previous = {s: signal.signal(getattr(signal, s), _forward) for s in handled}
    argv = ["--nnodes", str(run.nnodes), "--nproc-per-node", str(run.nproc_per_node),
            "--rdzv-backend", "c10d", "--rdzv-endpoint", run.rdzv_endpoint, "--rdzv-id", run.rdzv_id,
            "--max-restarts", str(run.max_failures), "--monitor-interval", "0.5",
            # torch's handlers would kill the workers 30 s after passing the signal on: ours
            # pass it on and let them finish their checkpoint
            "--signals-to-handle", "SIGHUP,SIGQUIT",
            *(["--rdzv-conf", f"is_host={int(run.is_host)}"] if run.is_host is not None else []),
            "-m", run.module, *run.train_args]
    try:
        torchrun(argv)
        return 0
    except ChildFailedError as e:
        _, first = _root_failure(e.failures)
        code = first.exitcode if first.exitcode in FATAL_EXIT_CODES else 1
        records = [json.loads(line) for line in (run.run_dir / "restarts.jsonl").read_text().splitlines()] \
            if (run.run_dir / "restarts.jsonl").exists() else []
        failures = [r for r in records if r.get("kind") == "failure" and r.get("launch") == run.rdzv_id]
        restarts = sum(r["restarted"] for r in failures)
        if _lost_peer(first) and run.is_host is not None and (not run.is_host or _failed_elsewhere(run, set(e.failures))):
            # the summary comes from the node where the failure began: a node whose workers
            # only lost their peers (or were stopped by its agent) would name that as the
            # cause. Where every node only lost peers, the host's agent prints it.
            print(f"claver-launch: this node's workers ended: {_cause(first.exitcode, first.message)} (the run's "
                  f"failures, on every node: {run.run_dir / 'restarts.jsonl'})", file=sys.stderr, flush=True)
            return code
        print(f"claver-launch: the run failed: {_cause(first.exitcode, first.message)} "
              f"(after {restarts} restarts, --max-failures {run.max_failures}; every failure in "
              f"{run.run_dir / 'restarts.jsonl'})", file=sys.stderr, flush=True)
        for i, r in enumerate(failures, 1):
            print(f"  failure {i}: rank {r['rank']} on {r['host']}: {r['cause']} (latest checkpoint: step "
                  f"{r['resume_step']}, {r['steps_lost']} logged steps after it lost)", file=sys.stderr)
        return code
    finally:
        for s, h in previous.items():
            signal.signal(getattr(signal, s), h)
        _RUN = None

