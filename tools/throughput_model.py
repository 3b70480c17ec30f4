"""Per-component throughput model for one GPU: which part of the pipeline binds first.

    python tools/throughput_model.py                            # k400_b16_8f, 300 clips/s, 1 and 8 GPUs
    python tools/throughput_model.py --decode-rate 45 --mfu 0.3 --cores-per-gpu 16
    python tools/throughput_model.py --config configs/k400_b16_16f.yaml --target 150

For each component of a training step the tool gives its capacity in clips/s per GPU and
what the target rate (default 300 clips/s, issue 18's goal for B/16 8x224) demands of it:

- **decode** (CPU): clips/s per core x the cores a GPU gets. The per-core rate is a
  measured input (``--decode-rate``; docs/benchmarks.md, "Data loading"), not derived here;
- **host-to-device copy**: ``B x T x 3 x S x S`` batches in float32 (today) or uint8,
  against an assumed PCIe bandwidth;
- **GPU compute**: vision forward+backward FLOPs per clip and the text tower's FLOPs per
  optimiser step (K x C prompts, split over N GPUs by ``text.shard_text``), counted by
  ``tools/bench_train.py``'s counter on the config's model, at an assumed MFU of the
  H100/H200 bf16 dense peak;
- **collectives** (N > 1): the text features' all-gather (forward) and reduce-scatter
  (backward), and ZeRO-2's gradient all-reduce and parameter all-gather, exactly as
  ``tools/scaling_model.py`` counts them (docs/scaling.md); DeepSpeed runs with
  ``overlap_comm`` off, so their time adds to the compute of the step.

The CPU, the bus and the GPU work side by side (the loader prepares the next batches while
the GPU steps), so the pipeline runs at the smallest of the three capacities: the tool
names it. Results: docs/benchmarks.md, "Throughput model".
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from dataclasses import dataclass

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import scaling_model  # noqa: E402  tools/scaling_model.py: Model, load, traffic, comm_time

GB = 1e9
# H100 SXM and H200 SXM: the same bf16 dense tensor peak (989.4 TFLOP/s; 1,979 is with
# sparsity), the same PCIe Gen5 x16 host link. The H200 differs in memory (141 vs 80 GB,
# 4.8 vs 3.35 TB/s), which changes the largest micro-batch, not this model's rates.
PEAK_TFLOPS = {"H100 SXM": 989.4, "H200 SXM": 989.4}


@dataclass
class Component:
    name: str
    resource: str          # "cpu", "pcie" or "gpu": components of one resource add up
    capacity: float        # clips/s per GPU this component alone allows
    demand: str            # what the target rate asks of it, in the component's unit
    note: str = ""


def clip_bytes(frames: int, size: int, dtype_bytes: int) -> int:
    """Bytes of one clip's ``T x 3 x S x S`` tensor."""
    return frames * 3 * size * size * dtype_bytes


def components(m: scaling_model.Model, frames: int, size: int, n: int, a: argparse.Namespace) -> list[Component]:
    """Every component's capacity (clips/s per GPU) and demand at ``a.target`` clips/s, on N GPUs."""
    achieved = a.peak_tflops * 1e12 * a.mfu
    clips_step = m.batch * m.accum                         # clips per GPU per optimiser step
    text_clip = m.text_flops / n / clips_step              # text FLOPs per clip, this GPU's share
    usable = max(a.cores_per_gpu - a.reserved_cores, 0)
    out = [
        Component("decode + float augment (CPU, as measured)", "cpu", usable * a.decode_rate,
                  f"{a.target / a.decode_rate:.1f} cores", f"{a.decode_rate:g} clips/s/core x {usable:g} cores"),
        Component("decode + uint8 crop/resize (CPU; rest on GPU)", "cpu-uint8", usable * a.decode_rate_uint8,
                  f"{a.target / a.decode_rate_uint8:.1f} cores",
                  f"{a.decode_rate_uint8:g} clips/s/core x {usable:g} cores"),
    ]
    for label, nbytes in (("float32", 4), ("uint8", 1)):
        b = clip_bytes(frames, size, nbytes)
        out.append(Component(f"host-to-device copy, {label}", "pcie" if nbytes == 4 else "pcie-uint8",
                             a.pcie_gbs * GB / b, f"{a.target * b / GB:.2f} GB/s",
                             f"{b / 1e6:.2f} MB/clip at {a.pcie_gbs:g} GB/s"))
    out.append(Component("vision fwd+bwd", "gpu", achieved / m.clip_flops,
                         f"{a.target * m.clip_flops / 1e12:.0f} TFLOP/s", f"{m.clip_flops / 1e9:,.1f} GFLOP/clip"))
    out.append(Component("text fwd+bwd" + (f" (1/{n} per GPU)" if n > 1 else ""), "gpu",
                         achieved / text_clip if text_clip else math.inf, f"{a.target * text_clip / 1e12:.0f} TFLOP/s",
                         f"{m.text_flops / 1e12:.1f} TFLOP/step / {n} GPU / {clips_step} clips = "
                         f"{text_clip / 1e9:,.0f} GFLOP/clip"))
    if n > 1:
        t = scaling_model.traffic(m, n, a.classes)
        nics = a.nics
        bw = scaling_model.busbw(n, a.per_node, a, nics) * GB
        nodes = math.ceil(n / a.per_node)
        text_lat = 2 * scaling_model.ring_latency_s(n - 1, nodes, nodes - 1) if t["text"] else 0.0
        text_s = t["text"] / bw + text_lat
        out.append(Component("text all-gather + reduce-scatter", "gpu", clips_step / text_s if text_s else math.inf,
                             f"{a.target / clips_step * t['text'] / 1e6:.1f} MB/s",
                             f"{t['text'] / 1e6:.2f} MB/step at {bw / GB:.0f} GB/s + {text_lat * 1e6:.0f} us"))
        bw_s, lat_s, _ = scaling_model.comm_time(m, n, a, nics)
        grad_s = bw_s + lat_s - text_s
        out.append(Component("ZeRO-2 gradient all-reduce + param all-gather", "gpu", clips_step / grad_s,
                             f"{a.target / clips_step * (t['grad_allreduce'] + t['param_allgather']) / GB:.1f} GB/s",
                             f"{(t['grad_allreduce'] + t['param_allgather']) / 1e6:,.0f} MB/step, not overlapped"))
    return out


