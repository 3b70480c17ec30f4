"""The preflight's record and verdict (``claver_dist.preflight`` measures, this module judges):
the per-rank results, the model's FLOP count and the time estimate, the straggler rule, the
checks, and the tables rank 0 prints."""

from __future__ import annotations

import dataclasses
import statistics
from dataclasses import dataclass, field
from typing import Any

import torch

RESULT_FILE = "preflight.json"

# throughput columns: (key, header, unit) -- the straggler rule applies to these
THROUGHPUT = (("matmul_gflops", "matmul GFLOP/s"), ("allreduce_busbw_gbs", "all-reduce GB/s"),
              ("read_mbs", "read MB/s"), ("clips_per_s", "clips/s"))
# checkpoint bytes per trainable parameter under ZeRO-2 bf16: bf16 weights (2) + fp32
# master weights (4) + Adam's two moments (8), rounded up for DeepSpeed's own state
CKPT_BYTES_PER_PARAM = 16
# export: model.safetensors (fp32) + open_clip.pt (fp32)
EXPORT_BYTES_PER_PARAM = 8


@dataclass
class PreflightOptions:
    mfu: float = 0.4                  # assumed model FLOP/s as a fraction of the measured matmul rate
    straggler_fraction: float = 0.2   # a rank this far below a column's median is a straggler
    max_clock_skew_s: float = 30.0    # beyond this (minus the error bound) the check fails
    matmul_s: float = 1.2             # target duration of each timed measurement
    allreduce_s: float = 1.0
    read_s: float = 1.0
    loader_s: float = 2.0
    loader_batches: int = 4           # timed batches after the first (at least 2 x data workers)
    loader_max_s: float = 60.0
    cpu_allreduce_elements: int = 1 << 24  # gloo: 64 MiB of fp32 instead of DeepSpeed's 5e8 elements
    skew_rounds: int = 5
    # every rate is the best of this many windows: a burst of other work on a shared machine
    # is discounted, a rank that is slow all the time stays slow in every window
    windows: int = 3
    slow_rank: int | None = None      # the test hook (CLAVER_PREFLIGHT_SLOW_RANK)


@dataclass
class RankResult:
    rank: int
    local_rank: int
    node: int                          # the node's index in the rendezvous (GROUP_RANK)
    host: str
    device: str = ""
    matmul_gflops: float | None = None
    matmul_dtype: str = ""
    allreduce_busbw_gbs: float | None = None
    read_mbs: float | None = None
    read_bytes: int = 0
    read_passes: int = 0
    clips_per_s: float | None = None
    clips_timed: int = 0
    free_gb: float | None = None
    shared: bool | None = None
    clock_skew_s: float | None = None        # this rank's clock minus rank 0's
    clock_skew_bound_s: float | None = None  # |true skew - clock_skew_s| <= this
    steps_per_epoch: int | None = None
    errors: dict[str, str] = field(default_factory=dict)


@dataclass
class Check:
    name: str
    ok: bool
    detail: str


# --------------------------------------------------------------------------- model cost


def model_cost(cfg) -> dict[str, float]:
    """Forward+backward FLOPs of one clip's vision work and one step's text work (K x C
    prompts), counted on the meta device (shapes only, as tools/bench_train.py does), and
    the trainable parameter count."""
    from torch.utils.flop_counter import FlopCounterMode

    from claver_dist.model.weights import build_model_for
    from claver_dist.text.prompts import load_bank, tokenize

    counted = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, attention="dense",
                                                                grad_checkpointing="none"))
    model, _ = build_model_for(counted, pretrained=False)
    if not cfg.model.train_text:
        for name, p in model.named_parameters():
            if name.startswith("clip.") and not name.startswith("clip.visual."):
                p.requires_grad_(False)
    params = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    model = model.to("meta")
    video = torch.zeros(1, cfg.data.num_frames, 3, cfg.data.image_size, cfg.data.image_size, device="meta")
    with FlopCounterMode(display=False) as c:
        model.encode_video(video).sum().backward()
    vision = c.get_total_flops()
    text = 0
    if cfg.model.train_text:
        if cfg.task == "pretrain":
            # one caption per clip of the step; their lengths vary: counted at 32 tokens
            # (a WebVid-style caption of ~15 words is 20-30)
            tokens = tokenize(["a" + " a" * 29] * (cfg.data.batch_size * cfg.train.grad_accum), 32)
        else:
            bank = load_bank(cfg.text.labels, cfg.text.bank, cfg.text.kinds, cfg.text.use_templates)
            k = min(cfg.text.num_sampled_variants, bank.num_variants)
            tokens = tokenize(bank.variant_texts(list(range(k))), cfg.text.context_length)
        n = int(tokens.argmax(-1).max()) + 1  # what encode_text trims to (meta tensors have no values)
        with FlopCounterMode(display=False) as c:
            model.encode_text(tokens[:, :n].to("meta")).sum().backward()
        text = c.get_total_flops()
    return {"vision_flops_per_clip": float(vision), "text_flops_per_step": float(text), "params": params,
            "trainable_params": trainable}


