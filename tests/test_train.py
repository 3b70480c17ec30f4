"""Training engine end to end on CPU: DeepSpeed ZeRO-2 over gloo with real shards.

Multi-process runs go through the real launcher (torchrun); kills are real SIGKILLs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path

import pytest
import torch

from claver_dist.config import load_config
from claver_dist import checkpoint as ckpt_lib
from claver_dist.train.metrics import read_metrics

REPO = Path(__file__).resolve().parent.parent
PY = sys.executable
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def demo_data(motion_shards) -> Path:
    return motion_shards


def overrides(data: Path, run_dir: Path, *extra: str) -> list[str]:
    return [f"data.train_shards={data}", f"data.val_shards={data}", f"text.labels={data / 'labels.csv'}",
            f"run_dir={run_dir}", "data.batch_size=4", "data.num_workers=0", "log.every_steps=1",
            "log.count_flops=false", "train.val_every_epochs=100", *extra]


def launch(nproc: int, data: Path, run_dir: Path, *extra: str, wait: bool = True, timeout: float = 300,
           config: str = "configs/debug.yaml"):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    cmd = [PY, str(REPO / "launch/local.py"), "--nproc", str(nproc), str(REPO / config),
           *overrides(data, run_dir, *extra)]
    log = open(run_dir.parent / f"{run_dir.name}.log", "ab")
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    if not wait:
        return proc
    try:
        rc = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_tree(proc)
        raise
    if rc != 0:
        print((run_dir.parent / f"{run_dir.name}.log").read_text()[-5000:])
    assert rc == 0, f"training exited with {rc}"
    return proc


def losses(run_dir: Path) -> dict[int, float]:
    """The last logged loss of every step (a resumed run logs steps after the checkpoint again)."""
    return {r["step"]: r["loss"] for r in read_metrics(run_dir) if "loss" in r}


# A regime where the tiny random model learns within 24 steps. The video embedding is the
# mean of unit frame vectors (norm < 1, the official recipe), so the logit scale starts at
# 30 rather than 10.
LEARNABLE = ("model.init_logit_scale=3.4", "optim.lr=5e-4", "optim.warmup_epochs=0")


@pytest.mark.parametrize("precision,steps,rtol", [("fp32", 8, 1e-4), ("bf16", 4, 0.03)])
def test_two_processes_match_one_with_accumulation(demo_data, tmp_path, precision, steps, rtol):
    """Same global batch (2 x 4 vs 1 x 4 x accum 2), same clips per step: same losses.

    fp32: equal up to reduction order. bf16: gradients are reduced across ranks in bf16
    but accumulated in fp32 within a rank, so the runs drift apart step by step; the
    documented tolerance (docs/training.md) is 3% relative over the first 4 steps."""
    common = (f"train.max_steps={steps}", f"train.precision={precision}", *LEARNABLE)
    launch(2, demo_data, tmp_path / "p2", *common)
    launch(1, demo_data, tmp_path / "p1", *common, "train.grad_accum=2")
    two, one = losses(tmp_path / "p2"), losses(tmp_path / "p1")
    assert sorted(two) == sorted(one) == list(range(1, steps + 1))
    for s in two:
        assert abs(two[s] - one[s]) <= rtol * abs(one[s]), (s, two[s], one[s])
    assert (tmp_path / "p2/export/model.safetensors").is_file()
    assert (tmp_path / "p2/config.yaml").is_file()


def test_two_process_loss_decreases(demo_data, tmp_path):
    launch(2, demo_data, tmp_path / "run", "train.max_steps=24", "train.precision=fp32", *LEARNABLE)
    run = losses(tmp_path / "run")
    first, last = sum(run[s] for s in (1, 2, 3, 4)) / 4, sum(run[s] for s in (21, 22, 23, 24)) / 4
    assert last < first - 0.03, f"loss did not decrease: {first:.3f} -> {last:.3f}"


def kill_tree(proc) -> None:
    """SIGKILL the launcher and every process under it (torchrun starts workers in their own sessions)."""
    import psutil

    parent = psutil.Process(proc.pid)
    victims = [parent, *parent.children(recursive=True)]
    for p in victims:
        p.kill()
    psutil.wait_procs(victims, timeout=30)
    proc.wait(timeout=30)


def _wait_for_step(run_dir: Path, step: int, proc, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if max(losses(run_dir), default=0) >= step:
            return
        if proc.poll() is not None:
            raise AssertionError(f"training exited early with {proc.returncode}")
        time.sleep(0.2)
    raise AssertionError(f"step {step} not reached in {timeout}s")


def test_kill9_resume_matches_uninterrupted(demo_data, tmp_path):
    common = ("train.max_steps=10", "checkpoint.every_steps=3")
    launch(2, demo_data, tmp_path / "ref", *common)
    proc = launch(2, demo_data, tmp_path / "run", *common, wait=False)
    _wait_for_step(tmp_path / "run", 7, proc)
    kill_tree(proc)
    latest = ckpt_lib.find_latest(tmp_path / "run/checkpoints")
    assert latest is not None and latest.name in ("step_00000006", "step_00000009")
    c = ckpt_lib.read_meta(latest)["step"]
    launch(2, demo_data, tmp_path / "run", *common)
    ref, run = losses(tmp_path / "ref"), losses(tmp_path / "run")
    assert max(run) == 10
    for s in range(c + 1, 11):
        assert run[s] == ref[s], (s, run[s], ref[s])
    log = (tmp_path / "run.log").read_text()
    assert f"resumed from {latest}" in log


CRASH_IN_SAVE = """
# Fault injection (test only): the process dies the moment the second checkpoint would be
# marked complete, i.e. after DeepSpeed wrote its files. A real kill cannot be timed there.
import os, sys
from claver_dist import checkpoint as ckpt_lib
real = ckpt_lib.atomic_write
def crashing(path, text):
    if path.name == "COMPLETE" and path.parent.name == "step_00000004":
        os._exit(137)
    real(path, text)
