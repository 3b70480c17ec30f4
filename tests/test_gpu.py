"""The first-GPU set: what only a CUDA device can show, meant to take <= 3 minutes on one GPU.

    python -m pytest -m gpu tests/            # every gpu-marked test; each skips, saying why, without CUDA
    python tools/gpu_check.py                 # this set, the preflight and bench_train: one table (make gpu-check)

- 20 bf16 DeepSpeed steps of the debug model with FlexAttention: the loss is finite and falls;
- resume on the GPU: a run restarted from its step-10 checkpoint repeats the next losses and
  ends with the same weights;
- ``model.compile=true`` against eager: the same losses within the bf16 tolerance;
- FlexAttention against the dense path, forward and backward in bf16, at the B/16 temporal
  block's shape and through the debug model: no further from fp32 than the dense path is;
- DALI's mixed (NVDEC) decode gives the TSN frame indices, where DALI is installed.

Training runs are the real entry point, ``python -m claver_dist.train configs/debug.yaml``, one
process, on synthetic motion shards stored with ``make_shards --copy`` (no ffmpeg binary
needed: the lent GPU machines have none). Numbers (losses, rates, errors) go to the junit XML
through ``record_property``; tools/gpu_check.py puts them in its table.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent


def _no_cuda_reason() -> str:
    if torch.version.cuda is None:
        return f"needs a CUDA GPU: this torch ({torch.__version__}) is a CPU build"
    return f"needs a CUDA GPU: none visible (torch {torch.__version__}, CUDA {torch.version.cuda})"


pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason=_no_cuda_reason())]

STEPS, SAVE_AT = 20, 10
# The regime in which the tiny random model learns within ~20 steps (tests/test_train.py's LEARNABLE).
LEARNABLE = ("model.init_logit_scale=3.4", "optim.lr=5e-4", "optim.warmup_epochs=0")
# docs/training.md: bf16 runs that compute the same thing in another order stay within 3% over the first steps
BF16_RTOL = 0.03


def need(*modules: str) -> None:
    """Skip, naming them, when modules the check needs are not installed."""
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        pytest.skip(f"not installed: {', '.join(missing)}")


def note(record_property, **values) -> None:
    """Numbers for the report (junit XML properties) and for ``pytest -s``."""
    for k, v in values.items():
        record_property(k, v)
        print(f"{k} = {v}")


# --------------------------------------------------------------------------- data


def build_copied_motion_shards(root: Path) -> Path:
    """4 motion classes x 12 train / 4 val videos (80x64, 16-20 frames, H.264 written by PyAV),
    packed with ``make_shards --copy``: the stored bytes are PyAV's, no ffmpeg binary is run."""
    from claver_dist.data.synthetic import MotionSpec, write_motion_dataset
    from tools.make_shards import main as make_shards

    paths = write_motion_dataset(root / "videos", num_classes=4, per_class=12, val_per_class=4,
                                 spec=MotionSpec(width=80, height=64, min_frames=16, max_frames=20), seed=0)
    shards = root / "shards"
    for split in ("train", "val"):
        assert make_shards([str(paths[split]), "--labels", str(paths["labels"]), "--out", str(shards), "--split",
                            split, "--copy", "--workers", "1", "--no-progress"]) == 0
    shutil.copy(paths["labels"], shards / "labels.csv")
    return shards


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    need("av", "open_clip")
    return build_copied_motion_shards(tmp_path_factory.mktemp("gpu_motion"))


# --------------------------------------------------------------------------- training runs


@dataclass
class Run:
    dir: Path
    rc: int | str | None = None
    wall_s: float = 0.0
    rows: list[dict] = field(default_factory=list)

    @property
    def log(self) -> str:
        path = self.dir.parent / f"{self.dir.name}.log"
        return path.read_text(errors="replace") if path.is_file() else ""

    @property
    def losses(self) -> dict[int, float]:
        """The last logged loss of every step."""
        return {r["step"]: r["loss"] for r in self.rows if "loss" in r}

    def median(self, key: str, first: int = 3) -> float | None:
        """Median of a per-step metric after the first steps (compilation, warm-up)."""
        vals = [r[key] for r in self.rows if key in r and r.get("step", 0) > first and r[key] is not None]
        return statistics.median(vals) if vals else None