def estimate(cfg, cost: dict[str, float], ranks: list[RankResult], world: int, opts: PreflightOptions,
             device_type: str) -> dict[str, Any]:
    """Time per step, epoch and run: the slower of compute (FLOPs at the slowest rank's matmul
    rate x the assumed MFU, plus the gradient all-reduce, which DeepSpeed does not overlap
    here: ``overlap_comm`` false) and data (clips per rank at the slowest rank's clips/s)."""
    accum = cfg.train.grad_accum
    clips_per_rank = cfg.data.batch_size * accum
    text = cost["text_flops_per_step"]
    if cfg.task == "pretrain":  # each rank encodes its own clips' captions, counted per step already
        text_per_rank = text
    else:
        text_per_rank = (text / world if cfg.text.shard_text else text) * (1 if cfg.text.encode_once_per_step else accum)
    flops_per_rank = clips_per_rank * cost["vision_flops_per_clip"] + text_per_rank
    matmul = [r.matmul_gflops for r in ranks if r.matmul_gflops]
    clips = [r.clips_per_s for r in ranks if r.clips_per_s]
    bw = [r.allreduce_busbw_gbs for r in ranks if r.allreduce_busbw_gbs]
    steps = [r.steps_per_epoch for r in ranks if r.steps_per_epoch is not None]
    out: dict[str, Any] = {"mfu_assumed": opts.mfu, "flops_per_rank_per_step": flops_per_rank,
                           "clips_per_rank_per_step": clips_per_rank, "total_batch": clips_per_rank * world}
    if not matmul or not clips or not steps:
        out["error"] = "missing measurements"
        return out
    compute = flops_per_rank / (min(matmul) * 1e9 * opts.mfu)
    # ZeRO-2 reduces every micro-batch's gradients (bf16 on GPUs); an all-reduce moves at
    # least as much as the reduce-scatter it does, so this is an upper bound
    grad_bytes = cost["trainable_params"] * (2 if cfg.train.precision == "bf16" and device_type == "cuda" else 4)
    comm = accum * grad_bytes / (min(bw) * 1e9 * world / (2 * (world - 1))) if bw and world > 1 else 0.0
    data = clips_per_rank / min(clips)
    step = max(compute + comm, data)
    steps_per_epoch = min(steps)
    total_steps = cfg.train.max_steps or cfg.train.epochs * steps_per_epoch
    out.update(compute_s_per_step=compute, allreduce_s_per_step=comm, data_s_per_step=data, step_s=step,
               bound="data" if data > compute + comm else "compute", steps_per_epoch=steps_per_epoch,
               total_steps=total_steps, epoch_s=step * steps_per_epoch, run_s=step * total_steps)
    return out


# --------------------------------------------------------------------------- verdict and table


def find_stragglers(ranks: list[RankResult], fraction: float) -> list[dict[str, Any]]:
    out = []
    for key, header in THROUGHPUT:
        values = [getattr(r, key) for r in ranks if getattr(r, key) is not None]
        if len(values) < 2:
            continue
        median = statistics.median(values)
        for r in ranks:
            v = getattr(r, key)
            if v is not None and v < (1 - fraction) * median:
                out.append({"rank": r.rank, "node": r.node, "host": r.host, "column": key, "value": v,
                            "median": median, "below_median": 1 - v / median})
    return out


def run_checks(ranks: list[RankResult], required_bytes: float | None, opts: PreflightOptions) -> list[Check]:
    checks = []
    blind = [f"rank {r.rank} on {r.host}" for r in ranks if not r.shared]
    checks.append(Check("shared_folder", not blind, "every rank sees the file rank 0 wrote" if not blind else
                        f"{', '.join(blind)} cannot see the file rank 0 wrote into the run folder: put run_dir "
                        "on a file system every node mounts"))
    if required_bytes is None:
        checks.append(Check("free_space", False, "the checkpoint size is unknown (the model could not be built)"))
    else:
        need = required_bytes / 2**30
        short = [f"rank {r.rank} on {r.host}: {r.free_gb:.2f} GB" for r in ranks
                 if r.free_gb is None or r.free_gb < need]
        checks.append(Check("free_space", not short, f"need {need:.2f} GB (checkpoints + export), "
                            + ("every rank has it" if not short else "short: " + ", ".join(short))))
    skewed = [f"rank {r.rank} {r.clock_skew_s:+.3f} s" for r in ranks if r.clock_skew_s is not None
              and abs(r.clock_skew_s) - (r.clock_skew_bound_s or 0) > opts.max_clock_skew_s]
    checks.append(Check("clock_skew", not skewed, f"limit {opts.max_clock_skew_s:g} s; "
                        + ("within it" if not skewed else "beyond it: " + ", ".join(skewed))))
    failed = [f"rank {r.rank} {name}: {err}" for r in ranks for name, err in r.errors.items()]
    checks.append(Check("measurements", not failed, "every measurement produced a number" if not failed
                        else "; ".join(failed)))
    return checks


