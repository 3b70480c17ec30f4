"""Run configuration: one typed schema, composed from the dataclasses that each module owns.

Precedence: dataclass defaults <- YAML file(s) <- dotted command-line overrides.

    cfg = load_config("configs/debug.yaml", ["optim.lr=1e-4", "data.num_frames=16"])
    save_config(cfg, run_dir / "config.yaml")   # the resolved config, as the run used it

A YAML file may start from another one with ``_base_: other.yaml`` (path relative to the
file). Unknown keys are errors that name the key and the closest valid ones, so that a
typo never silently trains the default.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from claver_dist.checkpoint import CheckpointConfig
from claver_dist.data.config import DataConfig
from claver_dist.errors import ConfigError, require
from claver_dist.eval.config import EvalConfig
from claver_dist.model.config import ModelConfig
from claver_dist.text.config import TextConfig
from claver_dist.train.config import LogConfig, OptimConfig, TrainConfig

log = logging.getLogger("claver_dist.config")


@dataclass
class RunConfig:
    """Everything a run needs. ``run_dir`` holds checkpoints, logs, metrics and this config."""

    name: str = "claver"
    run_dir: str = "runs/${name}"
    seed: int = 0
    # classify: CLAVER fine-tuning on labelled shards (class prompts, soft-target cross-entropy);
    # pretrain: video-text pretraining on captioned shards (symmetric InfoNCE over the global
    # batch, retrieval validation). docs/pretraining.md
    task: Literal["classify", "pretrain"] = "classify"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    text: TextConfig = field(default_factory=TextConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def resolved_run_dir(self) -> Path:
        return Path(self.run_dir.replace("${name}", self.name))


# --------------------------------------------------------------------------- merging


def _type_hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _coerce(value: Any, typ: Any, key: str) -> Any:
    """Check/convert one YAML value against a dataclass field type."""
    origin = typing.get_origin(typ)
    args = typing.get_args(typ)
    if typ is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{key}: bad value {value!r}")
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{key}: {value!r} is not one of {list(args)}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        inner = args[0] if args else Any
        items = [_coerce(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
        return items if origin is list else tuple(items)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if dataclasses.is_dataclass(typ):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return _merge(typ(), value, key)
    if typ is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if typ is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if typ is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML reads "1e-5" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if typ is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    return value


def _unknown_key(key: str, valid: list[str], prefix: str) -> ConfigError:
    full = f"{prefix}.{key}" if prefix else key
    close = difflib.get_close_matches(key, valid, n=3, cutoff=0.5)
    hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    return ConfigError(f"unknown config key {full!r}{hint} (valid: {', '.join(sorted(valid))})")


def _merge(obj: Any, updates: dict[str, Any], prefix: str = "") -> Any:
    """Return a copy of dataclass ``obj`` with ``updates`` (a nested dict) applied."""
    hints = _type_hints(type(obj))
    names = [f.name for f in dataclasses.fields(obj)]
    changes = {}
    for key, value in updates.items():
        if key not in names:
            raise _unknown_key(key, names, prefix)
        full = f"{prefix}.{key}" if prefix else key
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current) and isinstance(value, dict):
            changes[key] = _merge(current, value, full)
        else:
            changes[key] = _coerce(value, hints[key], full)
    return dataclasses.replace(obj, **changes)


def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    path = path.resolve()
    if path in seen:
        raise ConfigError(f"{path}: _base_ cycle")
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    base = data.pop("_base_", None)
    if base is None:
        return data
    return _deep_update(_read_yaml(path.parent / base, seen + (path,)), data)


def _deep_update(base: dict, upd: dict) -> dict:
    out = dict(base)
    for k, v in upd.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_update(out[k], v)
        else:
            out[k] = v
    return out


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """``["optim.lr=1e-4", "model.temporal=kmct"]`` -> nested dict (values parsed as YAML)."""
    nested: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key.path=value")
        key, raw = item.split("=", 1)
        value = yaml.safe_load(raw) if raw != "" else ""
        node = nested
        parts = key.strip().split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = value
    return nested


# Keys that configs written by earlier versions may hold (every run folder and export keeps
# its resolved config.yaml): dropped with a warning, so those runs can still be evaluated.
RETIRED_KEYS = {
    ("data", "shuffle_buffer"): "it was never used (the loader draws an exact per-epoch permutation)",
}


def _drop_retired(data: dict[str, Any], where: str) -> dict[str, Any]:
    for (section, key), why in RETIRED_KEYS.items():
        if isinstance(data.get(section), dict) and key in data[section]:
            data[section] = {k: v for k, v in data[section].items() if k != key}
            log.warning("%s: ignoring retired config key %s.%s: %s", where, section, key, why)
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Defaults <- YAML ``path`` <- ``overrides``; validated."""
    data: dict[str, Any] = _drop_retired(_read_yaml(Path(path)), str(path)) if path else {}
    data = _deep_update(data, parse_overrides(overrides or []))  # typed now: a retired key is an error
    cfg = _merge(RunConfig(), data)
    validate(cfg)
    return cfg


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def dump_config(cfg: RunConfig) -> str:
    """The resolved config as YAML (what ``save_config`` writes)."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def save_config(cfg: RunConfig, path: str | Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(dump_config(cfg))


def validate(cfg: RunConfig) -> None:
    """Every section's own checks, then the top-level keys."""
    for sub in (cfg.model, cfg.data, cfg.text, cfg.optim, cfg.train, cfg.checkpoint, cfg.log, cfg.eval):
        sub.validate()
    require(bool(cfg.name.strip()), "name", "a non-empty name", cfg.name)
    if cfg.task == "pretrain":
        # a mixed clip has no caption of its own; pretraining pairs each clip with its own text
        for key in ("mixup_alpha", "cutmix_alpha"):
            require(getattr(cfg.train, key) == 0, f"train.{key}", "0 with task=pretrain", getattr(cfg.train, key))
    require(cfg.seed >= 0, "seed", ">= 0", cfg.seed)
