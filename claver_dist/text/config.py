"""Text-branch configuration (owned by ``claver_dist.text``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from claver_dist.errors import ConfigError, require


@dataclass
class TextConfig:
    # label list (id,name) and interpretive prompt bank (JSON, see docs/prompts.md).
    labels: str = ""
    bank: str | None = None
    # prompt kinds to use from the bank (empty = every kind in the bank).
    kinds: list[str] = field(default_factory=list)
    # add the templated class-name prompts ("a video of a person {}." ...).
    use_templates: bool = True
    # K: variants drawn for every class (the same indices for all classes).
    num_sampled_variants: int = 5
    # per_step: K distinct variants per optimiser step, the same on every rank, so the
    # step's K*C prompts are encoded once (sharded over ranks). per_micro_batch: the
    # official release's draw, K with replacement for every micro-batch on each rank
    # (needs shard_text=false). docs/model.md, "Parity", says why per_step is the default.
    variant_sampling: Literal["per_step", "per_micro_batch"] = "per_step"
    context_length: int = 77
    # split the text tower's work over ranks (all-gather with autograd); false = every
    # rank encodes every prompt (the reference behaviour). Same loss and gradients.
    shard_text: bool = True
    # with gradient accumulation, encode the step's prompts once and reuse them for all
    # micro-batches (their gradients are accumulated and back-propagated once).
    encode_once_per_step: bool = True

    def validate(self) -> None:
        require(self.num_sampled_variants >= 1, "text.num_sampled_variants", ">= 1", self.num_sampled_variants)
        require(1 <= self.context_length <= 77, "text.context_length", "in 1..77 (CLIP's context)",
                self.context_length)
        if self.variant_sampling == "per_micro_batch" and self.shard_text:
            raise ConfigError("text.variant_sampling=per_micro_batch draws other variants on every rank, which "
                              "text.shard_text=true cannot split over ranks: set text.shard_text=false")
