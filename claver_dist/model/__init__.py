"""CLAVER model: Kronecker-mask attention, the module, and its weights."""

from claver_dist.model.attention import KroneckerAttention, kronecker_attention, kronecker_mask
from claver_dist.model.claver import Claver
from claver_dist.model.config import ModelConfig
from claver_dist.model.weights import build_model, export_open_clip_state_dict, load_pretrained

__all__ = ["Claver", "KroneckerAttention", "ModelConfig", "build_model", "export_open_clip_state_dict",
           "kronecker_attention", "kronecker_mask", "load_pretrained"]
