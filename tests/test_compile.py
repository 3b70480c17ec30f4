"""model.compile: per-block torch.compile gives eager's numbers, whole blocks, the same keys.

CPU, fp32, dense attention (FlexAttention has no backward on CPU; its forward is traced
below). Inductor compiles C++ here (g++).
"""

import logging

import pytest
import torch
import torch._dynamo

from claver_dist.config import load_config
from claver_dist.errors import ConfigError
from claver_dist.model import ModelConfig, build_model, build_model_for
from claver_dist.model.claver import TemporalBlock
from claver_dist.model.compile import CompileClock, compile_blocks, model_blocks
from claver_dist.text.prompts import tokenize
from claver_dist.train.loss import soft_target_cross_entropy

DEBUG = "configs/debug.yaml"


def _debug_model(compile: bool):
    """configs/debug.yaml's model (claver-debug, 8 frames at 64 px), dense attention."""
    cfg = load_config(DEBUG, ["model.attention=dense", f"model.compile={str(compile).lower()}"])
    torch.manual_seed(0)
    return build_model_for(cfg)[0].train(), cfg


def _steps(model, cfg, n: int = 3) -> list[float]:
    """``n`` AdamW steps on fixed random clips; the prompts (and so the text length) change per step."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    if model.compiled:
        CompileClock(model, opt)  # as build_engine attaches it
    g = torch.Generator().manual_seed(1)
    B, T, S, C, K = cfg.data.batch_size, cfg.data.num_frames, cfg.data.image_size, 4, 2
    target = torch.eye(C)[torch.arange(B) % C]
    losses = []
    for step in range(n):
        video = torch.randn(B, T, 3, S, S, generator=g)
        texts = [f"a video of {'very ' * (step + k)}class {c}" for k in range(K) for c in range(C)]
        logits = model(video, tokenize(texts), num_variants=K)
        loss = soft_target_cross_entropy(logits, target)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


@pytest.mark.slow
def test_compiled_debug_model_trains_like_eager(caplog):
    eager, cfg = _debug_model(compile=False)
    with caplog.at_level(logging.INFO, logger="claver_dist.model.compile"):
        compiled, _ = _debug_model(compile=True)
        assert compiled.compiled and not eager.compiled
        want = _steps(eager, cfg)
        got = _steps(compiled, cfg)
    # (not the weights: Adam turns the rounding noise of near-zero gradients, such as the
    # attention key biases', into full-size updates)
    assert max(abs(a - b) for a, b in zip(got, want)) <= 1e-5, (got, want)
    clock = [r.getMessage() for r in caplog.records if "compiling took about" in r.getMessage()]
    assert len(clock) == 1, [r.getMessage() for r in caplog.records]


@pytest.mark.slow
def test_compiled_blocks_under_activation_checkpointing_give_eager_gradients():
    """Checkpointing wraps the compiled blocks (k400_l14_336 checkpoints all of them)."""
    eager, cfg = _debug_model(compile=False)
    ckpt_cfg = load_config(DEBUG, ["model.attention=dense", "model.compile=true", "model.grad_checkpointing=all"])
    compiled = build_model_for(ckpt_cfg)[0].train()
    compiled.load_state_dict(eager.state_dict())
    # the shapes of the steps above: the blocks' compiled code is shared within a process
    video = torch.randn(cfg.data.batch_size, cfg.data.num_frames, 3, cfg.data.image_size, cfg.data.image_size)
    tokens = tokenize([f"a video of class {c}" for c in range(8)])
    for model in (eager, compiled):
        model(video, tokens, num_variants=2).pow(2).sum().backward()
    for (name, a), b in zip(eager.named_parameters(), compiled.parameters()):
        assert (b.grad - a.grad).abs().max() <= 1e-5 * a.grad.abs().max(), name


def _block_inputs(model, cfg):
    """Each kind of block with the input the model gives it in training."""
    T, S = cfg.data.num_frames, cfg.data.image_size
    B, L, D = 2, (S // 16) ** 2 + 1, model.clip.visual.class_embedding.shape[-1]
    n = 12  # a trimmed prompt length
    return {
        "clip_image": (model.clip.visual.transformer.resblocks[0], (torch.randn(B * T, L, D, requires_grad=True),), {}),
        "clip_text": (model.clip.transformer.resblocks[0], (torch.randn(8, n, D, requires_grad=True),),
                      {"attn_mask": model.clip.attn_mask[:n, :n]}),
        "temporal": (model.temporal_blocks[0], (torch.randn(B, T * L, D, requires_grad=True), T), {}),
    }


@pytest.mark.parametrize("kind", ["clip_image", "clip_text", "temporal"])
def test_no_graph_breaks_inside_a_block(kind):
    model, cfg = _debug_model(compile=False)
    block, args, kwargs = _block_inputs(model, cfg)[kind]
    torch._dynamo.reset()
    out = torch._dynamo.explain(block)(*args, **kwargs)
    assert out.graph_break_count == 0, out.break_reasons
    assert out.graph_count == 1


@pytest.mark.parametrize("causal", [False, True])
def test_flex_attention_is_traced_into_the_temporal_block(causal):
    """The forward FlexAttention path (what runs compiled on CUDA) is one graph with the block."""
    block = TemporalBlock(64, causal=causal, impl="flex").eval()
    x = torch.randn(2, 8 * 17, 64)
    torch._dynamo.reset()
    with torch.no_grad():
        out = torch._dynamo.explain(block)(x, 8)
    assert out.graph_break_count == 0, out.break_reasons
    assert out.graph_count == 1


def test_state_dict_keys_do_not_change():
    eager, _ = _debug_model(compile=False)
    compiled, _ = _debug_model(compile=True)
    assert list(compiled.state_dict()) == list(eager.state_dict())
    assert not [k for k in compiled.state_dict() if "_orig_mod" in k]
    assert len(model_blocks(compiled)) == 6 + 2 + 2  # image tower, text tower, temporal blocks
    compiled.load_state_dict(eager.state_dict(), strict=True)  # checkpoints load either way
    eager.load_state_dict(compiled.state_dict(), strict=True)


def test_compile_needs_no_drop_path():
    with pytest.raises(ConfigError, match="model.drop_path"):
        load_config(DEBUG, ["model.compile=true", "model.drop_path=0.1"])
    model, _ = build_model(ModelConfig(clip_model="claver-debug", drop_path=0.1), num_frames=2, image_size=64)
    with pytest.raises(ValueError, match="drop_path=0"):
        compile_blocks(model)
