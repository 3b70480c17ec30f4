"""Model configuration (owned by ``claver_dist.model``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass
class ModelConfig:
    # open_clip architecture name. Use the ``-quickgelu`` names with OpenAI weights, or
    # activations silently differ. ``claver-debug`` is a tiny CPU flavour shipped here.
    clip_model: str = "ViT-B-16-quickgelu"
    # open_clip pretrained tag (downloaded where there is internet), a local file, or
    # null for random init (tests, debug runs).
    pretrained: str | None = None
    # Kronecker-mask temporal attention: kmt (see other frames), kmct (causal: earlier
    # frames only), none (no temporal blocks: mean of CLIP frame features).
    temporal: Literal["kmt", "kmct", "none"] = "kmt"
    # number of temporal blocks; null = CLIP layers // 3 (4 for B, 8 for L).
    temporal_layers: int | None = None
    # dense = SDPA with a boolean mask (works everywhere, with grads on CPU);
    # flex = FlexAttention block mask (fused, KMCT skips blocks; backward needs a GPU);
    # auto = flex on CUDA, dense elsewhere.
    attention: Literal["auto", "dense", "flex"] = "auto"
    drop_path: float = 0.0
    # activation checkpointing: none | temporal | spatial | all; every k-th block.
    grad_checkpointing: Literal["none", "temporal", "spatial", "all"] = "none"
    checkpoint_every: int = 1
    # train the CLIP text tower (true, the reference) or freeze it and cache features.
    train_text: bool = True
    # initial logit scale (CLIP's log(1/0.07)); only used for random init.
    init_logit_scale: float = 4.6052
    # init std of the temporal embedding: 0.02 in the method (on pretrained CLIP). Randomly
    # initialised towers (the demo) need a larger one: see docs/model.md.
    temporal_embedding_std: float = 0.02

    def validate(self) -> None:
        from claver_dist.config import ConfigError

        if self.temporal_layers is not None and self.temporal_layers < 0:
            raise ConfigError("model.temporal_layers must be >= 0 or null")
        if self.checkpoint_every < 1:
            raise ConfigError("model.checkpoint_every must be >= 1")
        if not 0.0 <= self.drop_path < 1.0:
            raise ConfigError("model.drop_path must be in [0, 1)")