ckpt_lib.atomic_write = crashing
from claver_dist.train.main import main
sys.exit(main(sys.argv[1:]))
"""


def test_kill_during_save_keeps_latest_complete(demo_data, tmp_path):
    script = tmp_path / "crash.py"
    script.write_text(CRASH_IN_SAVE)
    run_dir = tmp_path / "run"
    cmd = [PY, str(script), str(REPO / "configs/debug.yaml"),
           *overrides(demo_data, run_dir, "train.max_steps=6", "checkpoint.every_steps=2")]
    res = subprocess.run(cmd, cwd=REPO, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, timeout=300)
    assert res.returncode == 137, res.stderr[-3000:]
    ckpts = run_dir / "checkpoints"
    assert (ckpts / "step_00000004").is_dir() and not ckpt_lib.is_complete(ckpts / "step_00000004")
    assert (ckpts / "latest").read_text() == "step_00000002"
    assert ckpt_lib.find_latest(ckpts).name == "step_00000002"
    launch(1, demo_data, run_dir, "train.max_steps=6", "checkpoint.every_steps=2")
    assert ckpt_lib.find_latest(ckpts).name == "step_00000006"
    assert max(losses(run_dir)) == 6


def step_keys(run_dir: Path) -> dict[int, list[str]]:
    """Step -> the keys of its clips, all ranks together (log.sample_keys; a resumed step's last record)."""
    per_rank: dict[int, dict[int, list[str]]] = {}
    for f in sorted((run_dir / "samples").glob("rank_*.jsonl")):
        for line in f.read_text().splitlines():
            r = json.loads(line)
            per_rank.setdefault(int(f.stem.split("_")[1]), {})[r["step"]] = r["keys"]
    steps = sorted({s for rows in per_rank.values() for s in rows})
    return {s: sorted(k for rows in per_rank.values() for k in rows.get(s, [])) for s in steps}


def test_two_process_checkpoint_resumes_in_one(demo_data, tmp_path):
    """2 ranks x batch 2 -> 1 rank: grad_accum 1 -> 2 keeps 4 clips per step, so steps 4-6
    train on exactly the clips an uninterrupted 2-rank run trains on; 3 ranks cannot keep 4
    clips per step and are refused with the world sizes that can."""
    keys = ("log.sample_keys=true", "checkpoint.every_steps=3", "data.batch_size=2")
    # with a data worker per rank: the run must also exit (its workers ignore job signals)
    launch(2, demo_data, tmp_path / "reference", "train.max_steps=6", "data.num_workers=1", *keys)
    run_dir = tmp_path / "run"
    launch(2, demo_data, run_dir, "train.max_steps=3", *keys)
    assert ckpt_lib.read_meta(ckpt_lib.find_latest(run_dir / "checkpoints"))["world_size"] == 2
    proc = launch(3, demo_data, run_dir, "train.max_steps=6", "checkpoint.allow_config_change=true", *keys, wait=False)
    assert proc.wait(timeout=300) == 2
    log = (tmp_path / "run.log").read_text()
    assert "no whole train.grad_accum keeps 4 clips per step with data.batch_size=2" in log and "run on 1, 2 ranks" in log
    # a longer run changes the LR schedule: allowed explicitly
    launch(1, demo_data, run_dir, "train.max_steps=6", "checkpoint.allow_config_change=true", *keys)
    log = (tmp_path / "run.log").read_text()
    assert "via a universal checkpoint" in log and "world size 2 -> 1: train.grad_accum 1 -> 2 keeps the total batch of 4" in log
    steps = losses(run_dir)
    assert max(steps) == 6 and all(s in steps for s in (4, 5, 6))
    assert all(v == v for v in steps.values())  # finite
    assert ckpt_lib.read_meta(ckpt_lib.find_latest(run_dir / "checkpoints"))["world_size"] == 1
    assert step_keys(run_dir) == step_keys(tmp_path / "reference") and len(step_keys(run_dir)) == 6


def test_nonfinite_loss_stops_with_step_or_skips(demo_data, tmp_path):
    """In-process trainer; a NaN clip provokes a non-finite loss on a chosen step. ``error``
    stops before the update, naming the step and micro-batch; ``skip`` drops the micro-batch."""
    from claver_dist.distributed import DistEnv
    from claver_dist.train.trainer import NonFiniteLossError, Trainer

    def poisoned(batch):
        batch = dict(batch, video=batch["video"].clone())
        batch["video"][0, 0, 0, 0, 0] = float("nan")
        return batch

    for policy in ("error", "skip"):
        cfg = load_config(REPO / "configs/debug.yaml", overrides(demo_data, tmp_path / policy, "train.max_steps=4",
                                                                  "train.precision=fp32", "train.grad_accum=2",
                                                                  "data.batch_size=2", f"train.on_nonfinite={policy}"))
        trainer = Trainer(cfg, DistEnv.from_environ({}, device="cpu"))
        batches = iter(trainer.train_loader)
        trainer.train_step([next(batches), next(batches)])
        trainer.step += 1
        before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
        if policy == "error":
            with pytest.raises(NonFiniteLossError, match=r"non-finite loss at step 2 \(epoch 0, micro-batch 2 of 2"):
                trainer.train_step([next(batches), poisoned(next(batches))])
            # stopped before the update
            assert all(torch.equal(p, before[n]) for n, p in trainer.model.named_parameters())
        else:
            out = trainer.train_step([poisoned(next(batches)), poisoned(next(batches))])
            assert out["loss"] != out["loss"]  # nothing finite to report for this step
            assert trainer.bad_micro_steps == 2
            half = trainer.train_step([poisoned(next(batches)), next(batches)])
            assert half["loss"] == half["loss"] and trainer.bad_micro_steps == 0
            for n, p in trainer.model.named_parameters():
                assert torch.isfinite(p).all(), n
        trainer.close()


def test_nonfinite_gradients_skip_the_optimiser_step(demo_data, tmp_path, caplog):
    """bf16 ZeRO-2: a finite loss with an infinite gradient (a hook scales one parameter's
    gradient, the one way to provoke it) skips the update, says so, and the next step trains."""
    from claver_dist.distributed import DistEnv
    from claver_dist.train.trainer import Trainer

    cfg = load_config(REPO / "configs/debug.yaml", overrides(demo_data, tmp_path / "run", "train.max_steps=4"))
    assert cfg.train.precision == "bf16" and cfg.train.zero_stage == 2
    trainer = Trainer(cfg, DistEnv.from_environ({}, device="cpu"))
    batches = iter(trainer.train_loader)
    params = dict(trainer.model.named_parameters())
    name = next(n for n, p in params.items() if p.requires_grad and p.ndim == 2)
    hook = params[name].register_hook(lambda g: g * float("inf"))
    before = {n: p.detach().clone() for n, p in params.items()}
    out = trainer.train_step([next(batches)])
    assert out["loss"] == out["loss"] and "non-finite gradients at step 1" in caplog.text
    assert all(torch.equal(p, before[n]) for n, p in params.items())
    assert trainer.engine.skipped_steps == 1
    hook.remove()
    trainer.step += 1
    trainer.train_step([next(batches)])
    assert trainer.engine.skipped_steps == 1 and trainer.engine.global_steps == 2
    assert all(torch.isfinite(p).all() for p in params.values()) and caplog.text.count("non-finite gradients") == 1
    trainer.close()


HOST_READS = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__")


@pytest.mark.parametrize("policy,budget", [("error", 1), ("skip", 1 + 3)])
def test_a_step_reads_the_device_once(demo_data, tmp_path, monkeypatch, policy, budget):
    """Host synchronisations inside an optimiser step of 3 micro-batches: every read of a
    tensor's value on the host (``.item()``, ``.tolist()``, ``.cpu()``, ``bool()``, ...) is
    counted, the trainer's and DeepSpeed's (bf16 ZeRO-2: its gradient check is folded into the
    trainer's). The step reads once (the ranks' agreement); ``skip`` adds one read per
    micro-batch."""
    from claver_dist.distributed import DistEnv
    from claver_dist.train.trainer import Trainer

    cfg = load_config(REPO / "configs/debug.yaml", overrides(demo_data, tmp_path / "run", "train.max_steps=4",
                                                              "train.grad_accum=3", "data.batch_size=2",
                                                              f"train.on_nonfinite={policy}"))
    trainer = Trainer(cfg, DistEnv.from_environ({}, device="cpu"))
    batches = iter(trainer.train_loader)
    trainer.train_step([next(batches) for _ in range(3)])  # first step: lazy set-up is not the loop's cost
    group = [next(batches) for _ in range(3)]
    reads = []
    for name in HOST_READS:
        real = getattr(torch.Tensor, name)

        def counted(self, *a, _real=real, _name=name, **kw):
            # host-side by design, no device synchronisation: torch's non-fused Adam keeps its
            # step counts on the host (on CUDA the engine uses fused AdamW: on the device), and
            # the step's prompt variants are drawn from a host generator
            stack = traceback.extract_stack(limit=3)
            if any("torch/optim/" in f.filename or f.name == "sample_indices" for f in stack):
                return _real(self, *a, **kw)
            if not reads or reads[-1] is not None:  # not a read nested in a counted one
                reads.append(None)
                try:
                    return _real(self, *a, **kw)
                finally:
                    reads[-1] = (_name, "".join(traceback.format_stack(limit=4)[:-1]))
            return _real(self, *a, **kw)

        monkeypatch.setattr(torch.Tensor, name, counted)
    trainer.step += 1
    out = trainer.train_step(group)
    monkeypatch.undo()
    trainer.close()
    assert out["loss"] == out["loss"]
    assert len(reads) == budget, "\n".join(f"{n}:\n{where}" for n, where in reads)
