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
