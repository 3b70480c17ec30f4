"""Recipe parity with the official CLAVER release (docs/model.md, "Parity"): each point's
default behaves as the official code does, and its config key switches it back."""

from __future__ import annotations

import math

import pytest
import torch

from claver_dist.config import load_config
from claver_dist.errors import ConfigError
from claver_dist.model import ModelConfig, build_model
from claver_dist.model.claver import drop_path_rates
from claver_dist.train.config import OptimConfig, TrainConfig
from claver_dist.train.engine import deepspeed_config, lr_multipliers, param_groups


def debug_model(**kw):
    torch.manual_seed(0)
    model, _ = build_model(ModelConfig(clip_model="claver-debug", **kw), num_frames=4, image_size=64)
    return model


# --------------------------------------------------------------------------- 1. video embedding


@pytest.mark.parametrize("renormalize", [False, True])
def test_video_embedding_is_the_mean_of_unit_frame_vectors(renormalize):
    model = debug_model(renormalize_video=renormalize).eval()
    video = torch.randn(3, 4, 3, 64, 64)
    with torch.no_grad():
        frames = model.encode_frames(video)
        emb = model.encode_video(video)
    unit = frames / frames.norm(dim=-1, keepdim=True)
    mean = unit.mean(dim=1)
    norms = emb.norm(dim=-1)
    if renormalize:  # the switch: logits are cosines again
        torch.testing.assert_close(emb, mean / mean.norm(dim=-1, keepdim=True))
        torch.testing.assert_close(norms, torch.ones(3))
    else:  # official: no second normalisation, so the norm is below 1 for differing frames
        torch.testing.assert_close(emb, mean)
        assert (norms < 0.999).all(), norms


# --------------------------------------------------------------------------- 2. LR schedule


def _timm_lrs(base_lrs: list[float], floor: float, warmup: int, total: int, steps: list[int]) -> list[list[float]]:
    """What timm's CosineLRScheduler, configured as the official release does, gives at each update."""
    from timm.scheduler.cosine_lr import CosineLRScheduler

    opt = torch.optim.SGD([{"params": [torch.zeros(1, requires_grad=True)], "lr": lr} for lr in base_lrs])
    sched = CosineLRScheduler(opt, t_initial=total, lr_min=floor, warmup_lr_init=0, warmup_t=warmup,
                              cycle_limit=1, t_in_epochs=False)
    out = []
    for t in steps:
        sched.step_update(t)
        out.append([g["lr"] for g in opt.param_groups])
    return out


def _our_lrs(base: float, mult: float, optim: OptimConfig, warmup: int, total: int, steps: list[int]):
    groups = [{"lr": base}, {"lr": base * mult}]
    fns = lr_multipliers(groups, base, optim, warmup, total)
    return [[g["lr"] * fn(t) for g, fn in zip(groups, fns)] for t in steps]


def test_lr_schedule_is_timms_cosine_counted_from_step_zero():
    base, warmup, total = 12e-6, 50, 600
    steps = [0, 1, 25, 49, 50, 51, 200, 333, 599, 600, 700]
    ours = _our_lrs(base, 10.0, OptimConfig(), warmup, total, steps)
    theirs = _timm_lrs([base, base * 10], base / 100, warmup, total, steps)
    for t, a, b in zip(steps, ours, theirs):
        assert a == pytest.approx(b, rel=1e-9, abs=1e-15), (t, a, b)
    # the formula, by hand, at a step after warm-up: the cosine has already run t / T of the way
    t = 200
    want = base / 100 + (base - base / 100) * 0.5 * (1 + math.cos(math.pi * t / total))
    assert ours[steps.index(t)][0] == pytest.approx(want, rel=1e-12)
    assert ours[0] == [0.0, 0.0]  # warm-up from 0, like warmup_lr_init=0
    # the floor is one absolute value: the 10x group ends where the base group ends
    assert ours[-1][0] == ours[-1][1] == pytest.approx(base / 100)


def test_warmup_prefix_switch_restores_the_cosine_after_warmup():
    base, warmup, total = 1e-3, 10, 100
    prefix = OptimConfig(warmup_prefix=True)
    lrs = _our_lrs(base, 10.0, prefix, warmup, total, [0, 9, 10, 55, 100])
    assert lrs[0][0] == pytest.approx(base / 11) and lrs[1][0] == pytest.approx(base * 10 / 11)
    assert lrs[2][0] == pytest.approx(base)  # the cosine starts at its top after warm-up
    assert lrs[3][0] == pytest.approx(base * (0.01 + 0.99 * 0.5))  # halfway through the remaining 90
    assert lrs[4][1] == pytest.approx(10 * base * 0.01)  # floor relative to each group
    # and the default (timm) is lower on average: the cosine has run during warm-up
    steps = list(range(total))
    mean = lambda o: sum(r[0] for r in _our_lrs(base, 10.0, o, warmup, total, steps)) / total  # noqa: E731
    assert mean(OptimConfig()) < mean(prefix)


