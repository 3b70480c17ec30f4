"""Model configuration (owned by ``claver_dist.model``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from claver_dist.errors import require


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
    # shared (official): one 0..drop_path ramp over the CLIP depth, used by the CLIP blocks
    # and, from its start, by the temporal blocks; temporal: only the temporal blocks, rising
    # to drop_path.
    drop_path_layout: Literal["shared", "temporal"] = "shared"
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
    # temporal blocks' init: torch (PyTorch's module defaults, what the official release
    # trains from) or trunc_normal (weights trunc-normal 0.02, zero biases).
    temporal_init: Literal["torch", "trunc_normal"] = "torch"
    # normalise the mean of the unit frame embeddings again (logits become cosines); the
    # official release does not (false).
    renormalize_video: bool = False
    # cap exp(logit_scale) here (CLIP's training used 100); null = no cap (the official release).
    logit_scale_max: float | None = None
    # regional torch.compile: every CLIP block (both towers) and temporal block compiled on its
    # own, FlexAttention inside; on CUDA also fused AdamW and TF32 matmuls. Compiles in the first
    # training step (its time is logged). Needs drop_path=0. See docs/model.md, "Compilation".
    compile: bool = False

    def validate(self) -> None:
        require(self.temporal_layers is None or self.temporal_layers >= 0, "model.temporal_layers", ">= 0 or null",
                self.temporal_layers)
        require(self.checkpoint_every >= 1, "model.checkpoint_every", ">= 1", self.checkpoint_every)
        require(0.0 <= self.drop_path < 1.0, "model.drop_path", "in [0, 1)", self.drop_path)
        require(self.logit_scale_max is None or self.logit_scale_max > 1.0, "model.logit_scale_max", "> 1 or null",
                self.logit_scale_max)
        require(isinstance(self.compile, bool), "model.compile", "true or false", self.compile)
        require(not (self.compile and self.drop_path > 0), "model.drop_path", "0 with model.compile=true "
                "(each block's rate would be its own compiled graph)", self.drop_path)
        require(self.temporal_embedding_std > 0, "model.temporal_embedding_std", "> 0", self.temporal_embedding_std)
