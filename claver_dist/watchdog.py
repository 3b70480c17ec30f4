"""Hang detection: a thread per rank that turns "no progress for too long" into a crash.

A rank that stops making progress (a stuck collective, a stuck data worker, a peer that
was stopped) would otherwise wait out the collective timeout, or forever. The watchdog
gives the launcher something it can act on: it writes the Python stacks of every thread
of the process to ``<run_dir>/hangs/`` and exits with ``HANG_EXIT_CODE``, which the
launchers treat as a failure and restart from the latest complete checkpoint.

    dog = Watchdog(timeout_s=600, dump_dir=run_dir / "hangs", rank=0)
    dog.start()
    for step in ...:
        ...
        dog.beat()          # progress: an optimiser step, an evaluation batch, a checkpoint written
    dog.stop()

The timeout is the longer of ``timeout_s`` and ``factor`` x the slowest of the recent
intervals between beats, so slow steps (large models, validation batches) never trip it;
before the first beat ``startup_s`` applies (model build, compilation, a universal
checkpoint conversion, the first batches).
"""

from __future__ import annotations

import faulthandler
import logging
import os
import socket
import sys
import threading
import time
from collections import deque
from pathlib import Path
from typing import Callable

log = logging.getLogger("claver_dist.watchdog")

# exit status of a rank the watchdog ended (GNU timeout's): launchers count it as a failure
HANG_EXIT_CODE = 124


class Watchdog:
    def __init__(self, timeout_s: float, dump_dir: str | Path, rank: int, startup_s: float = 1800.0,
                 factor: float = 10.0, poll_s: float | None = None,
                 on_hang: Callable[[str], None] | None = None):
        self.timeout_s = timeout_s
        self.startup_s = max(startup_s, timeout_s)
        self.factor = factor
        self.dump_dir = Path(dump_dir)
        self.rank = rank
        self.poll_s = poll_s if poll_s is not None else max(0.2, min(5.0, timeout_s / 10))
        self.on_hang = on_hang or self._exit
        self._last = time.monotonic()
        self._beats = 0
        self._intervals: deque[float] = deque(maxlen=50)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def start(self) -> None:
        self._last = time.monotonic()
        self._thread = threading.Thread(target=self._run, name="claver-watchdog", daemon=True)
        self._thread.start()

    def beat(self) -> None:
        """Progress was made (cheap: a clock read and a lock)."""
        now = time.monotonic()
        with self._lock:
            if self._beats:
                self._intervals.append(now - self._last)
            self._last = now
            self._beats += 1

    def deadline_s(self) -> float:
        """Seconds without a beat that count as a hang, now."""
        with self._lock:
            if not self._beats:
                return self.startup_s
            slowest = max(self._intervals, default=0.0)
        return max(self.timeout_s, self.factor * slowest)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.poll_s * 2)

    def _run(self) -> None:
        while not self._stop.wait(self.poll_s):
            with self._lock:
                idle = time.monotonic() - self._last
            limit = self.deadline_s()
            if idle > limit:
                what = "the first optimiser step" if not self._beats else "an optimiser step"
                self.on_hang(f"no progress for {idle:.0f}s (limit {limit:.0f}s, waiting for {what})")
                return

    def dump_stacks(self, reason: str) -> Path:
        """Every thread's Python stack to ``dump_dir/rank<r>-<host>-<pid>-<time>.txt``."""
        self.dump_dir.mkdir(parents=True, exist_ok=True)
        host, pid = socket.gethostname(), os.getpid()
        path = self.dump_dir / f"rank{self.rank}-{host}-{pid}-{time.strftime('%Y%m%dT%H%M%S')}.txt"
        with open(path, "w") as f:
            f.write(f"rank {self.rank} on {host} (pid {pid}): {reason}\n\n")
            f.flush()
            faulthandler.dump_traceback(file=f, all_threads=True)
        return path

    def _exit(self, reason: str) -> None:
        try:
            path = self.dump_stacks(reason)
            where = f"stacks of all threads in {path}"
        except OSError as e:  # a full or lost disk must not keep a hung rank alive
            where = f"stacks not written ({e})"
        msg = (f"watchdog: rank {self.rank} on {socket.gethostname()}: {reason}; {where}; "
               f"exiting with status {HANG_EXIT_CODE} so that the launcher restarts the run")
        log.error(msg)
        print(msg, file=sys.stderr, flush=True)
        os._exit(HANG_EXIT_CODE)