# --------------------------------------------------------------------------- 3. logit scale


def test_logit_scale_is_used_uncapped_unless_a_cap_is_set():
    video, text = torch.nn.functional.normalize(torch.randn(2, 32), dim=-1), \
        torch.nn.functional.normalize(torch.randn(3, 32), dim=-1)
    for cap, want in ((None, 200.0), (100.0, 100.0)):
        model = debug_model(logit_scale_max=cap)
        with torch.no_grad():
            model.logit_scale.fill_(math.log(200.0))
        logits = model.logits(video, text, num_variants=1)
        torch.testing.assert_close(logits[:, 0], want * video @ text.T)
    with pytest.raises(ConfigError, match="model.logit_scale_max"):
        load_config(None, ["model.logit_scale_max=0.5"])


# --------------------------------------------------------------------------- 4. gradient clipping


def test_no_gradient_clipping_by_default():
    assert OptimConfig().grad_clip == 0.0
    assert deepspeed_config(TrainConfig(), OptimConfig(), 8, 1)["gradient_clipping"] == 0.0
    assert deepspeed_config(TrainConfig(), OptimConfig(grad_clip=1.0), 8, 1)["gradient_clipping"] == 1.0
    assert load_config("configs/k400_b16_8f.yaml").optim.grad_clip == 0.0


# --------------------------------------------------------------------------- 5. temporal-block init


def test_temporal_blocks_start_from_pytorch_defaults_or_trunc_normal():
    torch_init = debug_model()  # default: torch
    block = torch_init.temporal_blocks[0]
    D = block.ln_1.weight.shape[0]
    # nn.MultiheadAttention's own init: Xavier-uniform [3D, D] input projection, zero biases
    assert block.attn.in_proj.weight.abs().max() <= math.sqrt(6 / (D + 3 * D))
    assert block.attn.in_proj.bias.abs().max() == 0 and block.attn.out_proj.bias.abs().max() == 0
    # nn.Linear's: uniform biases within 1/sqrt(fan_in), not zero
    for linear in (block.mlp.c_fc, block.mlp.c_proj):
        bound = 1 / math.sqrt(linear.in_features)
        assert 0 < linear.bias.abs().max() <= bound
    trunc = debug_model(temporal_init="trunc_normal").temporal_blocks[0]
    for linear in (trunc.attn.in_proj, trunc.attn.out_proj, trunc.mlp.c_fc, trunc.mlp.c_proj):
        assert linear.bias.abs().max() == 0
        assert linear.weight.std().item() == pytest.approx(0.02, rel=0.25)
    # the CLIP part is untouched by the choice
    assert torch.equal(torch_init.clip.visual.proj, debug_model(temporal_init="trunc_normal").clip.visual.proj)


# --------------------------------------------------------------------------- 6. weight decay


def _decayed(model, **kw) -> set[str]:
    groups = param_groups(model, 1e-3, 0.001, 10.0, **kw)
    return {n for g in groups if g["weight_decay"] > 0 for n in g["names"]}


def test_weight_decay_covers_the_temporal_embedding_and_logit_scale():
    model = debug_model()
    decayed = _decayed(model)
    assert {"temporal_embedding", "logit_scale", "clip.visual.proj"} <= decayed
    no = {"clip.visual.positional_embedding", "clip.positional_embedding", "clip.visual.class_embedding",
          "temporal_blocks.0.attn.in_proj.bias", "temporal_blocks.0.ln_1.weight"}
    assert not no & decayed
    switched = _decayed(model, no_decay_keywords=["positional_embedding", "temporal_embedding", "logit_scale"])
    assert decayed - switched == {"temporal_embedding", "logit_scale"}
    # the temporal parameters (embedding included) train at 10x in both cases
    temporal_lrs = {g["lr"] for g in param_groups(model, 1e-3, 0.001, 10.0) if "temporal" in g["group_name"]}
    assert temporal_lrs == {1e-2}


# --------------------------------------------------------------------------- 7. drop path


def test_drop_path_ramps_over_spatial_and_temporal_blocks_together():
    spatial, temporal = drop_path_rates(0.2, 12, 4, "shared")
    assert spatial == pytest.approx([0.2 * i / 11 for i in range(12)])
    assert temporal == pytest.approx(spatial[:4])
    spatial, temporal = drop_path_rates(0.2, 12, 4, "temporal")
    assert spatial == [0.0] * 12 and temporal == pytest.approx([0.05, 0.1, 0.15, 0.2])
    assert drop_path_rates(0.0, 6, 2, "shared") == ([0.0] * 6, [0.0, 0.0])


