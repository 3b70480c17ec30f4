"""Observability: the rank-0 logger, per-step metrics (JSONL + wandb), FLOPs and MFU.

Every logged step carries loss, LR, clips/s (this process and all), data-wait seconds,
peak memory, and MFU = achieved model FLOP/s / peak FLOP/s of the device. Model FLOPs per
clip (forward + backward, text tower included) are counted once with PyTorch's
``FlopCounterMode``; the peak comes from ``log.peak_tflops`` or a table of known GPUs.
"""

from __future__ import annotations

import json
import logging
import resource
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

LOGGER_NAME = "claver_dist"

# dense bf16 tensor-core peaks (FLOP/s), by substring of torch.cuda.get_device_name()
GPU_PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12, "V100": 125e12}


def setup_logging(rank: int, level: int = logging.INFO) -> logging.Logger:
    """One logger for the library; only rank 0 speaks below WARNING."""
    logger = logging.getLogger(LOGGER_NAME)
    logger.handlers.clear()
    h = logging.StreamHandler(sys.stdout)
    h.setFormatter(logging.Formatter(f"%(asctime)s [rank{rank}] %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
    logger.addHandler(h)
    logger.setLevel(level if rank == 0 else logging.WARNING)
    logger.propagate = False
    return logger


def peak_flops(device: torch.device, override_tflops: float | None = None) -> float | None:
    if override_tflops:
        return override_tflops * 1e12
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, val in GPU_PEAK_BF16.items():
            if key in name:
                return val
    return None


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def count_flops(fn, *args, **kwargs) -> int:
    """FLOPs of ``fn(*args)`` forward + backward (of the sum of its output)."""
    with FlopCounterMode(display=False) as counter:
        out = fn(*args, **kwargs)
        out.float().sum().backward()
    return counter.get_total_flops()


class MetricsWriter:
    """Appends metric rows to ``<run_dir>/metrics.jsonl`` and wandb (rank 0 only)."""

    def __init__(self, run_dir: Path, is_main: bool, config: dict[str, Any] | None = None,
                 use_wandb: bool = False, wandb_project: str = "claver-dist", wandb_mode: str = "offline",
                 run_name: str = "claver"):
        self.is_main = is_main
        self.path = run_dir / "metrics.jsonl"
        self.wandb = None
        if is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
            if use_wandb and wandb_mode != "disabled":
                import wandb

                self.wandb = wandb.init(project=wandb_project, name=run_name, dir=str(run_dir), config=config,
                                        mode=wandb_mode, resume="allow", id=_wandb_id(run_dir))

    def write(self, row: dict[str, Any]) -> None:
        if not self.is_main:
            return
        row = {"time": time.time(), **row}
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in row.items() if isinstance(v, (int, float))}, step=row.get("step"))

    def close(self) -> None:
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None


def _wandb_id(run_dir: Path) -> str:
    """A stable wandb run id per run folder, so a resumed run continues the same curve."""
    f = run_dir / "wandb_id"
    if not f.exists():
        import uuid

        f.write_text(uuid.uuid4().hex[:12])
    return f.read_text().strip()


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