def start(run_dir: Path, data: Path, *extra: str) -> tuple[subprocess.Popen, Run, float]:
    """``python -m claver_dist.train configs/debug.yaml`` on CUDA, bf16, FlexAttention, 20 steps."""
    cmd = [sys.executable, "-m", "claver_dist.train", str(REPO / "configs/debug.yaml"),
           f"data.train_shards={data}", "data.val_shards=", f"text.labels={data / 'labels.csv'}",
           f"run_dir={run_dir}", "data.batch_size=8", "data.num_workers=2", "log.every_steps=1",
           "log.count_flops=false", "log.progress_bar=false", "train.device=cuda", "train.precision=bf16",
           "model.attention=flex", f"train.max_steps={STEPS}", f"checkpoint.every_steps={SAVE_AT}",
           "checkpoint.keep_last=2", *LEARNABLE, *extra]
    # one process on its own: no launcher's or SLURM's rank variables leak in from this process
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "TORCHELASTIC_"))
           and k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env.update(PYTHONUNBUFFERED="1",
               PYTHONPATH=os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]))
    log = open(run_dir.parent / f"{run_dir.name}.log", "wb")
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    log.close()
    return proc, Run(run_dir), time.perf_counter()


def finish(proc: subprocess.Popen, run: Run, t0: float, timeout: float = 240) -> Run:
    """Wait for the run (a hung one is killed: the whole set must fit gpu_check's few minutes)."""
    try:
        run.rc = proc.wait(timeout=max(0.0, timeout - (time.perf_counter() - t0)))
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        run.rc = f"killed after {timeout:.0f} s"
    run.wall_s = time.perf_counter() - t0
    metrics = run.dir / "metrics.jsonl"
    if metrics.is_file():
        run.rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    return run


def compile_field_missing() -> str | None:
    from claver_dist.model.config import ModelConfig

    if "compile" in getattr(ModelConfig, "__dataclass_fields__", {}):
        return None
    return ("ModelConfig has no `compile` field (model.compile, issue 18 part 4: regional torch.compile "
            "per block) in this checkout")


@pytest.fixture(scope="module")
def runs(shards, tmp_path_factory) -> dict[str, Run]:
    """The eager FlexAttention run and, beside it on the same GPU, the compiled one."""
    need("deepspeed", "open_clip", "safetensors")
    root = tmp_path_factory.mktemp("gpu_runs")
    eager = start(root / "eager", shards)
    compiled = None if compile_field_missing() else start(root / "compiled", shards, "model.compile=true")
    out = {"eager": finish(*eager)}
    if compiled is not None:
        out["compiled"] = finish(*compiled)
    return out


def _ok(run: Run) -> None:
    assert run.rc == 0, f"training exited with {run.rc}:\n{run.log[-4000:]}"


def test_flex_bf16_deepspeed_steps_train(runs, record_property):
    run = runs["eager"]
    _ok(run)
    losses = run.losses
    assert sorted(losses) == list(range(1, STEPS + 1)), sorted(losses)
    assert all(torch.isfinite(torch.tensor(v)) for v in losses.values()), losses
    first = statistics.mean(losses[s] for s in range(1, 5))
    last = statistics.mean(losses[s] for s in range(STEPS - 3, STEPS + 1))
    note(record_property, loss_first4=round(first, 4), loss_last4=round(last, 4), wall_s=round(run.wall_s, 1),
         clips_per_s=run.median("clips_per_s"), step_ms=round(1000 * (run.median("step_time_s") or 0), 1),
         peak_mem_gb=run.median("peak_mem_gb"))
    assert last < first - 0.03, f"loss did not decrease: {first:.3f} -> {last:.3f}"
    # FlexAttention really ran: the dense fallback says so once in the log
    assert "uses the dense" not in run.log, run.log[-2000:]


def test_resume_on_gpu_repeats_the_run(runs, shards, tmp_path, record_property):
    """From the step-10 checkpoint of the eager run, a new run folder trains steps 11-20: the
    first of them sees the same weights, optimiser state, data position and random draws
    (identical loss); the rest and the final weights match within 1e-3 (GPU kernels need not
    be bitwise reproducible; the report says whether they were)."""
    from safetensors.torch import load_file

    ref = runs["eager"]
    _ok(ref)
    ckpt = ref.dir / "checkpoints" / f"step_{SAVE_AT:08d}"
    assert (ckpt / "COMPLETE").is_file(), sorted(p.name for p in (ref.dir / "checkpoints").iterdir())
    run = finish(*start(tmp_path / "resumed", shards, f"checkpoint.resume={ckpt}"))
    _ok(run)
    assert f"resumed from {ckpt}" in run.log
    got, want = run.losses, ref.losses
    assert sorted(got) == list(range(SAVE_AT + 1, STEPS + 1)), sorted(got)
    a, b = load_file(str(ref.dir / "export/model.safetensors")), load_file(str(run.dir / "export/model.safetensors"))
    assert a.keys() == b.keys()
    loss_diff = max(abs(got[s] - want[s]) for s in got)
    weight_diff = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
    note(record_property, max_loss_diff=loss_diff, max_weight_diff=weight_diff,
         bitwise=loss_diff == 0 and weight_diff == 0, resume_wall_s=round(run.wall_s, 1))
    assert got[SAVE_AT + 1] == want[SAVE_AT + 1]
    for s in got:
        assert abs(got[s] - want[s]) <= 1e-3 * abs(want[s]), (s, got[s], want[s])
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-3, atol=1e-5, msg=k)


