"""MIL models: TDA-MIL and baselines, all with the same interface.

>>> from tdamil.models import create_model, model_config_from_dict, MODEL_NAMES, MILOutput
>>> model = create_model({"name": "tdamil", "dim": 512, "depth": 2}, in_dim=1024, num_classes=2)
>>> out = model(x, mask=None)  # x float [B, n, D]; mask bool [B, n], True = real patch
>>> out.logits, out.scores     # [B, c]; [B, n] per-patch relevance or None
"""

from tdamil.models.abmil import ABMIL, ABMILConfig
from tdamil.models.mean_pool import MeanPoolConfig, MeanPoolMIL
from tdamil.models.output import MILOutput
from tdamil.models.registry import MODEL_NAMES, ModelConfig, config_class, create_model, model_config_from_dict
from tdamil.models.tdamil import TDAMIL, TDAMILTrace, TransformerMIL
from tdamil.models.tdamil_config import TDAMILConfig, TransformerMILConfig
from tdamil.models.transmil import TransMIL, TransMILConfig

__all__ = [
    "MILOutput",
    "MODEL_NAMES",
    "ModelConfig",
    "create_model",
    "model_config_from_dict",
    "config_class",
    "TDAMIL",
    "TDAMILConfig",
    "TDAMILTrace",
    "TransformerMIL",
    "TransformerMILConfig",
    "TransMIL",
    "TransMILConfig",
    "ABMIL",
    "ABMILConfig",
    "MeanPoolMIL",
    "MeanPoolConfig",
]
