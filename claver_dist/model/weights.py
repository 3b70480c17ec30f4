"""Weights in and out: build CLAVER from an open_clip name + pretrained tag or file,
check that a checkpoint fits, interpolate embeddings, export back to open_clip.

    model, fresh = build_model(ModelConfig(clip_model="ViT-B-16-quickgelu", pretrained="openai"),
                               num_frames=8, image_size=224)
    model, fresh = build_model_for(run_config)     # the same, from a run's model + data sections

``pretrained`` may be an open_clip tag (downloaded by open_clip where there is internet),
a local open_clip/OpenAI checkpoint, or a CLAVER checkpoint (``clip.*`` + temporal keys).
The spatial positional embedding is resized for a new image size (224 -> 336) and the
temporal embedding for a new frame count (8 -> 32) by linear interpolation.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any, Protocol

import open_clip
import torch
import torch.nn.functional as F
from open_clip.factory import load_state_dict as load_open_clip_file
from open_clip.model import resize_pos_embed

from claver_dist.model.claver import Claver
from claver_dist.model.compile import compile_blocks
from claver_dist.model.config import ModelConfig


class RunLike(Protocol):
    """What ``build_model_for`` reads of a run config (``claver_dist.config.RunConfig``)."""

    model: ModelConfig
    data: Any  # DataConfig: num_frames, image_size


log = logging.getLogger(__name__)

_CONFIG_DIR = Path(__file__).parent / "configs"


def register_model_configs() -> None:
    """Make the shipped open_clip configs (``claver-debug``) known to open_clip."""
    if "claver-debug" not in open_clip.list_models():
        open_clip.add_model_config(_CONFIG_DIR)


def build_model(cfg: ModelConfig, num_frames: int, image_size: int | None = None) -> tuple[Claver, list[str]]:
    """CLAVER per ``cfg``; returns the model and the names of freshly initialised parameters."""
    register_model_configs()
    if cfg.clip_model not in open_clip.list_models():
        raise ValueError(f"model.clip_model={cfg.clip_model!r} is not an open_clip model name "
                         f"(see open_clip.list_models(); use the -quickgelu names for OpenAI weights)")
    clip = open_clip.create_model(cfg.clip_model, pretrained=None, force_image_size=image_size)
    model = Claver(clip, num_frames=num_frames, temporal=cfg.temporal, temporal_layers=cfg.temporal_layers,
                   attention=cfg.attention, drop_path=cfg.drop_path, grad_checkpointing=cfg.grad_checkpointing,
                   checkpoint_every=cfg.checkpoint_every, init_logit_scale=cfg.init_logit_scale,
                   temporal_embedding_std=cfg.temporal_embedding_std, temporal_init=cfg.temporal_init,
                   drop_path_layout=cfg.drop_path_layout, renormalize_video=cfg.renormalize_video,
                   logit_scale_max=cfg.logit_scale_max)
    if cfg.pretrained:
        fresh = load_pretrained(model, pretrained_state_dict(cfg.clip_model, cfg.pretrained, image_size))
        log.info("loaded %s (%s); freshly initialised: %s", cfg.clip_model, cfg.pretrained, ", ".join(fresh) or "none")
    else:
        fresh = [n for n, _ in model.named_parameters()]
    if cfg.compile:  # in place: the state dict keys stay the same
        compile_blocks(model)
    return model, fresh


def build_model_for(run: RunLike, pretrained: bool = True) -> tuple[Claver, list[str]]:
    """The model a run trains or evaluates: ``run.model`` at ``run.data``'s frames and size.

    ``pretrained=False`` skips ``model.pretrained`` (the caller loads trained weights over
    the fresh ones); ``run`` itself is never changed."""
    model_cfg = run.model if pretrained else dataclasses.replace(run.model, pretrained=None)
    return build_model(model_cfg, run.data.num_frames, run.data.image_size)


def pretrained_state_dict(model_name: str, pretrained: str, image_size: int | None = None) -> dict[str, torch.Tensor]:
    """A state dict from a local file, or from open_clip's download of a pretrained tag."""
    path = Path(pretrained).expanduser()
    if path.exists():
        return load_open_clip_file(str(path))
    if pretrained.endswith((".pt", ".pth", ".bin", ".safetensors")) or "/" in pretrained:
        raise FileNotFoundError(f"model.pretrained: no such file {pretrained}")
    tags = open_clip.list_pretrained_tags_by_model(model_name)
    if pretrained not in tags:
        raise ValueError(f"model.pretrained={pretrained!r} is neither a file nor a known tag of "
                         f"{model_name} (tags: {', '.join(tags) or 'none'})")
    clip = open_clip.create_model(model_name, pretrained=pretrained, force_image_size=image_size)
    return clip.state_dict()


