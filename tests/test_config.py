"""Config schema: precedence, unknown keys, types, resolved round-trip, shipped recipes."""

from pathlib import Path

import pytest

from claver_dist.config import ConfigError, RunConfig, load_config, save_config

CONFIGS = sorted(Path(__file__).parent.parent.joinpath("configs").glob("*.yaml"))


def test_defaults_then_file_then_overrides(tmp_path):
    f = tmp_path / "a.yaml"
    f.write_text("optim:\n  lr: 3.0e-5\n  weight_decay: 0.5\ndata:\n  num_frames: 16\n")
    cfg = load_config(f, ["optim.lr=1e-4", "model.temporal=kmct"])
    assert cfg.optim.lr == 1e-4            # override beats file
    assert cfg.optim.weight_decay == 0.5   # file beats default
    assert cfg.data.num_frames == 16
    assert cfg.model.temporal == "kmct"
    assert cfg.optim.betas == (0.9, 0.98)  # default kept


def test_base_inheritance(tmp_path):
    (tmp_path / "base.yaml").write_text("data:\n  num_frames: 8\n  image_size: 224\n")
    (tmp_path / "child.yaml").write_text("_base_: base.yaml\ndata:\n  num_frames: 16\n")
    cfg = load_config(tmp_path / "child.yaml")
    assert (cfg.data.num_frames, cfg.data.image_size) == (16, 224)


@pytest.mark.parametrize("override,needle", [
    (["optim.lrr=1"], "unknown config key 'optim.lrr'; did you mean 'lr'"),
    (["modle.temporal=kmt"], "unknown config key 'modle'; did you mean 'model'"),
    (["model.temporal=bogus"], "model.temporal: 'bogus' is not one of"),
    (["data.num_frames=eight"], "data.num_frames: expected an integer"),
    (["optim.lr"], "not of the form"),
])
def test_bad_keys_and_values_name_the_key(override, needle):
    with pytest.raises(ConfigError) as e:
        load_config(None, override)
    assert needle in str(e.value)
    assert "\n" not in str(e.value)


def test_unknown_key_in_file(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("train:\n  epocs: 3\n")
    with pytest.raises(ConfigError, match="'train.epocs'; did you mean 'epochs'"):
        load_config(f)


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(None, ["name=x", "optim.lr=2e-5", "text.kinds=[synonyms, body_parts]", "model.pretrained=null"])
    save_config(cfg, tmp_path / "config.yaml")
    again = load_config(tmp_path / "config.yaml")
    assert again == cfg
    assert again.resolved_run_dir() == Path("runs/x")


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_shipped_recipes_load(path):
    cfg = load_config(path)
    assert isinstance(cfg, RunConfig)


def test_reference_recipe_values():
    cfg = load_config(Path(__file__).parent.parent / "configs/k400_b16_8f.yaml")
    assert cfg.optim.lr == 12e-6 and cfg.optim.lr_reference_batch == 256
    assert cfg.optim.betas == (0.9, 0.98) and cfg.optim.weight_decay == 0.001
    assert cfg.optim.temporal_lr_mult == 10 and cfg.optim.warmup_epochs == 5
    assert cfg.train.label_smoothing == 0.1 and cfg.train.mixup_alpha == 0.8 and cfg.train.cutmix_alpha == 1.0
    assert cfg.data.num_frames == 8 and cfg.model.clip_model == "ViT-B-16-quickgelu"
    l336 = load_config(Path(__file__).parent.parent / "configs/k400_l14_336.yaml")
    assert (l336.data.num_frames, l336.data.image_size, l336.data.batch_size, l336.train.grad_accum) == (16, 336, 1, 32)
    assert l336.model.grad_checkpointing != "none"


def test_retired_keys_of_earlier_configs_are_dropped_with_a_warning(tmp_path, caplog):
    """Run folders and exports keep the config they were trained with; a key since removed
    must not make them unloadable."""
    old = tmp_path / "config.yaml"
    old.write_text("name: old\ndata:\n  batch_size: 4\n  shuffle_buffer: 500\n")
    with caplog.at_level("WARNING", logger="claver_dist.config"):
        cfg = load_config(old)
    assert cfg.data.batch_size == 4 and not hasattr(cfg.data, "shuffle_buffer")
    assert "retired config key data.shuffle_buffer" in caplog.text
    with pytest.raises(ConfigError, match="unknown config key 'data.shufle_buffer'"):
        load_config(old, ["data.shufle_buffer=1"])


@pytest.mark.parametrize("override,needle", [
    ("train.grad_accum=0", "train.grad_accum must be >= 1, got 0"),
    ("train.epochs=0", "train.epochs must be >= 1"),
    ("train.max_steps=0", "train.max_steps must be >= 1 or null"),
    ("train.zero_stage=7", "train.zero_stage: 7 is not one of [0, 1, 2]"),
    ("train.label_smoothing=1.5", "train.label_smoothing must be in [0, 1)"),
    ("train.mixup_prob=2", "train.mixup_prob must be a probability"),
    ("train.val_every_epochs=0", "train.val_every_epochs must be >= 1"),
    ("optim.lr=-1", "optim.lr must be > 0, got -1.0"),
    ("optim.betas=[0.9,1.5]", "optim.betas must be two numbers in [0, 1)"),
    ("optim.grad_clip=-1", "optim.grad_clip must be >= 0"),
    ("optim.min_lr_ratio=2", "optim.min_lr_ratio must be in [0, 1]"),
    ("checkpoint.every_steps=0", "checkpoint.every_steps must be >= 1, got 0"),
    ("checkpoint.keep_last=0", "checkpoint.keep_last must be >= 1 (the newest checkpoint is always kept)"),
    ("checkpoint.keep_last=-2", "checkpoint.keep_last must be >= 1"),
    ("log.every_steps=0", "log.every_steps must be >= 1"),
    ("log.peak_tflops=0", "log.peak_tflops must be > 0 or null"),
    ("eval.num_crops=2", "eval.num_crops: 2 is not one of [1, 3]"),
    ("eval.num_clips=0", "eval.num_clips must be >= 1"),
    ("text.context_length=100", "text.context_length must be in 1..77"),
    ("model.temporal_embedding_std=0", "model.temporal_embedding_std must be > 0"),
    ("seed=-1", "seed must be >= 0"),
    ("data.shuffle_buffer=5", "unknown config key 'data.shuffle_buffer'"),
])
def test_every_section_validates_its_values(override, needle):
    """One line naming the key, before any model, data or process is touched."""
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert needle in str(e.value) and "\n" not in str(e.value)
