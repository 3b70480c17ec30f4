"""Load a trained CLAVER for evaluation or prediction, from any of:

* an export folder (``model.safetensors`` + ``config.yaml``, written at the end of training);
* a run folder (its ``export/``, else its latest complete checkpoint);
* a DeepSpeed checkpoint folder (ZeRO shards consolidated to fp32 on the fly).

    model, cfg = load_trained("runs/demo_kmt")
"""

from __future__ import annotations

from pathlib import Path

import torch

from claver_dist.config import RunConfig, load_config
from claver_dist.model import build_model, load_pretrained
from claver_dist.train import checkpoint as ckpt_lib


def _find(path: Path) -> tuple[str, Path, Path]:
    """(kind, weights location, config.yaml) for a user-given path."""
    if (path / "model.safetensors").is_file():
        return "export", path, path / "config.yaml"
    if ckpt_lib.is_complete(path):
        return "deepspeed", path, path.parent.parent / "config.yaml"
    if (path / "export" / "model.safetensors").is_file():
        return "export", path / "export", path / "export" / "config.yaml"
    latest = ckpt_lib.find_latest(path / "checkpoints") if (path / "checkpoints").is_dir() else None
    if latest is not None:
        return "deepspeed", latest, path / "config.yaml"
    raise FileNotFoundError(f"{path}: no model.safetensors, complete checkpoint, or run folder with either")


def load_trained(path: str | Path, overrides: list[str] | None = None,
                 device: str | torch.device = "cpu") -> tuple[torch.nn.Module, RunConfig]:
    """The model in eval mode (fp32) and the run's config (with ``overrides`` applied)."""
    kind, where, config = _find(Path(path))
    if not config.is_file():
        raise FileNotFoundError(f"{config}: the run's config.yaml is missing next to {where}")
    cfg = load_config(config, list(overrides or []))
    if kind == "export":
        from safetensors.torch import load_file

        sd = load_file(str(where / "model.safetensors"))
    else:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        sd = get_fp32_state_dict_from_zero_checkpoint(str(where.parent), tag=where.name)
    model_cfg = cfg.model
    model_cfg.pretrained = None
    model, _ = build_model(model_cfg, cfg.data.num_frames, cfg.data.image_size)
    fresh = load_pretrained(model, sd)
    if fresh:
        raise KeyError(f"{where}: checkpoint lacks trained parameters {fresh[:3]}... (not a CLAVER checkpoint?)")
    return model.to(device).eval(), cfg
