"""The run lock: one live launch per run folder (``<run_dir>/.lock``).

    lock = RunLock(run_dir)
    lock.check()      # a launcher, before starting anything: refuse if another launch is live
    lock.acquire()    # rank 0 of the trainer (the checkpoint manager), with a heartbeat thread
    lock.release()
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

from claver_dist.errors import RunLockedError
from claver_dist.files import atomic_write

log = logging.getLogger("claver_dist.runlock")

LOCK = ".lock"
_LIVE_JOB_STATES = {"PENDING", "RUNNING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "RESIZING", "SUSPENDED",
                    "COMPLETING", "CONFIGURING", "STOPPED", "SIGNALING", "STAGE_OUT"}


def launch_id() -> str:
    """What one launch of a run is called: its restarts and requeues share it, a second
    launch does not (set by launch/local.py and launch/slurm.py; else torchrun's or SLURM's)."""
    for var in ("CLAVER_LAUNCH_ID", "SLURM_JOB_ID", "TORCHELASTIC_RUN_ID"):
        value = os.environ.get(var)
        if value and value != "none":
            return value
    return f"{socket.gethostname()}:{os.getpid()}"


def _process_start(pid: int) -> float | None:
    import psutil

    try:
        proc = psutil.Process(pid)
        return None if proc.status() == psutil.STATUS_ZOMBIE else proc.create_time()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None


def _slurm_job_state(job: str) -> str | None:
    """SLURM's state of ``job``; None where SLURM cannot be asked."""
    if not shutil.which("scontrol"):
        return None
    try:
        res = subprocess.run(["scontrol", "show", "job", "-o", str(job)], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    if res.returncode != 0:
        return "UNKNOWN" if "Invalid job id" in res.stderr else None
    fields = dict(kv.split("=", 1) for kv in res.stdout.split() if "=" in kv)
    return fields.get("JobState")


class RunLock:
    """``<run_dir>/.lock``: one live launch per run folder.

    The holder (host, pid, SLURM job, launch id) refreshes a heartbeat in the file from a
    thread. Another launch that finds a live holder refuses to start, naming it; a holder
    that is gone (its SLURM job ended, its pid on this host died, or, where neither can be
    asked, no heartbeat for ``stale_s``) is taken over with a log line saying why. The
    restarts and requeues of one launch share its launch id and take the lock over
    silently."""

    def __init__(self, run_dir: str | Path, heartbeat_s: float = 30.0, stale_s: float = 300.0):
        self.path = Path(run_dir) / LOCK
        self.heartbeat_s, self.stale_s = heartbeat_s, stale_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._me: dict[str, Any] = {}

    def read(self) -> dict[str, Any] | None:
        try:
            return json.loads(self.path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, json.JSONDecodeError):
            return {}  # half-written by a holder that died mid-write: nobody's

    @staticmethod
    def describe(h: dict[str, Any]) -> str:
        job = f", SLURM job {h['job']}" if h.get("job") else ""
        return f"host {h.get('host')}, pid {h.get('pid')}{job}, launch {h.get('launch')}"

    def gone(self, h: dict[str, Any]) -> str | None:
        """Why holder ``h`` is gone, or None while it may be alive."""
        if not h:
            return "the lock file is unreadable"
        if h.get("job"):
            state = _slurm_job_state(h["job"])
            if state is not None:
                return None if state.split()[0] in _LIVE_JOB_STATES else f"SLURM job {h['job']} is {state}"
        if h.get("host") == socket.gethostname():
            start = _process_start(int(h.get("pid", -1)))
            if start is None or abs(start - float(h.get("pid_start") or start)) > 1.0:
                return f"pid {h.get('pid')} on {h.get('host')} is gone"
            return None
        age = time.time() - float(h.get("heartbeat", 0))
        return f"no heartbeat for {age:.0f}s" if age > self.stale_s else None

    def check(self) -> None:
        """Raise RunLockedError if another live launch holds the folder (nothing is written)."""
        h = self.read()
        if h is None or h.get("launch") == launch_id() or self.gone(h) is not None:
            return
        raise RunLockedError(f"{self.path.parent} is in use by a live run ({self.describe(h)}); "
                             f"wait for it to end, or remove {self.path} if you know that it has")

    def acquire(self) -> None:
        h = self.read()
        if h is not None and h.get("launch") != launch_id():
            why = self.gone(h)
            if why is None:
                self.check()  # raises
            log.warning("taking over the run lock of %s: %s", self.describe(h), why)
        pid = os.getpid()
        self._me = {"host": socket.gethostname(), "pid": pid, "pid_start": _process_start(pid),
                    "job": os.environ.get("SLURM_JOB_ID"), "launch": launch_id(), "started": time.time()}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._write()
        self._thread = threading.Thread(target=self._beat, name="claver-run-lock", daemon=True)
        self._thread.start()

    def _write(self) -> None:
        atomic_write(self.path, json.dumps({**self._me, "heartbeat": time.time()}))

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                if (self.read() or {}).get("launch") != self._me["launch"]:
                    log.error("the run lock %s was taken by another launch", self.path)
                    return
                self._write()
            except OSError:  # a full disk must not kill the run here; the checkpoint will say so
                pass

    def release(self) -> None:
        self._stop.set()
        if self._me and (self.read() or {}).get("launch") == self._me["launch"]:
            self.path.unlink(missing_ok=True)