def test_compiled_matches_eager_in_bf16(runs, record_property):
    missing = compile_field_missing()
    assert missing is None, missing
    eager, compiled = runs["eager"], runs["compiled"]
    _ok(eager)
    _ok(compiled)
    e, c = eager.losses, compiled.losses
    assert sorted(c) == sorted(e)
    rel = {s: abs(c[s] - e[s]) / abs(e[s]) for s in e}
    compile_lines = [line.split("model.compile: ", 2)[-1].strip()[:160] for line in compiled.log.splitlines()
                     if "claver_dist.model.compile" in line][:2]
    note(record_property, max_rel_diff_steps_1_5=round(max(rel[s] for s in range(1, 6)), 5),
         max_rel_diff_all=round(max(rel.values()), 5), eager_wall_s=round(eager.wall_s, 1),
         compiled_wall_s=round(compiled.wall_s, 1), compile_log=" | ".join(compile_lines) or "none")
    for s in range(1, 6):
        assert rel[s] <= BF16_RTOL, (s, c[s], e[s])


# --------------------------------------------------------------------------- FlexAttention vs dense


def _rel(x: torch.Tensor, ref: torch.Tensor) -> float:
    return ((x.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-12)).item()


def _time_ms(fn, iters: int = 10) -> float:
    for _ in range(3):
        fn()
    start_ev, end_ev = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start_ev.record()
    for _ in range(iters):
        fn()
    end_ev.record()
    torch.cuda.synchronize()
    return start_ev.elapsed_time(end_ev) / iters


@pytest.mark.parametrize("causal", [False, True], ids=["kmt", "kmct"])
def test_flex_matches_dense_bf16_at_b16_shape(causal, record_property):
    """The temporal block's attention at B/16 8x224 (batch 8, 12 heads of 64, 8 x 197 tokens):
    bf16 FlexAttention is no further from an fp32 reference than bf16 dense attention is,
    in the output and in the three input gradients."""
    from claver_dist.model.attention import flex_available, kronecker_attention

    if not flex_available():
        pytest.skip(f"FlexAttention needs torch >= 2.5 (this is {torch.__version__})")
    B, H, T, L, Dh = 8, 12, 8, 197, 64
    g = torch.Generator(device="cuda").manual_seed(0)
    base = [torch.randn(B, H, T * L, Dh, device="cuda", generator=g) for _ in range(3)]
    weight = torch.randn(B, H, T * L, Dh, device="cuda", generator=g)

    def run(impl: str, dtype: torch.dtype):
        qkv = [t.detach().to(dtype).requires_grad_(True) for t in base]
        out = kronecker_attention(*qkv, T, causal, impl)
        (out.float() * weight).sum().backward()
        return out.detach(), [t.grad for t in qkv]

    ref = run("dense", torch.float32)
    errs = {}
    for impl in ("dense", "flex"):
        out, grads = run(impl, torch.bfloat16)
        errs[impl] = [_rel(out, ref[0])] + [_rel(a, b) for a, b in zip(grads, ref[1])]
    times = {}
    for impl in ("dense", "flex"):
        qkv = [t.to(torch.bfloat16).requires_grad_(True) for t in base]
        times[impl] = _time_ms(
            lambda qkv=qkv, impl=impl: kronecker_attention(*qkv, T, causal, impl).sum().backward())
    note(record_property, dense_bf16_err=[round(e, 5) for e in errs["dense"]],
         flex_bf16_err=[round(e, 5) for e in errs["flex"]], dense_fwd_bwd_ms=round(times["dense"], 3),
         flex_fwd_bwd_ms=round(times["flex"], 3))
    for what, d, f in zip(("output", "dq", "dk", "dv"), errs["dense"], errs["flex"]):
        assert f <= 2 * d + 1e-3, f"{what}: flex bf16 error {f:.2e} vs dense bf16 {d:.2e} (relative to fp32)"
        assert f < 2e-2, f"{what}: flex bf16 error {f:.2e}"