def test_spatial_drop_path_acts_in_training_only():
    plain, dropped = debug_model(), debug_model(drop_path=0.5)
    assert len(dropped.spatial_drop_path) == 5  # 6 CLIP layers, the first at rate 0
    dropped.load_state_dict(plain.state_dict())  # drop path adds no parameters
    video = torch.randn(2, 4, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(plain.eval().encode_frames(video), dropped.eval().encode_frames(video))
        dropped.train()
        torch.manual_seed(1)
        a = dropped.encode_frames(video)
        torch.manual_seed(2)
        b = dropped.encode_frames(video)
    assert not torch.allclose(a, b)


# --------------------------------------------------------------------------- 8. prompt variants


def test_official_variant_draw_needs_unsharded_text():
    with pytest.raises(ConfigError, match="text.shard_text=false"):
        load_config(None, ["text.variant_sampling=per_micro_batch"])
    cfg = load_config(None, ["text.variant_sampling=per_micro_batch", "text.shard_text=false"])
    assert cfg.text.variant_sampling == "per_micro_batch"


# --------------------------------------------------------------------------- recipes


@pytest.mark.parametrize("name,frames,batch,accum", [
    ("k400_b32_8f", 8, 8, 4), ("k400_b32_16f", 16, 8, 4), ("k400_b16_8f", 8, 8, 4), ("k400_b16_16f", 16, 4, 8),
    ("k400_b16_32f", 32, 4, 8), ("k400_l14", 8, 4, 8), ("k400_l14_336", 16, 1, 32),
    ("k600_b16_8f", 8, 8, 4), ("k600_b16_16f", 16, 4, 8), ("k600_b16_32f", 32, 8, 4), ("k600_l14", 8, 4, 8),
])
def test_supervised_recipes_match_the_official_configs(name, frames, batch, accum):
    cfg = load_config(f"configs/{name}.yaml")
    assert (cfg.data.num_frames, cfg.data.batch_size, cfg.train.grad_accum) == (frames, batch, accum)
    assert cfg.train.epochs == 60 and cfg.optim.lr == 12e-6 and cfg.optim.grad_clip == 0
    assert not cfg.model.renormalize_video and cfg.model.logit_scale_max is None
    assert cfg.model.temporal_init == "torch" and not cfg.optim.warmup_prefix
    assert cfg.optim.no_decay_keywords == ["positional_embedding"]
    assert 8 * batch * accum == 256 == cfg.optim.lr_reference_batch
    assert cfg.text.labels.endswith("kinetics600.csv" if name.startswith("k600") else "kinetics400.csv")


def test_fewshot_recipe_starts_from_the_32_frame_model():
    cfg = load_config("configs/fewshot_hmdb51.yaml")
    assert (cfg.data.num_frames, cfg.data.batch_size, cfg.train.grad_accum, cfg.train.epochs) == (32, 4, 2, 80)
    assert cfg.optim.lr == 2e-6 and cfg.optim.lr_reference_batch == 64
    assert cfg.model.pretrained == "runs/k400_b16_32f/export/model.safetensors"


@pytest.mark.slow
def test_official_variant_draw_changes_per_micro_batch(motion_shards, tmp_path):
    """``per_micro_batch``: every micro-batch encodes its own K draws (with replacement)."""
    from claver_dist.distributed import DistEnv
    from claver_dist.train.trainer import Trainer

    cfg = load_config("configs/debug.yaml", [
        f"data.train_shards={motion_shards}", "data.val_shards=", f"text.labels={motion_shards / 'labels.csv'}",
        f"run_dir={tmp_path / 'run'}", "data.num_workers=0", "data.batch_size=4", "train.grad_accum=2",
        "log.count_flops=false", "train.precision=fp32", "text.variant_sampling=per_micro_batch",
        "text.shard_text=false"])
    trainer = Trainer(cfg, DistEnv.from_environ({}, device="cpu"))
    draws: list[list[int]] = []
    encode = trainer._step_text_features
    trainer._step_text_features = lambda idx: (draws.append(list(idx)), encode(idx))[1]
    batches = iter(trainer.train_loader)
    for _ in range(3):
        out = trainer.train_step([next(batches), next(batches)])
        trainer.step += 1
        assert out["loss"] == out["loss"]
    trainer.close()
    assert len(draws) == 6 and all(len(d) == 2 for d in draws)  # one draw per micro-batch
    assert any(draws[i] != draws[i + 1] for i in range(0, 6, 2))  # the two micro-batches of a step differ
