"""Where and how a model runs: device choice, seeding, bf16 autocast on CUDA, progress bars.

Shared by training (:mod:`tdamil.train.engine`) and evaluation (:mod:`tdamil.train.evaluate`).
"""

from __future__ import annotations

import contextlib
import random
from typing import Any, Iterable

import numpy as np
import torch
from torch import nn

__all__ = ["resolve_device", "seed_everything", "model_device", "autocast", "logits_of", "progress"]


def resolve_device(spec: str | torch.device | None = "auto") -> torch.device:
    """``auto`` -> CUDA when available, else CPU; otherwise ``torch.device(spec)`` (checked)."""
    if isinstance(spec, torch.device):
        return spec
    if spec is None or spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(spec)
    except RuntimeError:
        raise ValueError(f"device '{spec}' is not understood; use auto, cpu, cuda or cuda:N.") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device '{spec}' requested but no CUDA GPU is available here; use device: auto or cpu.")
    return dev


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA)."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def model_device(model: nn.Module) -> torch.device:
    """Device of the model's first parameter (CPU for a parameterless model)."""
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def autocast(device: torch.device, enabled: bool):
    use = enabled and device.type == "cuda" and torch.cuda.is_bf16_supported()
    return torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=True) if use else contextlib.nullcontext()


def logits_of(out: Any) -> torch.Tensor:
    return out.logits if hasattr(out, "logits") else out


def progress(iterable: Iterable, enabled: bool, **kw: Any) -> Iterable:
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, **kw)
