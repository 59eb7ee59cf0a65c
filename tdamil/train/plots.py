"""Learning-curve plot of a training history (PNG, matplotlib without a display)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Mapping, Sequence

__all__ = ["plot_learning_curve"]


def plot_learning_curve(history: Sequence[Mapping[str, float]], path: str | Path, monitor: str = "auroc", title: str = "") -> Path:
    """Train/val loss (left) and the validation ``monitor`` metric (right) per epoch -> ``path``."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    path = Path(path)
    epochs = [row["epoch"] for row in history]

    def series(key: str) -> list[float]:
        return [float(row.get(key, math.nan)) for row in history]

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    ax1.plot(epochs, series("train_loss"), label="train loss", marker=".")
    if any("val_loss" in row for row in history):
        ax1.plot(epochs, series("val_loss"), label="val loss", marker=".")
    ax1.set_xlabel("epoch")
    ax1.set_ylabel("cross-entropy")
    ax1.legend()
    ax1.grid(alpha=0.3)
    key = f"val_{monitor}"
    if any(key in row for row in history):
        ax2.plot(epochs, series(key), label=key.replace("_", " "), marker=".", color="tab:green")
        best = max(history, key=lambda r: -math.inf if math.isnan(r.get(key, math.nan)) else (r[key] if monitor != "loss" else -r[key]))
        ax2.axvline(best["epoch"], color="grey", ls="--", lw=1, label=f"best epoch {int(best['epoch'])}")
        ax2.legend()
    else:
        ax2.text(0.5, 0.5, "no validation set", ha="center", va="center", transform=ax2.transAxes)
    ax2.set_xlabel("epoch")
    ax2.set_ylabel(monitor)
    ax2.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
