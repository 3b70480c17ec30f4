"""CLAVER model: Kronecker-mask attention, the module, and its weights.

The names below load on first use (PEP 562), so that importing ``claver_dist.model.config``
(which ``claver_dist.config``, the launchers and every ``--help`` do) does not import
open_clip and timm, about 6 s on a cold start.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "KroneckerAttention": "claver_dist.model.attention",
    "kronecker_attention": "claver_dist.model.attention",
    "kronecker_mask": "claver_dist.model.attention",
    "Claver": "claver_dist.model.claver",
    "ModelConfig": "claver_dist.model.config",
    "build_model": "claver_dist.model.weights",
    "build_model_for": "claver_dist.model.weights",
    "export_open_clip_state_dict": "claver_dist.model.weights",
    "load_pretrained": "claver_dist.model.weights",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'claver_dist.model' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return __all__
