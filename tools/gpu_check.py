"""`make gpu-check`: every number the first lent GPU can give, in one markdown table.

    make gpu-check                                  # .venv's Python, or python3 where there is no .venv
    make gpu-check PY=python3 WHEELS=wheels/        # a bare working tree: install what is missing from wheels
    python tools/gpu_check.py [--out runs/gpu-check] [--skip-bench] [--skip-preflight] [--skip-tests]

Each part runs in its own process with a time limit; what cannot run is a row saying
"not run: <why>", never a crash:

1. dependencies: the packages the checks import, their versions, which are missing
   (``--wheels DIR`` first installs the missing ones from a local wheel folder, no index);
2. the gpu-marked tests, ``pytest -m gpu tests/`` (tests/test_gpu.py and the CUDA tests of
   test_attention, test_preflight and test_data_loader): one row per test, with the numbers
   each records (losses, clips/s, bf16 errors, kernel times);
3. the preflight, ``launch/local.py --preflight --nproc 1 configs/debug.yaml``, on small
   synthetic shards built here (tools/make_synthetic.py, make_shards.py --copy: no ffmpeg);
4. ``tools/bench_train.py --time all``: clips/s, MFU and peak memory per config, beside
   what the throughput model (tools/throughput_model.py) predicts at 40% MFU of the bf16
   dense peak (989 TFLOP/s, H100 = H200).

Writes ``OUT/report.md`` (also printed) and ``OUT/report.json``, and each part's log in OUT.
Exit status 0 when no check failed ("not run" is not a failure), 1 otherwise. Needs only the
standard library itself; works with torch >= 2.5, without DALI and without SLURM.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))

# (import name, distribution, needed by): what the checks import
DEPS = [
    ("torch", "torch", "all"), ("pytest", "pytest", "tests"), ("yaml", "pyyaml", "all"),
    ("numpy", "numpy", "all"), ("einops", "einops", "all"), ("timm", "timm", "model"),
    ("torchvision", "torchvision", "model"), ("open_clip", "open_clip_torch", "model"),
    ("deepspeed", "deepspeed", "training"), ("av", "av", "data"), ("psutil", "psutil", "training"),
    ("tqdm", "tqdm", "training"), ("safetensors", "safetensors", "training"),
]
OPTIONAL = [("nvidia.dali", "nvidia-dali-cuda120", "DALI decode test")]
PREFLIGHT_NEEDS = ("torch", "yaml", "numpy", "einops", "timm", "torchvision", "open_clip", "av", "psutil", "tqdm")
BENCH_NEEDS = ("torch", "yaml", "numpy", "einops", "timm", "torchvision", "open_clip")
PEAK_TFLOPS, ASSUMED_MFU = 989.4, 0.40  # H100 SXM = H200 SXM bf16 dense; tools/throughput_model.py


@dataclass
class Row:
    check: str
    result: str            # passed | failed: why | not run: why
    numbers: str = ""
    seconds: float | None = None

    @property
    def failed(self) -> bool:
        return self.result.startswith("failed")


@dataclass
class Report:
    env: dict = field(default_factory=dict)
    rows: list[Row] = field(default_factory=list)
    sections: list[tuple[str, str]] = field(default_factory=list)  # (title, markdown)


# --------------------------------------------------------------------------- processes


def run(cmd: list[str], log: Path, timeout: float, env: dict | None = None) -> tuple[int | str, float, str]:
    """Run ``cmd`` from the repo root with its output in ``log``; (rc or "timeout", seconds, output tail).
    On a timeout the whole process group is killed."""
    t0 = time.perf_counter()
    e = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
    e["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])
    with open(log, "wb") as f:
        f.write(("$ " + " ".join(cmd) + "\n").encode())
        f.flush()
        proc = subprocess.Popen(cmd, cwd=REPO, env=e, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc: int | str = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            rc = "timeout"
    text = log.read_text(errors="replace")
    return rc, time.perf_counter() - t0, text


def tail(text: str, n: int = 1) -> str:
    """The last ``n`` meaningful lines, for a table cell."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("$ ")]
    errs = [ln for ln in lines if re.search(r"(Error|error:|FAILED|Traceback)", ln)]
    pick = (errs or lines)[-n:]
    return " / ".join(pick)[:300].replace("|", "\\|")


# --------------------------------------------------------------------------- 1. environment