def resource_capacity(parts: list[Component], resource: str) -> float:
    """Clips/s of one resource: its components run one after another (times per clip add)."""
    per_clip = sum(1 / c.capacity for c in parts if c.resource == resource and c.capacity > 0)
    return 1 / per_clip if per_clip else math.inf


def ranked(parts: list[Component], cpu: str = "cpu", pcie: str = "pcie") -> list[tuple[str, float]]:
    """The three resources, slowest first, with their clips/s."""
    caps = {"CPU decode": resource_capacity(parts, cpu), "PCIe copy": resource_capacity(parts, pcie),
            "GPU step": resource_capacity(parts, "gpu")}
    return sorted(caps.items(), key=lambda kv: kv[1])


def binding(parts: list[Component], cpu: str = "cpu", pcie: str = "pcie") -> tuple[str, float]:
    """The resource that limits the pipeline, and its clips/s: CPU decode, the bus and the GPU
    step run side by side, so the slowest of them sets the rate."""
    return ranked(parts, cpu, pcie)[0]


def needed_mfu(parts: list[Component], m: scaling_model.Model, n: int, a: argparse.Namespace) -> float:
    """MFU at which the GPU step reaches ``a.target`` clips/s: the compute per clip must fit in
    what is left of each second after the collectives (which scale with the clips, not the MFU)."""
    flops_clip = m.clip_flops + m.text_flops / n / (m.batch * m.accum)
    comm_per_clip = sum(1 / c.capacity for c in parts if c.resource == "gpu" and c.capacity > 0
                        and not c.name.startswith(("vision", "text fwd")))
    left = 1 - a.target * comm_per_clip
    return math.inf if left <= 0 else a.target * flops_clip / left / (a.peak_tflops * 1e12)


def sweep(m: scaling_model.Model, frames: int, size: int, a: argparse.Namespace) -> list[str]:
    """Capacities of the CPU and the GPU step over the two inputs the answer hangs on."""
    lines = ["", "sensitivity: GPU step clips/s by MFU; CPU decode clips/s by the per-core rate "
             f"({a.cores_per_gpu:g} cores per GPU, {a.reserved_cores:g} reserved)",
             "| N | " + " | ".join(f"GPU at MFU {u:.0%}" for u in a.sweep_mfu) + " | "
             + " | ".join(f"CPU at {r:g}/core" for r in a.sweep_decode) + " |",
             "|---|" + "---|" * (len(a.sweep_mfu) + len(a.sweep_decode))]
    for n in a.gpus:
        gpu = [resource_capacity(components(m, frames, size, n, argparse.Namespace(**{**vars(a), "mfu": u})), "gpu")
               for u in a.sweep_mfu]
        cpu = [max(a.cores_per_gpu - a.reserved_cores, 0) * r for r in a.sweep_decode]
        lines.append(f"| {n} | " + " | ".join(f"{v:,.0f}" for v in gpu + cpu) + " |")
    return lines


