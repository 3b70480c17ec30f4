"""The scaling model on paper: ZeRO-2 traffic, its time against compute, per-GPU memory.

    python tools/scaling_model.py                                  # K400 B/16 8x224 and L/14 8x224
    python tools/scaling_model.py --gpus 8 64 512 --tflops 300
    python tools/scaling_model.py --configs configs/k400_b16_32f.yaml --nvlink-eff 0.8

Parameters are counted on the models the configs build (random init, CPU); FLOPs with
tools/bench_train.py's counter (forward + backward of one clip; one step's K x C prompts).
Everything else is a stated assumption with a flag: achieved TFLOP/s, link bandwidths and
efficiencies, NCCL's ring latency constants. The collectives are those DeepSpeed 0.19 runs
for ``claver_dist/train/engine.py``'s config (ZeRO-2, bf16, overlap_comm off, 5e8-element
buckets, ``use_multi_rank_bucket_allreduce`` at its default): an all-reduce of the bf16
gradient bucket at every micro-batch, an all-gather of the bf16 parameters once per
optimiser step (one per parameter group), and the text features' all-gather (forward) and
reduce-scatter (backward) once per step. Explained in docs/scaling.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
from dataclasses import dataclass

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

GB = 1e9
BUCKET = 5e8      # reduce_bucket_size (engine.py) = DeepSpeed's allgather_bucket_size default
PARAM_GROUPS = 4  # {CLIP, temporal} x {decay, no decay}: one parameter all-gather each
# NCCL ring/Simple cost model (src/graph/tuning.cc): base + per-step latency, microseconds
NCCL_BASE_US, NCCL_NVL_STEP_US, NCCL_NET_STEP_US = 8.4, 3.4, 9.6


@dataclass
class Model:
    name: str
    params: int           # all parameters
    trainable: int        # what ZeRO-2 reduces and gathers
    text: int             # CLIP text tower (trained when model.train_text)
    temporal: int         # temporal embedding + Kronecker-mask blocks
    embed: int            # E: text/video embedding width
    batch: int            # per-GPU micro-batch (data.batch_size)
    accum: int            # train.grad_accum
    k: int                # text.num_sampled_variants
    clip_flops: float     # vision fwd+bwd per clip
    clip_bwd_flops: float
    text_flops: float     # K x C prompts fwd+bwd per step (0 when the text tower is frozen)


def load(path: str, classes: int) -> Model:
    from bench_train import count_flops, prompt_tokens  # tools/bench_train.py

    from claver_dist.config import load_config
    from claver_dist.model import build_model

    cfg = load_config(path)
    model, _ = build_model(dataclasses.replace(cfg.model, pretrained=None), cfg.data.num_frames, cfg.data.image_size)
    named = dict(model.named_parameters())
    text = sum(p.numel() for n, p in named.items() if n.startswith("clip.") and not n.startswith("clip.visual."))
    total = sum(p.numel() for p in named.values())
    k = cfg.text.num_sampled_variants
    vision, text_flops, fwd = count_flops(model, cfg.data.num_frames, cfg.data.image_size, prompt_tokens(classes, k))
    return Model(cfg.name, total, total - (0 if cfg.model.train_text else text), text,
                 sum(named[n].numel() for n in model.temporal_parameter_names()),
                 model.clip.text_projection.shape[-1], cfg.data.batch_size, cfg.train.grad_accum, k,
                 vision, vision - fwd, text_flops if cfg.model.train_text else 0.0)


def ring_latency_s(steps: int, nodes: int, inter_steps: int) -> float:
    """NCCL's ring model: base + intra-node steps x NVLink latency + inter-node steps x network latency."""
    if steps == 0:
        return 0.0
    inter = inter_steps if nodes > 1 else 0
    return (NCCL_BASE_US + (steps - inter) * NCCL_NVL_STEP_US + inter * NCCL_NET_STEP_US) * 1e-6