# Imported in a child process: a package can be present and still fail to import (a wheel
# installed without its own dependencies: open_clip without ftfy, deepspeed without hjson),
# and the parent then holds no CUDA context.
PROBE = """
import importlib, importlib.metadata, json, sys
out = {"imports": {}}
for name, dist in json.loads(sys.argv[1]):
    try:
        importlib.import_module(name)
        try:
            v = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            v = "?"
        out["imports"][name] = {"ok": True, "version": v}
    except BaseException as e:
        out["imports"][name] = {"ok": False, "error": f"{type(e).__name__}: {e}"[:200]}
if out["imports"].get("torch", {}).get("ok"):
    import torch
    d = {"torch": torch.__version__, "cuda": torch.version.cuda, "available": torch.cuda.is_available()}
    if d["available"]:
        p = torch.cuda.get_device_properties(0)
        d.update(count=torch.cuda.device_count(), name=torch.cuda.get_device_name(0),
                 memory_gb=round(p.total_memory / 2**30, 1), capability=f"{p.major}.{p.minor}")
    out["torch"] = d
else:
    out["torch"] = {"error": "torch does not import: " + out["imports"].get("torch", {}).get("error", "?")}
print("PROBE " + json.dumps(out))
"""


def probe(out: Path) -> dict:
    """Which modules import (with versions), and torch's CUDA view, from a child process."""
    mods = [(n, d) for n, d, _ in DEPS + OPTIONAL]
    rc, _, text = run([sys.executable, "-c", PROBE, json.dumps(mods)], out / "probe.log", 300)
    m = re.search(r"^PROBE (.*)$", text, re.M)
    if rc == 0 and m:
        return json.loads(m.group(1))
    return {"imports": {}, "torch": {"error": f"the import probe failed ({rc}): {tail(text)}"}}


def torch_too_old(v: str | None) -> bool:
    m = re.match(r"(\d+)\.(\d+)", v or "")
    return bool(m) and (int(m.group(1)), int(m.group(2))) < (2, 5)


def missing(rep: Report, names) -> list[str]:
    """Of ``names``, those the probe could not import."""
    imports = rep.env.get("imports", {})
    return [n for n in names if not imports.get(n, {}).get("ok")]


def install_wheels(wheels: Path, out: Path, rep: Report) -> None:
    first = probe(out)["imports"]
    want = [dist for name, dist, _ in DEPS if not first.get(name, {}).get("ok")]
    if not want:
        rep.rows.append(Row("install from --wheels", "passed", "nothing missing"))
        return
    rc, s, text = run([sys.executable, "-m", "pip", "install", "--no-index", "--find-links", str(wheels), *want],
                      out / "pip.log", 900)
    rep.rows.append(Row("install from --wheels", "passed" if rc == 0 else f"failed: pip exit {rc}: {tail(text)}",
                        f"{', '.join(want)} from {wheels} (log: pip.log)", s))


def environment(out: Path, rep: Report) -> dict:
    p = probe(out)
    imports, t = p["imports"], p["torch"]
    env = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "host": platform.node(),
        "python": f"{platform.python_version()} ({sys.executable})", "cpus": os.cpu_count(),
        "git": _git_head(), "torch": t, "imports": imports,
    }
    rep.env = env
    gone = missing(rep, [n for n, _, _ in DEPS])
    optional = missing(rep, [n for n, _, _ in OPTIONAL])
    needed_by = {n: why for n, _, why in DEPS}
    dist = {n: d for n, d, _ in DEPS + OPTIONAL}

    def why(n: str) -> str:
        err = imports.get(n, {}).get("error", "not probed")
        return "" if re.fullmatch(rf"ModuleNotFoundError: No module named '{n.split('.')[0]}'", err) else f": {err}"

    versions = "; ".join(f"{d} {imports[n]['version']}" for n, d in dist.items() if imports.get(n, {}).get("ok"))
    rep.rows.append(Row(
        "dependencies",
        "passed" if not gone else "missing: " + ", ".join(f"{n} (for {needed_by[n]}{why(n)})" for n in gone)
        + f"; install: pip install {' '.join(dist[n] for n in gone)} (or make gpu-check WHEELS=DIR)",
        versions + (f"; optional, does not import: {', '.join(f'{dist[n]}{why(n)}' for n in optional)}"
                    if optional else "")))
    if "error" in t:
        rep.rows.append(Row("CUDA device", f"not run: {t['error']}"))
    elif not t["available"]:
        rep.rows.append(Row("CUDA device", "not run: no CUDA device" + ("" if t["cuda"] else " (a CPU build of torch)"),
                            f"torch {t['torch']}"))
    else:
        rep.rows.append(Row("CUDA device", "passed", f"{t['count']} x {t['name']} ({t['memory_gb']} GiB, sm "
                            f"{t['capability']}); torch {t['torch']}, CUDA {t['cuda']}"))
    if torch_too_old(t.get("torch")):
        rep.rows.append(Row("torch version", f"failed: torch {t['torch']} < 2.5 (FlexAttention)"))
    return env


