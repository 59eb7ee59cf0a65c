"""The one checkpoint format of tdamil-fl (``tdamil-train``, the federation, ``tdamil-predict``).

A checkpoint is data, never code: a ``torch.save`` dict holding only tensors and plain values
(dict with str keys, list, str, int, float, bool, None), read back with
``torch.load(weights_only=True)``. A file carrying any other pickled object (which could run code
while it is unpickled) is refused with a one-line :class:`CheckpointError`; nothing in it runs.

Keys every checkpoint has::

    format          CHECKPOINT_FORMAT
    kind            "training" (tdamil-train) or "federated" (flwr-server / tdamil-simulate)
    tdamil_version  the version that wrote it
    model_state     the model's full state dict (CPU tensors)
    model_config    the model's config as a dict (``create_model`` rebuilds it)
    in_dim          feature dimension the model takes
    num_classes     number of classes it predicts
    metrics         the metrics of that epoch / round

Training adds ``epoch``, ``train_config`` and ``extra``; the federation adds ``round``,
``model_spec`` (the run's model JSON, compared on ``--resume``), ``strategy_state`` (server
optimiser moments as tensors) and ``best``. Files are written atomically (:mod:`tdamil.atomic`).

Optional for every kind::

    feature_contract  the features the model takes (encoder, weights_sha256, target_magnification,
                      patch_size, feature_dim: ``tdamil.data.contract.FeatureContract.to_dict()``);
                      ``tdamil-predict`` refuses feature files that break it. Absent in older files.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Any, Mapping, Optional

import numpy as np
import torch
from torch import nn

from tdamil.atomic import atomic_path
from tdamil.config import to_dict

__all__ = ["CHECKPOINT_FORMAT", "CheckpointError", "save_checkpoint", "load_checkpoint", "annotate_checkpoint"]

CHECKPOINT_FORMAT = 2
_SCALARS = (str, int, float, bool, type(None))


class CheckpointError(ValueError):
    """A checkpoint file is missing, damaged, unsafe or does not fit the model. Names the file and the fix."""


def _plain(value: Any, where: str) -> Any:
    """``value`` as tensors and plain values only (numpy arrays become tensors, numpy scalars
    Python numbers, dataclasses and paths plain); anything else is a programming error."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(value).copy())
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, _SCALARS):
        return value
    if isinstance(value, Path) or (dataclasses.is_dataclass(value) and not isinstance(value, type)):
        return to_dict(value)
    if isinstance(value, Mapping):
        bad = [k for k in value if not isinstance(k, str)]
        if bad:
            raise TypeError(f"checkpoint field {where}: keys must be strings, got {bad[:3]}")
        return {k: _plain(v, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v, f"{where}[{i}]") for i, v in enumerate(value)]
    raise TypeError(f"checkpoint field {where}: {type(value).__name__} is neither a tensor nor plain data")


def save_checkpoint(
    path: str | Path,
    model: nn.Module | Mapping[str, torch.Tensor],
    *,
    kind: str = "training",
    model_config: Any = None,
    in_dim: Optional[int] = None,
    num_classes: Optional[int] = None,
    metrics: Optional[Mapping[str, Any]] = None,
    **fields: Any,
) -> Path:
    """Write a checkpoint of ``model`` (a module or its state dict) to ``path`` atomically.

    For a module, ``model_config`` / ``in_dim`` / ``num_classes`` default to its ``cfg``,
    ``in_dim`` and ``num_classes`` attributes (every tdamil model has them). ``fields`` are the
    kind's own keys (``epoch``, ``train_config``, ``round``, ``strategy_state``, ...) and the
    optional ``feature_contract`` (a plain dict; ``None`` is not stored).
    """
    from tdamil import __version__  # noqa: PLC0415 - the package imports this module's siblings

    if isinstance(model, nn.Module):
        model_config = getattr(model, "cfg", None) if model_config is None else model_config
        in_dim = getattr(model, "in_dim", None) if in_dim is None else in_dim
        num_classes = getattr(model, "num_classes", None) if num_classes is None else num_classes
        state = model.state_dict()
    else:
        state = model
    if fields.get("feature_contract", 0) is None:
        del fields["feature_contract"]
    payload = _plain({
        "format": CHECKPOINT_FORMAT,
        "kind": kind,
        "tdamil_version": __version__,
        "model_state": dict(state),
        "model_config": model_config,
        "in_dim": in_dim,
        "num_classes": num_classes,
        "metrics": dict(metrics or {}),
        **fields,
    }, "checkpoint")
    return _write(Path(path), payload)


