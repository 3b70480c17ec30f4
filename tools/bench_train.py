"""Training-step benchmark: FLOPs, step-time split, clips/s, MFU and peak memory per config.

    python tools/bench_train.py                       # CPU: debug model timed, FLOPs of every config
    python tools/bench_train.py --time all --batch 8  # GPU: time every config (bf16)
    python tools/bench_train.py --text-sharding       # 2 CPU processes: text time, sharded vs plain
    python tools/bench_train.py --time --cost 300     # FLOPs only, and GPU-hours per paper row at 300 TFLOP/s

Model FLOPs are counted with PyTorch's FlopCounterMode on the meta device (shapes only,
instant): forward + backward of one clip's vision work, and of one step's text work
(K x C prompts of the config's bank, trimmed to the longest prompt). The timed loop runs
the model on random clips from memory (no data loading: see tools/bench_data.py) with
AdamW; each phase is timed with device synchronisation: vision forward, text forward,
backward, optimiser. MFU = achieved model FLOP/s / peak (a measured bf16 matmul peak on
GPU). Results for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time
from dataclasses import dataclass

import torch

# name -> (open_clip model, frames, size)
CONFIGS = {
    "debug": ("claver-debug", 8, 64),
    "b32_8x224": ("ViT-B-32-quickgelu", 8, 224),
    "b32_16x224": ("ViT-B-32-quickgelu", 16, 224),
    "b16_8x224": ("ViT-B-16-quickgelu", 8, 224),
    "b16_16x224": ("ViT-B-16-quickgelu", 16, 224),
    "b16_32x224": ("ViT-B-16-quickgelu", 32, 224),
    "l14_8x224": ("ViT-L-14-quickgelu", 8, 224),
    "l14_16x336": ("ViT-L-14-336-quickgelu", 16, 336),
}


# The paper's rows (docs/reproduce.md): recipe, FLOP config, training clips per epoch, test
# videos, epochs, classes, total batch. Dataset sizes are those of the usual copies
# (Kinetics-400 ~240k/20k, Kinetics-600 ~390k/30k; few-shot: K=16 per class, split-1 tests).
PAPER_ROWS = [
    ("K400 B/32 8x224", "k400_b32_8f", "b32_8x224", 240_000, 20_000, 60, 400, 256),
    ("K400 B/32 16x224", "k400_b32_16f", "b32_16x224", 240_000, 20_000, 60, 400, 256),
    ("K400 B/16 8x224", "k400_b16_8f", "b16_8x224", 240_000, 20_000, 60, 400, 256),
    ("K400 B/16 16x224", "k400_b16_16f", "b16_16x224", 240_000, 20_000, 60, 400, 256),
    ("K400 B/16 32x224 (zero-/few-shot start)", "k400_b16_32f", "b16_32x224", 240_000, 20_000, 60, 400, 256),
    ("K400 L/14 8x224", "k400_l14", "l14_8x224", 240_000, 20_000, 60, 400, 256),
    ("K400 L/14 16x336", "k400_l14_336", "l14_16x336", 240_000, 20_000, 60, 400, 256),
    ("K600 B/16 8x224", "k600_b16_8f", "b16_8x224", 390_000, 30_000, 60, 600, 256),
    ("HMDB-51 few-shot K=16", "fewshot_hmdb51", "b16_32x224", 16 * 51, 1_530, 80, 51, 64),
    ("UCF-101 few-shot K=16", "fewshot_ucf101", "b16_32x224", 16 * 101, 3_783, 80, 101, 64),
]
TEST_VIEWS = 12  # 4 clips x 3 crops


def cost_table(rows: dict[str, "Row"], tflops: float, text_classes: int) -> None:
    """GPU-hours per paper row from the FLOP counts at an assumed achieved TFLOP/s per GPU."""
    print(f"\ncost at an assumed {tflops:.0f} TFLOP/s achieved per GPU (training: epochs x clips x vision "
          f"fwd+bwd + steps x text fwd+bwd; test: {TEST_VIEWS} views x vision fwd per video)")
    print("| row | recipe | train PFLOP | GPU-hours train | GPU-hours test (4x3 views) |")
    print("|---|---|---|---|---|")
    for label, recipe, flops_cfg, n_train, n_test, epochs, classes, batch in PAPER_ROWS:
        r = rows[flops_cfg]
        steps = epochs * n_train / batch
        train = epochs * n_train * r.vision_gflops * 1e9 + steps * r.text_gflops * 1e9 * classes / text_classes
        test = n_test * TEST_VIEWS * r.vision_fwd_gflops * 1e9
        hours = lambda f: f / (tflops * 1e12) / 3600  # noqa: E731
        print(f"| {label} | `{recipe}` | {train / 1e15:,.0f} | {hours(train):,.1f} | {hours(test):,.2f} |")


@dataclass
class Row:
    name: str
    params_m: float
    vision_gflops: float     # fwd+bwd per clip
    text_gflops: float       # fwd+bwd per step (K x C prompts)
    vision_fwd_gflops: float
    clips_s: float | None = None
    split_ms: str = ""
    tflops_s: float | None = None
    mfu: float | None = None
    peak_gb: float | None = None
    oom: bool = False        # timing ran out of device memory (the row keeps its FLOP counts)


def progress_line(row: Row) -> str:
    """One config's numbers the moment it is done (printed to stderr): a run cut short by a time
    limit keeps the configs it finished (tools/gpu_check.py reads them back)."""
    if row.oom:
        return (f"... {row.name} done: {row.vision_gflops:.1f} GFLOP/clip fwd+bwd, {row.text_gflops:.0f} GFLOP/step "
                "text; out of memory")
    timed = "" if row.clips_s is None else (
        f"; {row.clips_s:.1f} clips/s, {row.tflops_s:.2f} TFLOP/s, MFU "
        f"{'-' if row.mfu is None else format(row.mfu, '.1%')}, ms {row.split_ms}, peak GB "
        f"{'-' if row.peak_gb is None else format(row.peak_gb, '.1f')}")
    return (f"... {row.name} done: {row.vision_gflops:.1f} GFLOP/clip fwd+bwd, {row.text_gflops:.0f} GFLOP/step "
            "text" + timed)


def build(name: str, attention: str = "auto", ckpt: str = "none"):
    from claver_dist.model import ModelConfig, build_model

    model_name, T, S = CONFIGS[name]
    model, _ = build_model(ModelConfig(clip_model=model_name, attention=attention, grad_checkpointing=ckpt), T, S)
    return model, T, S


def prompt_tokens(num_classes: int, k: int):
    """K x C typical prompts: the Kinetics-400 bank's texts if present, else templates."""
    from claver_dist.text.prompts import load_bank, tokenize

    try:
        bank = load_bank("labels/kinetics400.csv", "prompts/kinetics400.json")
        A = bank.num_variants  # the interpretive prompts come after the templates
        texts = bank.variant_texts([(A - k + i) % A for i in range(k)])
    except (OSError, ValueError, IndexError):
        texts = [f"a video of a person doing action number {i}." for i in range(400 * k)]
    per = len(texts) // k
    picked = [texts[v * per + c] for v in range(k) for c in range(min(num_classes, per))]
    return tokenize(picked)