def bench_train_prediction(clip_flops: float, text_flops: float, batch: int, achieved_flops: float) -> float:
    """Clips/s that ``tools/bench_train.py --time`` should time at ``achieved_flops`` FLOP/s:
    ``batch`` clips and the whole K x C text work every step, one GPU, no data, no collectives
    (tools/gpu_check.py puts it beside the measurement)."""
    return batch * achieved_flops / (batch * clip_flops + text_flops)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="claver-throughput-model", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/k400_b16_8f.yaml")
    p.add_argument("--target", type=float, default=300.0, help="clips/s per GPU to reach")
    p.add_argument("--gpus", nargs="+", type=int, default=[1, 8], help="GPUs in the job (text sharded over them)")
    p.add_argument("--classes", type=int, default=400, help="C (Kinetics-400)")
    p.add_argument("--mfu", type=float, default=0.40, help="achieved fraction of the bf16 dense peak (assumed)")
    p.add_argument("--peak-tflops", type=float, default=PEAK_TFLOPS["H100 SXM"],
                   help="bf16 dense peak per GPU (H100 SXM = H200 SXM = 989.4)")
    p.add_argument("--decode-rate", type=float, default=23.0,
                   help="clips/s per core, decode + crop/resize + float augmentation of T frames at S px "
                        "(docs/benchmarks.md, 'Data loading': 19-27 measured; default the middle)")
    p.add_argument("--decode-rate-uint8", type=float, default=45.0,
                   help="clips/s per core, decode + uint8 crop/resize, the rest on the GPU (default: the goal; "
                        "docs/benchmarks.md, 'Decode speed per core': 44.1 on synthetic, 33.9 on textured clips)")
    p.add_argument("--cores-per-gpu", type=float, default=14.0,
                   help="CPU cores per GPU (DGX H100/H200: 112 cores / 8 GPUs; the lent machine: 16)")
    p.add_argument("--reserved-cores", type=float, default=1.0,
                   help="cores per GPU not decoding (the training process itself)")
    p.add_argument("--pcie-gbs", type=float, default=50.0,
                   help="achieved host-to-device GB/s per GPU, pinned memory (PCIe Gen5 x16: 64 raw)")
    # collectives: the assumptions of tools/scaling_model.py
    p.add_argument("--per-node", type=int, default=8)
    p.add_argument("--nvlink-gbs", type=float, default=450.0)
    p.add_argument("--nvlink-eff", type=float, default=0.75)
    p.add_argument("--ib-gbs", type=float, default=50.0)
    p.add_argument("--ib-eff", type=float, default=0.8)
    p.add_argument("--nics", type=int, default=8, help="NICs per node")
    p.add_argument("--sweep-mfu", nargs="+", type=float, default=[0.3, 0.4, 0.5])
    p.add_argument("--sweep-decode", nargs="+", type=float, default=[19.0, 27.0, 45.0],
                   help="clips/s per core: today's range and issue 18's goal")
    p.add_argument("--bench-batch", type=int, default=8, help="batch of bench_train.py's timed loop")
    return p.parse_args(argv)


def report(m: scaling_model.Model, frames: int, size: int, a: argparse.Namespace) -> str:
    lines = [f"{m.name}: {frames} x {size} px, batch {m.batch} x accum {m.accum} per GPU, "
             f"K={m.k} x C={a.classes} prompts per step; target {a.target:g} clips/s per GPU; "
             f"assumed {a.mfu:.0%} MFU of {a.peak_tflops:g} TFLOP/s (H100 SXM = H200 SXM) = "
             f"{a.peak_tflops * a.mfu:.0f} TFLOP/s achieved"]
    for n in a.gpus:
        parts = components(m, frames, size, n, a)
        lines += ["", f"N = {n} GPU{'s' if n > 1 else ''}:",
                  "| component | capacity, clips/s per GPU | at the target | from |", "|---|---|---|---|"]
        lines += [f"| {c.name} | {c.capacity:,.0f} | {c.demand} | {c.note} |" for c in parts]
        for label, cpu, pcie in (("float32 batches, float augmentation on the CPU", "cpu", "pcie"),
                                 ("uint8 batches, flip/colour/normalise on the GPU", "cpu-uint8", "pcie-uint8")):
            (name, cap), (nxt, nxt_cap), _ = ranked(parts, cpu, pcie)
            lines.append(f"- {label}: binds first: **{name}** at {cap:,.0f} clips/s "
                         f"({'meets' if cap >= a.target else 'misses'} {a.target:g}); next {nxt} at "
                         f"{nxt_cap:,.0f} (+{nxt_cap / cap - 1:.0%})")
        lines.append(f"- MFU the GPU step needs for {a.target:g} clips/s: {needed_mfu(parts, m, n, a):.0%}"
                     + (" (the collectives' time included)" if n > 1 else ""))
    lines += sweep(m, frames, size, a)
    pred = bench_train_prediction(m.clip_flops, m.text_flops, a.bench_batch, a.peak_tflops * 1e12 * a.mfu)
    lines += ["", f"prediction for `tools/bench_train.py --time` (batch {a.bench_batch}, all {m.k} x {a.classes} "
              f"prompts every step, one GPU, no data): {pred:,.0f} clips/s at {a.mfu:.0%} MFU of {a.peak_tflops:g}"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    from claver_dist.config import load_config

    cfg = load_config(a.config)
    m = scaling_model.load(a.config, a.classes)
    print(report(m, cfg.data.num_frames, cfg.data.image_size, a))
    return 0


if __name__ == "__main__":
    sys.exit(main())