def annotate_checkpoint(path: str | Path, **fields: Any) -> Path:
    """Add or replace plain fields of an existing checkpoint (e.g. ``feature_contract`` once the
    run knows it); weights and every other key are kept. Written atomically."""
    path = Path(path)
    ckpt = load_checkpoint(path)
    ckpt.update({k: v for k, v in fields.items() if v is not None})
    ckpt["format"] = CHECKPOINT_FORMAT  # load_checkpoint returned the current layout
    return _write(path, _plain(ckpt, "checkpoint"))


def _write(path: Path, payload: dict[str, Any]) -> Path:
    # through a file object: torch names the archive inside after a path's file name (here the random
    # temporary one), so equal checkpoints would differ in bytes; round_N.pt copied over last.pt
    # must match the sha256 the audit log recorded for last.pt
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        torch.save(payload, fh)
    return path


def load_checkpoint(path: str | Path, model: Optional[nn.Module] = None,
                    map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint (tensors and plain data only); with ``model``, load its weights strictly."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found. Check the path, or train / run the federation first.")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises many types on damaged files
        # weights_only refuses a global (a class or function) before creating it: nothing has run
        found = re.search(r"GLOBAL ([\w.]+)", str(exc))
        if found:
            raise CheckpointError(
                f"{path}: refused, it holds pickled Python objects ({found.group(1)}), not only tensors and plain "
                "data (a checkpoint must be data, never code). Do not load it; use a checkpoint written by this "
                "tdamil-fl version."
            ) from None
        raise CheckpointError(f"{path}: cannot read checkpoint ({type(exc).__name__}). The file is "
                              "damaged or not a checkpoint; use another one.") from None
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"{path}: not a tdamil-fl checkpoint. Use a best.pt/last.pt written by tdamil-fl.")
    ckpt = _upgrade(ckpt)
    if "model_state" not in ckpt:
        raise CheckpointError(f"{path}: not a tdamil-fl checkpoint (no model weights inside). Use a best.pt/last.pt "
                              "written by tdamil-fl.")
    if model is not None:
        try:
            model.load_state_dict(ckpt["model_state"], strict=True)
        except RuntimeError as exc:
            raise CheckpointError(
                f"{path}: weights do not fit this model ({str(exc).splitlines()[0]}). Build the model with the "
                f"checkpoint's model_config: {ckpt.get('model_config')}."
            ) from None
    return ckpt


def _upgrade(ckpt: dict[str, Any]) -> dict[str, Any]:
    """Format 1 files in the current layout: training ones already match; federated ones named the
    weights ``state_dict`` and described the model only in ``model_spec`` (JSON)."""
    if ckpt.get("format", 1) >= CHECKPOINT_FORMAT:
        return ckpt
    if "state_dict" in ckpt and "model_state" not in ckpt:
        spec = json.loads(ckpt.get("model_spec") or "{}")
        ckpt["model_state"] = ckpt.pop("state_dict")
        ckpt.setdefault("kind", "federated")
        ckpt.setdefault("model_config", spec.get("model"))
        ckpt.setdefault("in_dim", spec.get("in_dim"))
        ckpt.setdefault("num_classes", spec.get("num_classes"))
    ckpt.setdefault("kind", "training")
    return ckpt