def _git_head() -> str:
    try:
        r = subprocess.run(["git", "-C", str(REPO), "log", "-1", "--format=%h %cd", "--date=short"],
                           capture_output=True, text=True, timeout=10)
        return r.stdout.strip() or "not a git checkout"
    except (OSError, subprocess.SubprocessError):
        return "git not available"


# --------------------------------------------------------------------------- 2. gpu tests


def parse_junit(path: Path) -> list[Row]:
    """One row per test case of a junit XML (xunit1 or xunit2), with its recorded properties."""
    rows = []
    for case in ET.parse(path).getroot().iter("testcase"):
        name = f"{case.get('classname', '').rsplit('.', 1)[-1]}::{case.get('name')}".lstrip(":")
        props = {p.get("name"): p.get("value") for p in case.iter("property")}
        result = "passed"
        for tag in ("failure", "error", "skipped"):
            el = case.find(tag)
            if el is None:
                continue
            msg = (el.get("message") or "").strip()
            text = (el.text or "").strip()
            mod = re.search(r"No module named '([\w.]+)'", msg + "\n" + text)
            if tag == "skipped":
                result = "not run: " + re.sub(r"^Skipped: ", "", msg or text).strip()
            elif mod:
                result = f"not run: missing module {mod.group(1)}"
            else:
                first = msg.splitlines()[0] if msg else tail(text)
                result = f"failed: {first}"[:400]
            break
        rows.append(Row(f"gpu test {name}", result.replace("|", "\\|").replace("\n", " "),
                        "; ".join(f"{k} {v}" for k, v in props.items()), float(case.get("time") or 0)))
    return rows


def gpu_tests(out: Path, rep: Report, timeout: float) -> None:
    if missing(rep, ["pytest"]):
        rep.rows.append(Row("gpu tests", "not run: pytest is not installed"))
        return
    xml = out / "gpu-tests.xml"
    xml.unlink(missing_ok=True)
    # only the modules that hold gpu tests: a module that cannot import here (a package the
    # machine lacks) then costs its own rows, not the session
    files = [str(p.relative_to(REPO)) for p in sorted((REPO / "tests").glob("test_*.py"))
             if "pytest.mark.gpu" in p.read_text(errors="replace")]
    rc, s, text = run([sys.executable, "-m", "pytest", "-m", "gpu", *files, "-p", "no:cacheprovider", "-q", "-rA",
                       "--continue-on-collection-errors", f"--junitxml={xml}", "-o", "junit_family=xunit1"],
                      out / "gpu-tests.log", timeout)
    if rc == "timeout":
        rep.rows.append(Row("gpu tests", f"failed: timed out after {timeout:.0f} s (log: gpu-tests.log)", seconds=s))
    if not xml.is_file():
        if rc != "timeout":
            rep.rows.append(Row("gpu tests", f"failed: pytest exit {rc}: {tail(text)}", seconds=s))
        return
    rows = parse_junit(xml)
    rep.rows += rows
    if not rows:
        rep.rows.append(Row("gpu tests", f"failed: pytest exit {rc}, no test collected: {tail(text)}", seconds=s))
    summary = [ln for ln in text.splitlines() if re.search(r"\d+ (passed|skipped|failed|error)", ln)]
    done = summary[-1].strip() if summary else rc
    rep.sections.append(("gpu tests", f"`pytest -m gpu {' '.join(files)}` in {s:.0f} s: {done} "
                                      "(log: gpu-tests.log, gpu-tests.xml)"))


# --------------------------------------------------------------------------- 3. preflight


