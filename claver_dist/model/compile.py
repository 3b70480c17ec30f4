"""Regional ``torch.compile`` (``model.compile=true``): every transformer block on its own.

torchtitan's per-block style. Each CLIP block of both towers and each temporal block is
compiled in place with ``nn.Module.compile()``:

* identical blocks share their compiled code (Dynamo guards on the block's code, shapes
  and dtypes, not on which module it is), so a run compiles a few graphs (image block,
  text block, temporal block; forward and backward), not one per layer, and compile time
  does not grow with depth;
* the module tree is untouched: state dict keys are the same compiled or not (no
  ``_orig_mod.`` prefix), so checkpoints load either way;
* FlexAttention runs inside the temporal block's graph, fused with its neighbours;
* the glue between blocks (patch embedding, rearranges, pooling, logits) stays eager: it
  is cheap, and where its shapes change (the text length, the last batch) no whole-model
  graph is recompiled;
* the text tower's sequence length (the longest prompt of the step) is marked dynamic, so
  it is compiled once rather than again whenever the longest sampled prompt changes.

    model, _ = build_model(ModelConfig(clip_model="claver-debug", compile=True), num_frames=8)

Compilation is lazy: it happens in the first training step (and in the first evaluation,
for the inference graphs). ``CompileClock``, which ``build_engine`` attaches to the
optimiser, logs one line with its cost after the second training step: the first step's
wall time minus the second's.
"""

from __future__ import annotations

import logging
import time

import torch
from torch import nn

log = logging.getLogger(__name__)


def model_blocks(model: nn.Module) -> list[nn.Module]:
    """Every transformer block of a ``Claver``: the CLIP image tower's, the text tower's, the temporal ones."""
    blocks = list(model.clip.visual.transformer.resblocks)
    text = getattr(model.clip, "transformer", None)
    if text is not None:
        blocks += list(text.resblocks)
    return blocks + list(model.temporal_blocks)


def compile_blocks(model: nn.Module) -> int:
    """Compile every block of ``model`` (a ``Claver``) in place; returns how many. Idempotent.

    Blocks with a drop path are refused: each block's rate would be a constant of its own
    graph (one compile per block, and past Dynamo's recompile limit, eager blocks)."""
    if model.compiled:
        return len(model_blocks(model))
    if len(model.spatial_drop_path) or any(not isinstance(b.drop_path, nn.Identity) for b in model.temporal_blocks):
        raise ValueError("compiled blocks need drop_path=0 (every block's rate would be its own graph)")
    blocks = model_blocks(model)
    for block in blocks:
        block.compile()
    model.compiled = True
    log.info("model.compile: %d blocks compiled one by one (torch %s); compilation runs in the first "
             "training step, its time is logged after the second", len(blocks), torch.__version__)
    return len(blocks)


class CompileClock:
    """Times the first two training steps of a compiled model and logs the difference, the
    time spent compiling: the first step compiles (forward and backward of every kind of
    block), the second runs what was compiled.

    A step starts at the first call of the image or text tower (``conv1``,
    ``token_embedding``) in training mode with gradients, so text encoded before the forward
    (``text.encode_once_per_step``) counts, and ends when the optimiser's step has run (its
    step post-hook), so every micro-batch of an accumulated step counts. Install it once
    the optimiser exists (``build_engine`` does), which also leaves out the FLOP counting
    done before (it compiles nothing: Dynamo does not trace under a dispatch mode). Times
    are host wall time, and a step's first-call overheads besides compiling (allocator
    growth, kernel autotuning) count as compiling."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer):
        self.start: float | None = None
        self.steps: list[float] = []
        self.handles = [optimizer.register_step_post_hook(self._on_step)]
        for entry in (model.clip.visual.conv1, getattr(model.clip, "token_embedding", None)):
            if entry is not None:
                self.handles.append(entry.register_forward_pre_hook(self._on_tower))

    def _on_tower(self, module: nn.Module, args) -> None:
        if self.start is None and module.training and torch.is_grad_enabled():
            self.start = time.perf_counter()

    def _on_step(self, optimizer, args, kwargs) -> None:
        if self.start is None:
            return
        self.steps.append(time.perf_counter() - self.start)
        self.start = None
        if len(self.steps) == 2:
            first, second = self.steps
            log.info("model.compile: compiling took about %.1f s (first training step %.1f s, the second %.2f s)",
                     max(first - second, 0.0), first, second)
            self.close()

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []


def mark_dynamic(x: torch.Tensor, dim: int) -> None:
    """Tell Dynamo that ``x.shape[dim]`` changes from call to call, so that the blocks it
    enters are compiled once for every length; nothing where this torch lacks the call."""
    import torch._dynamo

    mark = getattr(torch._dynamo, "maybe_mark_dynamic", None)
    if mark is not None:
        mark(x, dim)