def traffic(m: Model, n: int, classes: int) -> dict[str, float]:
    """Bytes each GPU sends (= receives) per optimiser step, ring collectives, bf16."""
    f = (n - 1) / n
    grad = 2 * m.trainable
    rows = math.ceil(m.k * classes / n) * n  # equal slices; padding rows travel too
    return {"grad_allreduce": m.accum * 2 * f * grad, "param_allgather": f * grad,
            "text": 2 * f * rows * m.embed * 2 if m.text_flops else 0.0}


def busbw(n: int, per_node: int, a: argparse.Namespace, nics: int) -> float:
    """Ring bus bandwidth (GB/s): NVLink inside a node; across nodes the ring's node-boundary
    hop is spread over the node's NICs (one NCCL channel per rail)."""
    nvl = a.nvlink_gbs * a.nvlink_eff
    return nvl if n <= per_node else min(nvl, nics * a.ib_gbs * a.ib_eff)


def comm_time(m: Model, n: int, a: argparse.Namespace, nics: int) -> tuple[float, float, float]:
    """(bandwidth seconds, latency seconds, all-reduce seconds of one micro-batch) per step."""
    t = traffic(m, n, a.classes)
    bw = busbw(n, a.per_node, a, nics) * GB
    nodes = math.ceil(n / a.per_node)
    ar_lat = ring_latency_s(2 * (n - 1), nodes, 2 * (nodes - 1)) * math.ceil(m.trainable / BUCKET)
    ag_lat = ring_latency_s(n - 1, nodes, nodes - 1)
    lat = m.accum * ar_lat + (PARAM_GROUPS + (2 if m.text_flops else 0)) * ag_lat
    return sum(t.values()) / bw, lat, t["grad_allreduce"] / m.accum / bw + ar_lat


def compute_time(m: Model, n: int, tflops: float) -> float:
    return (m.batch * m.accum * m.clip_flops + m.text_flops / n) / (tflops * 1e12)


