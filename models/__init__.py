"""Decoder-only transformers as pure Flax functions, and porting from HuggingFace checkpoints and
from tracr-compiled models (`from_tracr`)."""

from .config import ConfigError, ModelConfig
from .convert import CheckpointError
from .edges import EdgePatch
from .pretrained import Model, from_pretrained, save_converted
from .sites import SiteError, Sites
from .tracr import TracrEncoding, TracrError, TracrModel, from_tracr
from .transformer import embed_inputs, forward, init_params, site_names

__all__ = [
    "CheckpointError", "ConfigError", "EdgePatch", "Model", "ModelConfig", "SiteError", "Sites",
    "TracrEncoding", "TracrError", "TracrModel", "embed_inputs", "forward", "from_pretrained",
    "from_tracr", "init_params", "save_converted", "site_names",
]
