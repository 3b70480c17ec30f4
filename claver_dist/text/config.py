"""Text-branch configuration (owned by ``claver_dist.text``)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class TextConfig:
    # label list (id,name) and interpretive prompt bank (JSON, see docs/prompts.md).
    labels: str = ""
    bank: str | None = None
    # prompt kinds to use from the bank (empty = every kind in the bank).
    kinds: list[str] = field(default_factory=list)
    # add the templated class-name prompts ("a video of a person {}." ...).
    use_templates: bool = True
    # K: variants drawn per training step (the same indices for every class).
    num_sampled_variants: int = 5
    context_length: int = 77
    # split the text tower's work over ranks (all-gather with autograd); false = every
    # rank encodes every prompt (the reference behaviour). Same loss and gradients.
    shard_text: bool = True
    # with gradient accumulation, encode the step's prompts once and reuse them for all
    # micro-batches (their gradients are accumulated and back-propagated once).
    encode_once_per_step: bool = True