def test_flex_matches_dense_bf16_through_the_model(record_property):
    """The debug model's video features and parameter gradients under bf16 autocast: the flex
    model is no further from the fp32 dense model than the bf16 dense model is."""
    need("open_clip", "timm")
    from claver_dist.model import ModelConfig, build_model

    models = {}
    for impl in ("dense", "flex"):
        torch.manual_seed(0)
        models[impl] = build_model(ModelConfig(clip_model="claver-debug", attention=impl), 8, 64)[0].cuda().train()
    models["flex"].load_state_dict(models["dense"].state_dict())
    video = torch.randn(4, 8, 3, 64, 64, device="cuda", generator=torch.Generator(device="cuda").manual_seed(1))

    def run(impl: str, bf16: bool):
        m = models[impl]
        m.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
            feats = m.encode_video(video)
        (feats.float() * torch.linspace(-1, 1, feats.numel(), device="cuda").view_as(feats)).sum().backward()
        grads = torch.cat([p.grad.float().flatten() for _, p in sorted(m.named_parameters()) if p.grad is not None])
        return feats.detach().float(), grads

    ref = run("dense", False)
    errs = {impl: [_rel(x, r) for x, r in zip(run(impl, True), ref)] for impl in ("dense", "flex")}
    note(record_property, dense_bf16_err=[round(e, 5) for e in errs["dense"]],
         flex_bf16_err=[round(e, 5) for e in errs["flex"]])
    for what, d, f in zip(("features", "gradients"), errs["dense"], errs["flex"]):
        assert f <= 2 * d + 1e-3, f"{what}: flex bf16 error {f:.2e} vs dense bf16 {d:.2e} (relative to fp32)"


# --------------------------------------------------------------------------- DALI


def test_dali_mixed_decode_gives_tsn_indices(tmp_path, record_property):
    """DALI's mixed (NVDEC) H.264 decode of frame-numbered videos: the frames it returns are
    the TSN indices the sampler asks for; clips/s of the val loader on this GPU."""
    need("av")
    try:
        import nvidia.dali  # noqa: F401
    except ImportError as e:
        pytest.skip(f"DALI does not import ({e}): its mixed decode is not checked here")
    from claver_dist.data.augment import CLIP_MEAN, CLIP_STD
    from claver_dist.data.config import DataConfig
    from claver_dist.data.loader import build_loader
    from claver_dist.data.sampling import clip_indices
    from claver_dist.data.shards import ShardSet, resolve_shards
    from claver_dist.data.synthetic import frame_number_frames, read_frame_number, write_video
    from tools.make_shards import main as make_shards

    lines = []
    for i, n in enumerate([5, 9, 12, 16, 20, 24, 29, 33, 40, 47, 52, 60]):
        write_video(tmp_path / "v" / f"v{i:02d}.mp4", frame_number_frames(n, 64, 48))
        lines.append(f"v{i:02d}.mp4 {i % 3}")
    (tmp_path / "v/list.txt").write_text("\n".join(lines) + "\n")
    (tmp_path / "v/labels.csv").write_text("id,name\n0,a\n1,b\n2,c\n")
    out = tmp_path / "shards"
    assert make_shards([str(tmp_path / "v/list.txt"), "--labels", str(tmp_path / "v/labels.csv"), "--out", str(out),
                        "--copy", "--shard-samples", "5", "--workers", "1", "--no-progress"]) == 0
    s = ShardSet(*resolve_shards(str(out), "train"))
    frames = {s.keys[i]: s.load(i)[1]["frames"] for i in range(len(s))}
    cfg = DataConfig(backend="dali", train_shards=str(out), val_shards=str(out), val_split="train", num_frames=8,
                     image_size=32, batch_size=4, num_workers=0)
    loader = build_loader(cfg, "val", device="cuda", views=(2, 1))  # 2 temporal clips x 1 crop
    assert loader.backend_name == "dali"
    mean, std = torch.tensor(CLIP_MEAN).view(3, 1, 1), torch.tensor(CLIP_STD).view(3, 1, 1)
    seen, t0 = 0, time.perf_counter()
    for batch in loader:
        assert batch["video"].is_cuda and batch["video"].shape[1:] == (2, 8, 3, 32, 32)
        for key, video, ok in zip(batch["key"], batch["video"].cpu(), batch["valid"]):
            if ok:
                got = [read_frame_number(((f * std + mean) * 255).permute(1, 2, 0).numpy())
                       for f in video.flatten(0, 1)]
                assert got == clip_indices(frames[key], 8, train=False, clips=2), key
                seen += 1
    note(record_property, clips=seen, clips_per_s=round(seen / (time.perf_counter() - t0), 1))
    assert seen == len(frames)
