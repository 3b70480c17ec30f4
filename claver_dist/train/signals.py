"""Stop signals received before the trainer listens for them.

SLURM's time-limit warning (SIGUSR2), preemption (SIGTERM) or a launcher passing a stop on can
reach a rank while it still imports torch or loads a checkpoint; the default action of
SIGUSR1/SIGUSR2 is to kill the process, which the launcher then counts as a failure. The
launcher starts the trainers with these signals blocked; the entry point calls :func:`hold`
first thing (handlers, then unblock), and the trainer, once it listens, takes what was
held (:func:`take`) and stops at the end of its first step. Ctrl-C keeps Python's default
(KeyboardInterrupt) until the trainer listens: interrupting a start-up stops it at once.
"""

from __future__ import annotations

import signal

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)

_held: list[str] = []


def _remember(signum, frame) -> None:
    _held.append(signal.Signals(signum).name)


def hold() -> None:
    """Keep stop signals from here on until the trainer installs its own handlers.

    The elastic launcher starts trainers with these signals blocked (launch/elastic.py), so
    that one sent before this line runs is pending, not fatal: unblocking delivers it here."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, _remember)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)


def take() -> list[str]:
    """The names of the stop signals held so far (emptied)."""
    names = list(_held)
    _held.clear()
    return names


def ignore() -> None:
    """Ignore stop signals from here on (the trainer has stopped; an ignored signal stays
    ignored through the interpreter's shutdown, a handled one is reset to kill the process)."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