def count_flops(model, T: int, S: int, tokens: torch.Tensor) -> tuple[float, float, float]:
    from torch.utils.flop_counter import FlopCounterMode

    meta = model.to("meta")
    video = torch.zeros(1, T, 3, S, S, device="meta")
    with FlopCounterMode(display=False) as c:
        meta.encode_video(video)
    fwd = c.get_total_flops()
    with FlopCounterMode(display=False) as c:
        meta.encode_video(video).sum().backward()
    vision = c.get_total_flops()
    n = int(tokens.argmax(-1).max()) + 1  # what encode_text trims to (meta tensors have no values)
    with FlopCounterMode(display=False) as c:
        meta.encode_text(tokens[:, :n].to("meta")).sum().backward()
    return vision, c.get_total_flops(), fwd


def measured_peak(device: torch.device) -> float | None:
    """bf16 matmul FLOP/s measured on this GPU (8192^3 GEMMs)."""
    if device.type != "cuda":
        return None
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    t = time.perf_counter()
    n = 20
    for _ in range(n):
        a @ b
    torch.cuda.synchronize()
    return 2 * 8192**3 * n / (time.perf_counter() - t)


def time_steps(name: str, batch: int, steps: int, device: torch.device, tokens: torch.Tensor, ckpt: str,
               peak: float | None) -> dict:
    model, T, S = build(name, ckpt=ckpt)
    model = model.to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    video = torch.randn(batch, T, 3, S, S, device=device)
    tokens = tokens.to(device)
    K = 1
    C = tokens.shape[0]
    target = torch.full((batch, C), 1.0 / C, device=device)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    phases = {"vision": 0.0, "text": 0.0, "backward": 0.0, "optim": 0.0}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for i in range(steps + 2):  # 2 warm-up steps
        with torch.autocast(device.type, dtype=dtype, enabled=device.type == "cuda"):
            sync(); t0 = time.perf_counter()
            v = model.encode_video(video)
            sync(); t1 = time.perf_counter()
            txt = model.encode_text(tokens)
            sync(); t2 = time.perf_counter()
            logits = model.logits(v, txt, K)
            loss = -(target[:, None] * logits.float().log_softmax(-1)).sum(-1).mean()
        loss.backward()
        sync(); t3 = time.perf_counter()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync(); t4 = time.perf_counter()
        if i >= 2:
            for k, dt in zip(phases, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
                phases[k] += dt
    total = sum(phases.values())
    out = {"clips_s": batch * steps / total,
           "split_ms": "/".join(f"{1000 * phases[k] / steps:.0f}" for k in phases),
           "peak_gb": (torch.cuda.max_memory_allocated(device) / 2**30) if device.type == "cuda" else None,
           "step_s": total / steps}
    return out


def text_sharding_ratio(num_prompts: int = 200, repeats: int = 2) -> None:
    """2 gloo processes: text forward+backward time per step, sharded vs plain."""
    import torch.multiprocessing as mp

    from claver_dist.distributed import free_port

    out = mp.Manager().dict()
    mp.spawn(_shard_worker, args=(2, free_port(), num_prompts, repeats, out), nprocs=2, join=True)
    print(f"\ntext tower, {num_prompts} prompts per step, 2 CPU processes (ViT-B-16 text tower, fwd+bwd):")
    print("| path | s/step | ratio |\n|---|---|---|")
    print(f"| plain (every rank encodes all) | {out['plain']:.3f} | 1.00 |")
    print(f"| sharded (all-gather with autograd) | {out['sharded']:.3f} | {out['sharded'] / out['plain']:.2f} |")


def _shard_worker(rank, world, port, n, repeats, out):
    import torch.distributed as dist

    from claver_dist.train.sharded_text import encode_text_sharded

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(0)
    model, _, _ = build("b16_8x224")
    tokens = prompt_tokens(n, 1)
    times = {}
    for mode in ("plain", "sharded", "plain", "sharded"):
        dist.barrier()
        t = time.perf_counter()
        for _ in range(repeats):
            feats = encode_text_sharded(model, tokens, torch.device("cpu")) if mode == "sharded" \
                else model.encode_text(tokens)
            feats.sum().backward()
        dist.barrier()
        times[mode] = (time.perf_counter() - t) / repeats  # second round wins (warm)
    if rank == 0:
        out.update(times)
    dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="claver-bench-train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--time", nargs="*", default=None,
                   help="configs to time ('all'); default: debug on CPU, all on GPU")
    p.add_argument("--batch", type=int, default=None, help="clips per step (default 8 GPU, 4 CPU)")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--classes", type=int, default=400, help="C for the text work (K=5 variants)")
    p.add_argument("--checkpointing", default="none", choices=["none", "temporal", "spatial", "all"])
    p.add_argument("--text-sharding", action="store_true", help="only the 2-process text sharding comparison")
    p.add_argument("--cost", type=float, default=None, metavar="TFLOPS",
                   help="also print GPU-hours per paper row at this achieved TFLOP/s per GPU")
    args = p.parse_args(argv)
    if args.text_sharding:
        text_sharding_ratio()
        return 0
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    timed = args.time if args.time is not None else (list(CONFIGS) if device.type == "cuda" else ["debug"])
    if timed == ["all"]:
        timed = list(CONFIGS)
    batch = args.batch or (8 if device.type == "cuda" else 4)
    peak = measured_peak(device)
    K = 5
    tokens = prompt_tokens(args.classes, K)
    rows = []
    for name in CONFIGS:
        model, T, S = build(name)
        params = sum(p.numel() for p in model.parameters()) / 1e6
        vision, text, fwd = count_flops(model, T, S, tokens)
        row = Row(name, params, vision / 1e9, text / 1e9, fwd / 1e9)
        if name in timed:
            try:
                r = time_steps(name, batch, args.steps, device, tokens, args.checkpointing, peak)
            except torch.OutOfMemoryError:
                # one config too large for this batch must not cost the others (L/14 16x336 at
                # batch 8 without checkpointing needs more than an H200's 140 GB); the frames of
                # the failed step go with the exception, so the cache can be emptied after it
                r = None
            if r is None:
                row.oom = True
                gc.collect()
                torch.cuda.empty_cache()
            else:
                row.clips_s, row.split_ms, row.peak_gb = r["clips_s"], r["split_ms"], r["peak_gb"]
                flops = batch * vision + text
                row.tflops_s = flops / r["step_s"] / 1e12
                row.mfu = flops / r["step_s"] / peak if peak else None
        rows.append(row)
        print(progress_line(row), file=sys.stderr, flush=True)
    dev = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({os.cpu_count()} cores)"
    print(f"\ndevice: {dev}; batch {batch} clips/step; text: K={K} x C={args.classes} prompts per step; "
          f"checkpointing: {args.checkpointing}" + (f"; measured bf16 peak {peak / 1e12:.0f} TFLOP/s" if peak else ""))
    print("| config | params (M) | vision GFLOPs/clip fwd | fwd+bwd | text GFLOPs/step fwd+bwd | clips/s "
          "| ms vision/text/bwd/optim | TFLOP/s | MFU | peak GB |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        f = lambda v, fmt: "-" if v is None else format(v, fmt)  # noqa: E731
        print(f"| {r.name} | {r.params_m:.1f} | {r.vision_fwd_gflops:.1f} | {r.vision_gflops:.1f} | "
              f"{r.text_gflops:.0f} | {'OOM' if r.oom else f(r.clips_s, '.1f')} | {r.split_ms or '-'} | {f(r.tflops_s, '.2f')} | "
              f"{f(r.mfu, '.1%')} | {f(r.peak_gb, '.1f')} |")
    if args.cost:
        cost_table({r.name: r for r in rows}, args.cost, args.classes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