def build_data(out: Path) -> tuple[Path | None, str]:
    """Synthetic motion shards for the preflight: 4 classes x 12 + 4 videos, --copy (no ffmpeg)."""
    data = out / "data"
    shards = data / "shards"
    if (shards / "labels.csv").is_file() and (shards / "manifest.json").is_file():
        return shards, ""
    rc, _, text = run([sys.executable, "tools/make_synthetic.py", str(data / "videos"), "--classes", "4",
                       "--per-class", "12", "--val-per-class", "4", "--size", "80x64", "--frames", "16-20",
                       "--no-progress"], out / "data.log", 300)
    if rc != 0:
        return None, f"make_synthetic exit {rc}: {tail(text)}"
    for split in ("train", "val"):
        rc, _, text = run([sys.executable, "tools/make_shards.py", str(data / "videos" / f"{split}.txt"), "--labels",
                           str(data / "videos/labels.csv"), "--out", str(shards), "--split", split, "--copy",
                           "--workers", "1", "--no-progress"], out / f"data-{split}.log", 300)
        if rc != 0:
            return None, f"make_shards exit {rc}: {tail(text)}"
    (shards / "labels.csv").write_text((data / "videos/labels.csv").read_text())
    return shards, ""


def preflight(out: Path, rep: Report, timeout: float, config: str) -> None:
    gone = missing(rep, PREFLIGHT_NEEDS)
    if gone:
        rep.rows.append(Row("preflight", f"not run: needs {', '.join(gone)}"))
        return
    shards, why = build_data(out)
    if shards is None:
        rep.rows.append(Row("preflight", f"not run: synthetic shards could not be built: {why}"))
        return
    run_dir = out / "preflight"
    result = run_dir / "preflight.json"
    result.unlink(missing_ok=True)
    rc, s, text = run([sys.executable, "launch/local.py", "--preflight", "--nproc", "1", config,
                       f"data.train_shards={shards}", f"data.val_shards={shards}",
                       f"text.labels={shards / 'labels.csv'}", f"run_dir={run_dir}"], out / "preflight.log", timeout)
    if not result.is_file():
        rep.rows.append(Row("preflight", f"failed: exit {rc}: {tail(text)}", seconds=s))
        return
    r = json.loads(result.read_text())
    rank = r["ranks"][0]
    est = r.get("estimate", {})
    gflops = rank.get("matmul_gflops")
    matmul = "-" if gflops is None else (f"{gflops / 1e3:.0f} TFLOP/s" if r.get("device_type") == "cuda"
                                         else f"{gflops:.1f} GFLOP/s")
    nums = [f"{rank.get('device')}", f"matmul {matmul} ({r.get('matmul')})",
            f"read {rank.get('read_mbs') or 0:.0f} MB/s", f"loader {rank.get('clips_per_s') or 0:.1f} clips/s",
            f"free {rank.get('free_gb') or 0:.0f} GiB"]
    if "step_s" in est:
        nums.append(f"estimate {est['step_s']:.3f} s/step ({est['bound']}-bound)")
    failed = r.get("failed") or []
    rep.rows.append(Row(f"preflight ({Path(config).name})",
                        "passed" if rc == 0 and not failed else f"failed: exit {rc}: {', '.join(failed) or tail(text)}",
                        "; ".join(nums), s))
    if r.get("text"):
        rep.sections.append(("preflight", "```\n" + r["text"] + "\n```"))


# --------------------------------------------------------------------------- 4. bench_train


def parse_bench(text: str) -> tuple[str, list[dict]]:
    """bench_train's device line and its table rows as dicts (header names as keys)."""
    device = next((ln for ln in text.splitlines() if ln.startswith("device:")), "")
    lines = [ln for ln in text.splitlines() if ln.startswith("| ")]
    head = next((i for i, ln in enumerate(lines) if ln.startswith("| config |")), None)
    if head is None:
        return device, []
    keys = [c.strip() for c in lines[head].strip("|").split("|")]
    rows = []
    for ln in lines[head + 1:]:
        cells = [c.strip() for c in ln.strip("|").split("|")]
        if len(cells) == len(keys) and not set(cells[0]) <= set("-"):
            rows.append(dict(zip(keys, cells)))
    return device, rows


PROGRESS = re.compile(r"^\.\.\. (\S+) done: ([\d.]+) GFLOP/clip fwd\+bwd, (\d+) GFLOP/step text"
                      r"(?:; ([\d.]+) clips/s, ([\d.]+) TFLOP/s, MFU (\S+), ms (\S+), peak GB (\S+)|; (out of memory))?$",
                      re.M)


