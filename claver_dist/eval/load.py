"""Load a trained CLAVER for evaluation or prediction, from any of:

* an export folder (``model.safetensors`` + ``config.yaml``, written at the end of training);
* a run folder (its ``export/``, else its latest complete checkpoint);
* a DeepSpeed checkpoint folder (ZeRO shards consolidated to fp32 on the fly).

    model, cfg = load_trained("runs/demo_kmt")

Finding and reading the weights is ``claver_dist.checkpoint``'s; this module builds the
model the run's config describes and loads them into it.
"""

from __future__ import annotations

from pathlib import Path

import torch

from claver_dist.checkpoint import load_weights, locate_weights
from claver_dist.config import RunConfig, load_config
from claver_dist.model.weights import build_model_for, load_pretrained


def load_trained(path: str | Path, overrides: list[str] | None = None,
                 device: str | torch.device = "cpu") -> tuple[torch.nn.Module, RunConfig]:
    """The model in eval mode (fp32) and the run's config (with ``overrides`` applied)."""
    where = locate_weights(path)
    if not where.config.is_file():
        raise FileNotFoundError(f"{where.config}: the run's config.yaml is missing next to {where.path}")
    cfg = load_config(where.config, list(overrides or []))
    sd = load_weights(where)
    model, _ = build_model_for(cfg, pretrained=False)  # trained weights replace every fresh one
    fresh = load_pretrained(model, sd)
    if fresh:
        raise KeyError(f"{where.path}: checkpoint lacks trained parameters {fresh[:3]}... (not a CLAVER checkpoint?)")
    return model.to(device).eval(), cfg
