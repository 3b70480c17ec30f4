"""tools/gpu_check.py on a machine without a GPU: the table is written whatever cannot run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tools import bench_train, gpu_check

REPO = Path(__file__).resolve().parent.parent

CASES = '''
import pytest

def test_ok(record_property):
    record_property("clips_per_s", 12.5)

def test_bad():
    assert 1 == 2, "boom"

def test_skipped():
    pytest.skip("not installed: deepspeed")

def test_lacks_a_module():
    import no_such_module_here  # noqa: F401
'''


def test_junit_rows_say_passed_failed_and_why_not_run(tmp_path):
    (tmp_path / "test_cases.py").write_text(CASES)
    xml = tmp_path / "out.xml"
    subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path / "test_cases.py"),
                    f"--junitxml={xml}", "-o", "junit_family=xunit1"], cwd=tmp_path, capture_output=True, timeout=120)
    rows = {r.check.rsplit("::", 1)[-1]: r for r in gpu_check.parse_junit(xml)}
    assert rows["test_ok"].result == "passed" and "clips_per_s 12.5" in rows["test_ok"].numbers
    assert rows["test_bad"].failed and "boom" in rows["test_bad"].result
    assert rows["test_skipped"].result == "not run: not installed: deepspeed"
    assert rows["test_lacks_a_module"].result == "not run: missing module no_such_module_here"
    assert not any(r.failed for k, r in rows.items() if k != "test_bad")


@pytest.mark.parametrize("timed", [True, False, "oom"])
def test_bench_train_progress_lines_read_back(timed):
    """What bench_train prints per config as it goes is what gpu_check keeps from a run cut short."""
    row = bench_train.Row("b16_8x224", 178.0, 1200.5, 15112.0, 400.8)
    if timed == "oom":
        row.oom = True
    elif timed:
        row.clips_s, row.split_ms, row.tflops_s, row.mfu, row.peak_gb = 110.25, "10/20/30/5", 341.5, 0.432, 20.14
    text = "noise\n" + bench_train.progress_line(row) + "\nmore noise\n"
    (got,) = gpu_check.parse_progress(text)
    assert got["config"] == "b16_8x224" and float(got["fwd+bwd"]) == 1200.5
    assert float(got["text GFLOPs/step fwd+bwd"]) == 15112
    if timed == "oom":
        assert got["clips/s"] == "OOM"
    elif timed:
        assert float(got["clips/s"]) == pytest.approx(110.25, abs=0.05) and got["MFU"] == "43.2%"
        assert got["ms vision/text/bwd/optim"] == "10/20/30/5" and float(got["peak GB"]) == pytest.approx(20.1)
    else:
        assert got["clips/s"] == "-"


def test_a_cut_off_bench_keeps_the_configs_it_finished(tmp_path, monkeypatch):
    rows = [bench_train.Row("debug", 1.0, 0.4, 49.0, 0.1, 500.0, "1/2/3/1", 0.5, None, None),
            bench_train.Row("b16_8x224", 178.0, 1200.5, 15112.0, 400.8, 110.0, "10/20/30/5", 341.0, 0.43, 20.1)]
    text = "\n".join(bench_train.progress_line(r) for r in rows)
    monkeypatch.setattr(gpu_check, "run", lambda cmd, log, timeout, env=None: ("timeout", timeout, text))
    rep = gpu_check.Report(env={"imports": {n: {"ok": True} for n, _, _ in gpu_check.DEPS}})
    gpu_check.bench(tmp_path, rep, 30, ["all"], 8)
    (row,) = rep.rows
    assert row.failed and "timed out after 30 s; 2 configs finished" in row.result
    assert "b16_8x224: 110.0 clips/s measured" in row.numbers
    table = rep.sections[0][1]
    assert "| debug | 500.0 |" in table and "| b16_8x224 | 110.0 |" in table


def test_a_config_out_of_memory_does_not_stop_the_others(monkeypatch, capsys):
    """On the H200, L/14 16x336 at batch 8 without checkpointing ran out of memory and ended the
    whole timing run. A CPU run cannot run out of device memory, so a stand-in time_steps raises
    torch's own OutOfMemoryError for one config: the row says OOM, the next config is timed."""
    import torch

    def fake_time_steps(name, *args, **kwargs):
        if name == "debug":
            raise torch.OutOfMemoryError("CUDA out of memory (stand-in)")
        return {"clips_s": 12.5, "split_ms": "1/2/3/4", "peak_gb": None, "step_s": 1.0}

    monkeypatch.setattr(bench_train, "time_steps", fake_time_steps)
    monkeypatch.setattr(bench_train, "CONFIGS", {k: bench_train.CONFIGS[k] for k in ("debug", "b32_8x224")})
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    assert bench_train.main(["--time", "all", "--batch", "2"]) == 0
    out, err = capsys.readouterr()
    device, rows = gpu_check.parse_bench(out)
    got = {r["config"]: r["clips/s"] for r in rows}
    assert got == {"debug": "OOM", "b32_8x224": "12.5"}, out
    assert "... debug done:" in err and "out of memory" in err


def test_every_part_skipped_still_writes_the_table(tmp_path):
    out = tmp_path / "check"
    res = subprocess.run([sys.executable, "tools/gpu_check.py", "--out", str(out), "--skip-tests", "--skip-preflight",
                          "--skip-bench"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    report = (out / "report.md").read_text()
    assert report in res.stdout  # the table is printed as well as written
    data = json.loads((out / "report.json").read_text())
    results = {r["check"]: r["result"] for r in data["rows"]}
    assert results["gpu tests"] == "not run: --skip-tests"
    assert results["preflight"] == "not run: --skip-preflight"
    assert results["bench_train --time"] == "not run: --skip-bench"
    assert results["dependencies"] == "passed"  # this environment has everything the checks import
    assert "| check | result | numbers | s |" in report