def parse_progress(text: str) -> list[dict]:
    """bench_train's per-config progress lines (stderr), as table rows: what a run cut short kept."""
    keys = ("config", "fwd+bwd", "text GFLOPs/step fwd+bwd", "clips/s", "TFLOP/s", "MFU", "ms vision/text/bwd/optim",
            "peak GB")
    rows = []
    for m in PROGRESS.finditer(text):
        row = {k: (v if v is not None else "-") for k, v in zip(keys, m.groups())}
        if m.group(9):
            row["clips/s"] = "OOM"
        rows.append(row)
    return rows


def _num(v: str | None) -> float | None:
    try:
        return float(str(v).replace(",", "").rstrip("%"))
    except (TypeError, ValueError):
        return None


def bench(out: Path, rep: Report, timeout: float, configs: list[str], batch: int) -> None:
    gone = missing(rep, BENCH_NEEDS)
    if gone:
        rep.rows.append(Row("bench_train --time", f"not run: needs {', '.join(gone)}"))
        return
    rc, s, text = run([sys.executable, "tools/bench_train.py", "--time", *configs, "--batch", str(batch)],
                      out / "bench_train.log", timeout)
    device, rows = parse_bench(text)
    result = "passed"
    if rc != 0 or not rows:
        rows = parse_progress(text)  # the configs it finished before it stopped
        why = f"timed out after {timeout:.0f} s" if rc == "timeout" else f"exit {rc}: {tail(text)}"
        result = f"failed: {why}" + (f"; {len(rows)} configs finished" if rows else "")
        device = device or "device: see bench_train.log"
        if not rows:
            rep.rows.append(Row(f"bench_train --time {' '.join(configs)}", result, seconds=s))
            return
    from throughput_model import bench_train_prediction

    table = ["| config | clips/s measured | predicted at 40% of 989 | TFLOP/s | MFU of 989 | MFU of measured peak "
             "| ms vision/text/bwd/optim | peak GB |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        vision, textf = _num(r.get("fwd+bwd")), _num(r.get("text GFLOPs/step fwd+bwd"))
        pred = (bench_train_prediction(vision * 1e9, textf * 1e9, batch, PEAK_TFLOPS * 1e12 * ASSUMED_MFU)
                if vision and textf is not None else None)
        r["predicted"] = pred
        tf = _num(r.get("TFLOP/s"))
        cells = [r["config"], r.get("clips/s", "-"), "-" if pred is None else f"{pred:,.1f}", r.get("TFLOP/s", "-"),
                 "-" if tf is None else f"{tf / PEAK_TFLOPS:.1%}", r.get("MFU", "-"),
                 r.get("ms vision/text/bwd/optim", "-"), r.get("peak GB", "-")]
        table.append("| " + " | ".join(cells) + " |")
    b16 = next((r for r in rows if r["config"] == "b16_8x224"), None)
    timed = [r for r in rows if _num(r.get("clips/s")) is not None]
    peak = re.search(r"measured bf16 peak (\d+) TFLOP/s", device)
    nums = f"{len(timed)} configs timed" + (f"; bf16 matmul peak {peak.group(1)} TFLOP/s" if peak else "")
    if b16 is not None and _num(b16.get("clips/s")) is not None and b16.get("predicted"):
        got, pred = _num(b16["clips/s"]), b16["predicted"]
        nums = (f"b16_8x224: {got:,.1f} clips/s measured vs {pred:,.1f} predicted at 40% MFU "
                f"({got / pred:.2f}x); {nums}")
    ooms = [r["config"] for r in rows if r.get("clips/s") == "OOM"]
    if ooms:
        nums += (f"; out of device memory at batch {batch}: {', '.join(ooms)} "
                 "(bench_train.py --checkpointing all, or a smaller --batch)")
    rep.rows.append(Row(f"bench_train --time {' '.join(configs)}", result, nums, s))
    rep.sections.append(("bench_train", f"{device}\n\n" + "\n".join(table) +
                         "\n\nPredicted: tools/throughput_model.py's `bench_train_prediction` (batch clips and the "
                         "whole K x C text work per step) at 40% of 989 TFLOP/s; the measured peak is the "
                         "8192^3 bf16 matmul bench_train times. Full output: bench_train.log."))


# --------------------------------------------------------------------------- report


def markdown(rep: Report) -> str:
    e, t = rep.env, rep.env.get("torch", {})
    dev = (f"{t.get('count')} x {t.get('name')}" if t.get("available") else "no CUDA device")
    lines = ["# GPU check", "",
             f"{e.get('date')} on {e.get('host')}: {dev}; torch {t.get('torch', '-')} (CUDA {t.get('cuda')}); "
             f"Python {e.get('python')}; {e.get('cpus')} CPUs; repo {e.get('git')}", "",
             "| check | result | numbers | s |", "|---|---|---|---|"]
    for r in rep.rows:
        lines.append(f"| {r.check} | {r.result} | {r.numbers.replace('|', '/')} | "
                     f"{'' if r.seconds is None else f'{r.seconds:.0f}'} |")
    for title, body in rep.sections:
        lines += ["", f"## {title}", "", body]
    failed = [r.check for r in rep.rows if r.failed]
    lines += ["", "failed: " + ", ".join(failed) if failed else "no check failed"]
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="claver-gpu-check", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/gpu-check", help="folder for the report and the logs")
    p.add_argument("--wheels", default=None, help="install missing packages from this wheel folder first (no index)")
    p.add_argument("--skip-tests", action="store_true")
    p.add_argument("--skip-preflight", action="store_true")
    p.add_argument("--skip-bench", action="store_true", help="skip bench_train --time (slow on CPU)")
    p.add_argument("--budget-s", type=float, default=570,
                   help="seconds for everything (default fits a 10-minute command); each part's limit is cut "
                        "to what is left, keeping a minimum for the parts after it")
    p.add_argument("--tests-timeout", type=float, default=300)
    p.add_argument("--preflight-timeout", type=float, default=150)
    p.add_argument("--bench-timeout", type=float, default=480)
    p.add_argument("--preflight-config", default="configs/debug.yaml")
    p.add_argument("--bench-configs", nargs="+", default=["all"], help="bench_train --time names (default all)")
    p.add_argument("--bench-batch", type=int, default=8)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    out = Path(a.out) if Path(a.out).is_absolute() else REPO / a.out
    out.mkdir(parents=True, exist_ok=True)
    rep = Report()
    deadline = time.monotonic() + a.budget_s
    if a.wheels:
        install_wheels(Path(a.wheels).resolve(), out, rep)
    env = environment(out, rep)
    # (name, flag, its own limit, the least it needs, what runs it with a limit)
    steps = [("gpu tests", "--skip-tests", a.tests_timeout, 60, lambda t: gpu_tests(out, rep, t)),
             ("preflight", "--skip-preflight", a.preflight_timeout, 45,
              lambda t: preflight(out, rep, t, a.preflight_config)),
             ("bench_train --time", "--skip-bench", a.bench_timeout, 90,
              lambda t: bench(out, rep, t, a.bench_configs, a.bench_batch))]
    steps = [(n, f, lim, least, fn, getattr(a, f[2:].replace("-", "_"))) for n, f, lim, least, fn in steps]
    for i, (name, flag, limit, least, fn, skip) in enumerate(steps):
        later = sum(st[3] for st in steps[i + 1:] if not st[5])
        left = deadline - time.monotonic() - later
        if skip:
            rep.rows.append(Row(name, f"not run: {flag}"))
        elif "error" in env["torch"]:
            rep.rows.append(Row(name, f"not run: {env['torch']['error']}"))
        elif left < least:
            rep.rows.append(Row(name, f"not run: {left:.0f} s of --budget-s {a.budget_s:g} left (needs {least})"))
        else:
            print(f"gpu-check: {name} (limit {min(limit, left):.0f} s) ...", file=sys.stderr, flush=True)
            try:
                fn(min(limit, left))
            except Exception as e:  # noqa: BLE001 - a bug here must not cost the other checks
                rep.rows.append(Row(name, f"failed: gpu_check raised {type(e).__name__}: {e}"[:400]))
        write_report(out, rep)  # after every part: a run killed from outside keeps what it has
    text = write_report(out, rep)
    print(text)
    print(f"gpu-check: wrote {out / 'report.md'}", file=sys.stderr)
    return 1 if any(r.failed for r in rep.rows) else 0


def write_report(out: Path, rep: Report) -> str:
    text = markdown(rep)
    (out / "report.md").write_text(text)
    (out / "report.json").write_text(json.dumps({"env": rep.env, "rows": [asdict(r) for r in rep.rows],
                                                 "sections": rep.sections}, indent=1) + "\n")
    return text


if __name__ == "__main__":
    sys.exit(main())
