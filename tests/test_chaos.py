"""tools/chaos.py on the local SLURM cluster: every kind of fault in one run, which still ends
with the uninterrupted run's weights, bit for bit."""

from __future__ import annotations

import os
import re

import pytest

pytestmark = [pytest.mark.slurm, pytest.mark.slow]


def test_chaos_run_survives_every_fault_with_exact_weights(slurm_cluster, tmp_path, capsys):
    if os.geteuid() != 0:
        pytest.skip("the 'save' fault mounts a tmpfs: needs root (as the cluster itself does)")
    from tools.chaos import main

    # enough steps that the run outlasts SLURM's time-limit warning (up to 30 s late) on a fast machine
    rc = main(["--seed", "0", "--steps", "400", "--out", str(tmp_path / "chaos")])
    out = capsys.readouterr().out
    print(out)
    assert rc == 0
    rows = re.findall(r"^\| (kill|stop|preempt|timelimit|save) \| \d+ \|", out, re.M)
    assert sorted(rows) == sorted(["kill", "stop", "preempt", "timelimit", "save"])
    assert "faults injected: 5; restarts in the allocation: 3; requeues: 2" in out
    assert "final weights bitwise equal to the uninterrupted run: yes" in out