def _to_claver_keys(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Accept open_clip CLIP keys (``visual.*``) or CLAVER keys (``clip.visual.*``)."""
    if any(k.startswith("clip.") for k in sd):
        return dict(sd)
    out = {}
    for k, v in sd.items():
        out[k if k == "logit_scale" else f"clip.{k}"] = v
    return out


def interpolate_temporal_embedding(emb: torch.Tensor, num_frames: int) -> torch.Tensor:
    """``[1, T, D]`` -> ``[1, num_frames, D]`` by linear interpolation over time."""
    if emb.shape[1] == num_frames:
        return emb
    out = F.interpolate(emb.float().transpose(1, 2), size=num_frames, mode="linear", align_corners=False)
    return out.transpose(1, 2).to(emb.dtype)


def load_pretrained(model: Claver, state_dict: dict[str, torch.Tensor]) -> list[str]:
    """Load a CLIP or CLAVER state dict into ``model``, strictly.

    Every key of the checkpoint must be used, with a matching shape (after resizing the
    positional and temporal embeddings); the only model keys it may lack are CLAVER's
    temporal parameters, which keep their fresh init. Returns those fresh names."""
    sd = _to_claver_keys(state_dict)
    if "logit_scale" in sd:
        sd["logit_scale"] = sd["logit_scale"].reshape(1)
    if "clip.visual.positional_embedding" in sd:  # resize for a new image size (224 -> 336)
        clip_sd = {"visual.positional_embedding": sd["clip.visual.positional_embedding"]}
        resize_pos_embed(clip_sd, model.clip)
        sd["clip.visual.positional_embedding"] = clip_sd["visual.positional_embedding"]
    if "temporal_embedding" in sd and model.temporal_embedding is not None:
        sd["temporal_embedding"] = interpolate_temporal_embedding(sd["temporal_embedding"], model.num_frames)

    own = model.state_dict()
    for k, v in sd.items():
        if k not in own:
            raise KeyError(f"checkpoint key {k!r} does not exist in CLAVER({model.clip.__class__.__name__}, "
                           f"temporal={model.temporal_kind}): wrong model.clip_model or model.temporal?")
        if own[k].shape != v.shape:
            raise ValueError(f"checkpoint key {k!r} has shape {tuple(v.shape)}, the model expects "
                             f"{tuple(own[k].shape)}: wrong model.clip_model?")
    temporal = set(model.temporal_parameter_names())
    missing = [k for k in own if k not in sd]
    bad_missing = [k for k in missing if k not in temporal]
    if bad_missing:
        raise KeyError(f"checkpoint lacks CLIP key {bad_missing[0]!r} ({len(bad_missing)} missing): "
                       "not a complete checkpoint of this architecture")
    model.load_state_dict(sd, strict=False)
    return missing


def export_open_clip_state_dict(model: Claver) -> dict[str, torch.Tensor]:
    """The CLIP part in open_clip's layout (0-dim ``logit_scale``), loadable by ``open_clip.create_model``."""
    sd = {k[len("clip."):]: v.detach().clone() for k, v in model.state_dict().items() if k.startswith("clip.")}
    sd["logit_scale"] = model.logit_scale.detach().reshape(()).clone()
    return sd
