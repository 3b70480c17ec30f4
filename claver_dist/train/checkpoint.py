"""Checkpoints: save, find the latest *complete* one, keep the last k, change world size, export.

Layout under ``<run_dir>/checkpoints/``::

    step_00001000/          DeepSpeed files (model states + each rank's ZeRO shard)
        meta.json           step, world size, time
        COMPLETE            written last: a checkpoint without it is ignored
    latest                  name of the newest complete checkpoint (replaced atomically)
    universal/step_...      DeepSpeed universal form, made on demand to resume on another world size

A crash or kill in the middle of a save leaves a folder without ``COMPLETE``; ``latest``
still names the previous checkpoint, and the next save or start cleans nothing it needs.

Export (``export_weights``): consolidated fp32 weights as ``model.safetensors`` + the
resolved ``config.yaml`` (what evaluate/predict load) and ``open_clip.pt`` (the CLIP part,
loadable by ``open_clip.create_model(name, pretrained=path)``).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

COMPLETE = "COMPLETE"


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def is_complete(path: Path) -> bool:
    return (path / COMPLETE).is_file()


def read_meta(path: Path) -> dict[str, Any]:
    return json.loads((path / "meta.json").read_text())


def find_latest(root: str | Path) -> Path | None:
    """The newest complete checkpoint under ``root`` (``latest`` first, else a scan)."""
    root = Path(root)
    pointer = root / "latest"
    if pointer.is_file():
        cand = root / pointer.read_text().strip()
        if is_complete(cand):
            return cand
    done = sorted(p for p in root.glob("step_*") if p.is_dir() and is_complete(p))
    return done[-1] if done else None


def resolve_resume(path: str | Path) -> Path:
    """``resume=PATH``: a checkpoint folder, or a run folder / checkpoints folder holding some."""
    p = Path(path)
    for cand in (p, p / "checkpoints"):
        if is_complete(cand):
            return cand
        latest = find_latest(cand) if cand.is_dir() else None
        if latest is not None:
            return latest
    raise FileNotFoundError(f"checkpoint.resume={path}: no complete checkpoint there "
                            f"(a folder with {COMPLETE}, or a run folder holding checkpoints/)")


class CheckpointManager:
    """Saves DeepSpeed checkpoints with a completion marker and keeps the last ``keep_last``."""

    def __init__(self, root: str | Path, keep_last: int, rank: int, world_size: int):
        self.root = Path(root)
        self.keep_last = keep_last
        self.rank = rank
        self.world_size = world_size

    def save(self, engine, step: int, client_state: dict[str, Any]) -> Path:
        tag = tag_for(step)
        path = self.root / tag
        if self.rank == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            if path.exists():  # an earlier incomplete try at this step
                shutil.rmtree(path, ignore_errors=True)
        _barrier()
        engine.save_checkpoint(str(self.root), tag=tag, client_state={"claver": client_state}, save_latest=False)
        _barrier()  # every rank's shard is on disk before the marker
        if self.rank == 0:
            _atomic_write(path / "meta.json", json.dumps(
                {"step": step, "world_size": self.world_size, "time": time.time()}))
            _atomic_write(path / COMPLETE, "")
            _atomic_write(self.root / "latest", tag)
            self._prune()
        _barrier()
        return path

    def _prune(self) -> None:
        done = sorted(p for p in self.root.glob("step_*") if p.is_dir() and is_complete(p))
        for old in done[: max(0, len(done) - self.keep_last)]:
            shutil.rmtree(old, ignore_errors=True)
            shutil.rmtree(self.root / "universal" / old.name, ignore_errors=True)
        latest = done[-1].name if done else None
        for p in self.root.glob("step_*"):  # leftovers of interrupted saves
            if p.is_dir() and not is_complete(p) and p.name != latest:
                shutil.rmtree(p, ignore_errors=True)


def needs_universal(ckpt: Path, world_size: int) -> bool:
    return read_meta(ckpt)["world_size"] != world_size


def make_universal(ckpt: Path, rank: int) -> tuple[Path, str]:
    """Convert ``ckpt`` with DeepSpeed's ``ds_to_universal`` (rank 0, once); returns (load_dir, tag)."""
    out_dir = ckpt.parent / "universal"
    out = out_dir / ckpt.name
    if rank == 0 and not is_complete(out):
        shutil.rmtree(out, ignore_errors=True)
        out_dir.mkdir(parents=True, exist_ok=True)
        log.info("converting %s to a universal checkpoint (world size changed)", ckpt)
        cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(ckpt),
               "--output_folder", str(out), "--inject_missing_state", "--num_extract_workers", "1",
               "--num_merge_workers", "1"]
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0:
            raise RuntimeError(f"ds_to_universal failed on {ckpt}:\n{res.stderr[-3000:]}")
        shutil.copy(ckpt / "meta.json", out / "meta.json")
        _atomic_write(out / COMPLETE, "")
    _barrier()
    return out_dir, ckpt.name


def load(engine, load_dir: Path, tag: str, universal: bool = False) -> dict[str, Any]:
    """Load engine state (weights, optimizer, scheduler); return our client state."""
    path, client = engine.load_checkpoint(str(load_dir), tag=tag, load_optimizer_states=True,
                                          load_lr_scheduler_states=True)
    if path is None:
        raise RuntimeError(f"DeepSpeed could not load checkpoint {load_dir / tag}")
    return (client or {}).get("claver", {})


def export_weights(ckpt: Path, out_dir: str | Path, config_yaml: str, model_builder=None) -> Path:
    """Consolidate ZeRO shards into fp32 ``model.safetensors`` + ``config.yaml`` (+ ``open_clip.pt``)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sd = get_fp32_state_dict_from_zero_checkpoint(str(ckpt.parent), tag=ckpt.name)
    sd = {k: v.contiguous() for k, v in sd.items()}
    save_file(sd, str(out / "model.safetensors"), metadata={"source": str(ckpt)})
    (out / "config.yaml").write_text(config_yaml)
    clip = {k[len("clip."):]: v for k, v in sd.items() if k.startswith("clip.")}
    if "logit_scale" in sd:
        clip["logit_scale"] = sd["logit_scale"].reshape(())
    torch.save(clip, out / "open_clip.pt")
    return out


def _barrier() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized() \
            and torch.distributed.get_world_size() > 1:
        torch.distributed.barrier()