def _fmt(v: float | None, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def format_tables(ranks: list[RankResult], stragglers: list[dict[str, Any]], gpu: bool) -> str:
    """One table per node: rows = ranks; a straggler's value carries a ``*``."""
    flagged = {(s["rank"], s["column"]) for s in stragglers}
    scale = 1e-3 if gpu else 1.0  # TFLOP/s on GPUs, GFLOP/s on CPUs
    headers = ["rank", "local", "device", "TFLOP/s" if gpu else "GFLOP/s", "all-reduce GB/s", "read MB/s",
               "clips/s", "free GB", "shared", "clock skew ms"]
    lines = []
    for node in sorted({r.node for r in ranks}):
        rows = []
        for r in sorted((r for r in ranks if r.node == node), key=lambda r: r.rank):
            mark = lambda key: "*" if (r.rank, key) in flagged else " "  # noqa: E731
            skew = "-" if r.clock_skew_s is None else f"{1e3 * r.clock_skew_s:+.2f} ±{1e3 * r.clock_skew_bound_s:.2f}"
            rows.append([str(r.rank), str(r.local_rank), r.device[:40],
                         _fmt(None if r.matmul_gflops is None else r.matmul_gflops * scale, ".1f") + mark("matmul_gflops"),
                         _fmt(r.allreduce_busbw_gbs, ".3f") + mark("allreduce_busbw_gbs"),
                         _fmt(r.read_mbs, ".1f") + mark("read_mbs"), _fmt(r.clips_per_s, ".2f") + mark("clips_per_s"),
                         _fmt(r.free_gb, ".1f"), {True: "yes", False: "NO", None: "-"}[r.shared], skew])
        widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(headers)]
        host = next(r.host for r in ranks if r.node == node)
        lines.append(f"node {node} ({host}):")
        lines.append("  " + "  ".join(h.rjust(w) if i != 2 else h.ljust(w) for i, (h, w) in enumerate(zip(headers, widths))))
        for row in rows:
            lines.append("  " + "  ".join(c.rjust(w) if i != 2 else c.ljust(w)
                                          for i, (c, w) in enumerate(zip(row, widths))))
    return "\n".join(lines)


def format_report(report: dict[str, Any], ranks: list[RankResult], gpu: bool) -> str:
    nodes = len({r.node for r in ranks})
    lines = [f"claver-preflight: {report['world_size']} ranks on {nodes} node{'s' * (nodes != 1)} "
             f"({report['backend']}), config {report['config']}",
             format_tables(ranks, report["stragglers"], gpu)]
    lines.append(f"  matmul: {report['matmul']}; all-reduce: {report['allreduce']}")
    lines.append(f"  read: {report['read']}; {report['windows']}")
    for s in report["stragglers"]:
        lines.append(f"  * straggler: rank {s['rank']} on {s['host']}: {s['column']} {s['value']:.4g} is "
                     f"{100 * s['below_median']:.0f}% below the median {s['median']:.4g}")
    if not report["stragglers"]:
        lines.append(f"  no stragglers (none more than {100 * report['options']['straggler_fraction']:.0f}% "
                     "below a column's median)")
    e, cost = report.get("estimate", {}), report.get("model", {})
    if e and "step_s" in e:
        unit = "TFLOP/s" if gpu else "GFLOP/s"
        slow = min(r.matmul_gflops for r in ranks if r.matmul_gflops) * (1e-3 if gpu else 1)
        lines += [
            f"estimate: {cost['vision_flops_per_clip'] / 1e9:.3g} GFLOP per clip (vision fwd+bwd), "
            f"{cost['text_flops_per_step'] / 1e9:.3g} GFLOP per step (text), {e['clips_per_rank_per_step']} clips "
            f"per rank per step (total batch {e['total_batch']})",
            f"  compute {e['compute_s_per_step']:.3f} s/step at the slowest rank's {slow:.1f} {unit} x assumed "
            f"MFU {e['mfu_assumed']:.2f}, + gradient all-reduce {e['allreduce_s_per_step']:.3f} s",
            f"  data    {e['data_s_per_step']:.3f} s/step at the slowest rank's clips/s",
            f"  step {e['step_s']:.3f} s ({e['bound']}-bound); epoch ({e['steps_per_epoch']} steps) "
            f"{_duration(e['epoch_s'])}; run ({e['total_steps']} steps) {_duration(e['run_s'])}; "
            "validation and start-up not included"]
    elif e:
        lines.append(f"estimate: none ({e.get('error')})")
    for c in report["checks"]:
        lines.append(f"  check {c['name']}: {'ok' if c['ok'] else 'FAILED'}: {c['detail']}")
    return "\n".join(lines)


def _duration(s: float) -> str:
    h, rest = divmod(int(round(s)), 3600)
    return f"{s:.1f} s" if s < 60 else f"{h}:{rest // 60:02d}:{rest % 60:02d}"
