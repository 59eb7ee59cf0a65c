"""Build any MIL model of the project from a name and a config (dict or dataclass).

>>> cfg = model_config_from_dict({"name": "tdamil", "dim": 256}, source="site_a.yaml: model")
>>> model = create_model(cfg, in_dim=1024, num_classes=2)

Config dicts are validated through :func:`tdamil.config.from_dict`: an unknown key, a wrong type or
an unknown model name raises :class:`tdamil.config.ConfigError` naming the key and the fix.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from typing import Any, Union

from torch import nn

from tdamil.config import ConfigError, from_dict
from tdamil.models.abmil import ABMIL, ABMILConfig
from tdamil.models.mean_pool import MeanPoolConfig, MeanPoolMIL
from tdamil.models.tdamil import TDAMIL, TransformerMIL
from tdamil.models.tdamil_config import TDAMILConfig, TransformerMILConfig
from tdamil.models.transmil import TransMIL, TransMILConfig

__all__ = ["MODEL_NAMES", "ModelConfig", "model_config_from_dict", "create_model", "config_class"]

MODEL_NAMES: tuple[str, ...] = ("tdamil", "transformer_mil", "transmil", "abmil", "gated_abmil", "mean_pool")

ModelConfig = Union[TDAMILConfig, TransformerMILConfig, TransMILConfig, ABMILConfig, MeanPoolConfig]

_CONFIGS: dict[str, type] = {
    "tdamil": TDAMILConfig,
    "transformer_mil": TransformerMILConfig,
    "transmil": TransMILConfig,
    "abmil": ABMILConfig,
    "gated_abmil": ABMILConfig,
    "mean_pool": MeanPoolConfig,
}
_MODELS: dict[str, type[nn.Module]] = {
    "tdamil": TDAMIL,
    "transformer_mil": TransformerMIL,
    "transmil": TransMIL,
    "abmil": ABMIL,
    "gated_abmil": ABMIL,
    "mean_pool": MeanPoolMIL,
}


def _check_name(name: Any, source: str) -> str:
    if name is None:
        raise ConfigError(f"{source}: 'name' is required: one of {', '.join(MODEL_NAMES)}.")
    if name not in _CONFIGS:
        close = difflib.get_close_matches(str(name), MODEL_NAMES, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"{source}: 'name' must be one of {', '.join(MODEL_NAMES)}, got {name!r}.{hint}")
    return name


def config_class(name: str) -> type:
    """The config dataclass for model ``name``."""
    return _CONFIGS[_check_name(name, "<model config>")]


def model_config_from_dict(data: Mapping[str, Any], source: str = "<model config>") -> ModelConfig:
    """``{"name": ..., **fields}`` -> that model's validated config dataclass.

    ``source`` names where the dict came from (e.g. ``"configs/server.yaml: model"``) and starts
    every error message.
    """
    if not isinstance(data, Mapping):
        raise ConfigError(f"{source}: the model section must be a mapping with a 'name' key, got {type(data).__name__}.")
    name = _check_name(data.get("name"), source)
    return from_dict(_CONFIGS[name], dict(data), source=source)


def create_model(cfg: ModelConfig | Mapping[str, Any], in_dim: int, num_classes: int) -> nn.Module:
    """Build the model described by ``cfg`` (config dataclass or ``{"name": ..., ...}`` dict).

    Args:
        cfg: a config from :func:`model_config_from_dict` or a plain dict (validated the same way).
        in_dim: patch feature width ``D`` (1024 for UNI).
        num_classes: number of classes ``c``.
    """
    if isinstance(cfg, Mapping):
        cfg = model_config_from_dict(cfg)
    name = getattr(cfg, "name", None)
    if name not in _MODELS or not isinstance(cfg, _CONFIGS[name]):
        raise ConfigError(f"create_model: unsupported model config {cfg!r}; use model_config_from_dict().")
    if not isinstance(in_dim, int) or in_dim < 1:
        raise ValueError(f"in_dim must be a positive whole number (the feature width), got {in_dim!r}")
    if not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive whole number, got {num_classes!r}")
    return _MODELS[name](cfg, in_dim, num_classes)