def crossover_n(m: Model, a: argparse.Namespace, nics: int) -> str:
    """Smallest power-of-two N (<= 8192) whose per-micro-batch all-reduce outlasts the backward."""
    bwd = m.batch * m.clip_bwd_flops / (a.tflops * 1e12)
    for e in range(1, 14):
        if comm_time(m, 2 ** e, a, nics)[2] > bwd:
            return str(2 ** e)
    return "none <= 8192"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="claver-scaling-model", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", nargs="+", default=["configs/k400_b16_8f.yaml", "configs/k400_l14.yaml"])
    p.add_argument("--gpus", nargs="+", type=int, default=[8, 64, 512])
    p.add_argument("--classes", type=int, default=400, help="C (Kinetics-400)")
    p.add_argument("--tflops", type=float, default=300.0, help="achieved bf16 TFLOP/s per GPU (assumed)")
    p.add_argument("--per-node", type=int, default=8, help="GPUs per node")
    p.add_argument("--nvlink-gbs", type=float, default=450.0, help="NVLink GB/s per GPU per direction (900 both ways)")
    p.add_argument("--nvlink-eff", type=float, default=0.75, help="achieved fraction of it (assumed)")
    p.add_argument("--ib-gbs", type=float, default=50.0, help="GB/s per NIC per direction (400 Gb/s)")
    p.add_argument("--ib-eff", type=float, default=0.8, help="achieved fraction of it (assumed)")
    p.add_argument("--total-batch", type=int, default=256, help="clips per optimiser step, all GPUs")
    p.add_argument("--nics", nargs="+", type=int, default=[8, 1], help="NICs per node, one scenario each")
    a = p.parse_args(argv)
    models = [load(c, a.classes) for c in a.configs]
    print("| model | params (M) | trained (M) | text / temporal (M) | E | batch x accum | "
          "GFLOP/clip fwd+bwd | text TFLOP/step |\n|---|---|---|---|---|---|---|---|")
    for m in models:
        print(f"| {m.name} | {m.params / 1e6:.1f} | {m.trainable / 1e6:.1f} | {m.text / 1e6:.1f} / "
              f"{m.temporal / 1e6:.1f} | {m.embed} | {m.batch} x {m.accum} | {m.clip_flops / 1e9:,.1f} | "
              f"{m.text_flops / 1e12:.1f} |")
    print("\ntraffic per optimiser step, MB sent per GPU (= received); cluster total = N x per GPU")
    print("| model | N | grad all-reduce (accum x) | param all-gather | text AG+RS | per GPU | cluster GB |")
    print("|---|---|---|---|---|---|---|")
    for m in models:
        for n in a.gpus:
            t = traffic(m, n, a.classes)
            s = sum(t.values())
            print(f"| {m.name} | {n} | {t['grad_allreduce'] / 1e6:,.0f} | {t['param_allgather'] / 1e6:,.0f} | "
                  f"{t['text'] / 1e6:.1f} | {s / 1e6:,.0f} | {n * s / GB:,.0f} |")
    print(f"\ntime per optimiser step at {a.tflops:.0f} TFLOP/s; comm = bytes / bus bandwidth + NCCL ring latency; "
          "exposed = comm / (compute + comm) (overlap_comm off: nothing hides)")
    print("| model | N | NICs/node | busbw GB/s | compute ms | comm ms (bw + lat) | exposed |\n|---|---|---|---|---|---|---|")
    for m in models:
        for n in a.gpus:
            for nics in (a.nics if n > a.per_node else a.nics[:1]):
                bw_s, lat_s, _ = comm_time(m, n, a, nics)
                c, x = compute_time(m, n, a.tflops), bw_s + lat_s
                print(f"| {m.name} | {n} | {nics if n > a.per_node else '-'} | {busbw(n, a.per_node, a, nics):.0f} | "
                      f"{c * 1e3:,.0f} | {x * 1e3:,.1f} ({bw_s * 1e3:,.1f} + {lat_s * 1e3:.1f}) | {x / (c + x):.0%} |")
    print(f"\nat a fixed total batch of {a.total_batch} clips (the recipes'): micro-batch = min(config's, "
          "total / N), accumulation fills the rest; exposed as above")
    print("| model | N | batch x accum | NICs/node | compute ms | comm ms | exposed |\n|---|---|---|---|---|---|---|")
    for m in models:
        for n in (n for n in (8, 16, 32, 64, 128, 256) if a.total_batch % n == 0):
            b = min(m.batch, a.total_batch // n)
            f = dataclasses.replace(m, batch=b, accum=a.total_batch // (n * b))
            for nics in (a.nics if n > a.per_node else a.nics[:1]):
                c, x = compute_time(f, n, a.tflops), sum(comm_time(f, n, a, nics)[:2])
                print(f"| {m.name} | {n} | {f.batch} x {f.accum} | {nics if n > a.per_node else '-'} | "
                      f"{c * 1e3:,.1f} | {x * 1e3:,.1f} | {x / (c + x):.0%} |")
    print("\nwith overlap_comm on: one micro-batch's gradient all-reduce vs its backward; B* = per-GPU clips "
          "whose backward lasts as long as the all-reduce; N* = first N where the config's batch stops hiding it")
    print("| model | NICs/node | " + " | ".join(f"B* at N={n}" for n in a.gpus) + " | N* at batch |")
    print("|---|---|" + "---|" * (len(a.gpus) + 1))
    for m in models:
        for nics in a.nics:
            bs = [comm_time(m, n, a, nics)[2] * a.tflops * 1e12 / m.clip_bwd_flops for n in a.gpus]
            print(f"| {m.name} | {nics} | " + " | ".join(f"{b:.1f}" for b in bs) +
                  f" | {crossover_n(m, a, nics)} (batch {m.batch}) |")
    print("\nZeRO-2 memory per GPU, GB (activations not included): bf16 params 2P + bf16 bucket 1.0 + "
          "(bf16 grad partition 2 + fp32 master 4 + fp32 step grad 4 + Adam 8) P/N")
    print("| model | " + " | ".join(f"N={n}" for n in [1] + a.gpus) + " |")
    print("|---|" + "---|" * (len(a.gpus) + 1))
    for m in models:
        P, frozen = m.trainable, 2 * (m.params - m.trainable)
        mem = [(frozen + 2 * P + 2 * BUCKET + 18 * P / n) / GB for n in [1] + a.gpus]
        print(f"| {m.name} | " + " | ".join(f"{v:.2f}" for v in mem) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
