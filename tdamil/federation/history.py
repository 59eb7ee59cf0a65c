"""Per-round, per-site metrics of a federated run: ``metrics.jsonl``, ``metrics.csv`` and plots.

One row per (round, phase, site): phase ``train`` (what a site reports after local training),
``evaluate`` (a site's validation metrics of round ``round``'s global model, the model it received
in round ``round + 1``: round 0 is the initial model), ``heldout`` (server-side evaluation of the
global model after round ``round`` on a held-out cohort) and ``aggregate`` (site ``federation``:
round seconds, DP epsilon; site ``site-evaluation``: the sites' weighted mean of ``evaluate``). Rows are appended as they happen, so a resumed run continues the
same files.
"""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path
from typing import Any, Iterable

from tdamil.config import json_safe

logger = logging.getLogger(__name__)

__all__ = ["MetricsHistory", "plot_learning_curves", "read_history"]


class MetricsHistory:
    """Append-only metrics table of a run."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.jsonl = self.folder / "metrics.jsonl"
        self.csv = self.folder / "metrics.csv"

    def add(self, server_round: int, phase: str, site: str, metrics: dict[str, Any]) -> None:
        row = {"round": server_round, "phase": phase, "site": site}
        row.update(json_safe({k: float(v) if isinstance(v, (int, float)) else v for k, v in metrics.items()}))
        with open(self.jsonl, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(row) + "\n")

    def rows(self) -> list[dict[str, Any]]:
        return read_history(self.jsonl)

    def drop_after(self, server_round: int) -> None:
        """Forget rows of rounds after ``server_round`` (a resumed run redoes them)."""
        if not self.jsonl.exists():
            return
        keep = [r for r in self.rows() if r["round"] <= server_round]
        self.jsonl.write_text("".join(json.dumps(r) + "\n" for r in keep), encoding="utf-8")

    def drop_rows(self, server_round: int, phase: str) -> None:
        """Forget round ``server_round``'s rows of ``phase`` (and the aggregate of that phase)."""
        if not self.jsonl.exists():
            return
        agg_site = "site-evaluation" if phase == "evaluate" else None
        keep = [r for r in self.rows() if not (r["round"] == server_round and (
            r["phase"] == phase or (r["phase"] == "aggregate" and r["site"] == agg_site)))]
        self.jsonl.write_text("".join(json.dumps(r) + "\n" for r in keep), encoding="utf-8")

    def write_csv(self) -> Path:
        rows = self.rows()
        columns: list[str] = []
        for row in rows:
            for key in row:
                if key not in columns:
                    columns.append(key)
        with open(self.csv, "w", newline="", encoding="utf-8") as fh:
            writer = csv.DictWriter(fh, fieldnames=columns)
            writer.writeheader()
            for row in rows:
                writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in columns})
        return self.csv


def read_history(path: str | Path) -> list[dict[str, Any]]:
    path = Path(path)
    if not path.exists():
        return []
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def plot_learning_curves(rows: Iterable[dict[str, Any]], out_dir: str | Path,
                         metrics: tuple[str, ...] = ("auroc", "loss")) -> list[Path]:
    """One PNG per site (and per held-out cohort): global-model metric vs round."""
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = list(rows)
    by_site: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for row in rows:
        if row["phase"] in ("evaluate", "heldout", "train"):
            by_site.setdefault((row["phase"], row["site"]), []).append(row)
    sites = sorted({site for (phase, site) in by_site if phase in ("evaluate", "heldout")})
    written = []
    for site in sites:
        fig, axes = plt.subplots(1, len(metrics), figsize=(4.5 * len(metrics), 3.4), squeeze=False)
        for ax, metric in zip(axes[0], metrics):
            for phase, style in (("evaluate", "o-"), ("heldout", "s-")):
                series = sorted(by_site.get((phase, site), []), key=lambda r: r["round"])
                xs = [r["round"] for r in series if r.get(metric) is not None]
                ys = [r[metric] for r in series if r.get(metric) is not None]
                if xs:
                    ax.plot(xs, ys, style, label=f"global model ({'validation' if phase == 'evaluate' else 'held-out'})")
            train = sorted(by_site.get(("train", site), []), key=lambda r: r["round"])
            key = "train-loss" if metric == "loss" else f"val-{metric}"
            xs = [r["round"] for r in train if r.get(key) is not None]
            ys = [r[key] for r in train if r.get(key) is not None]
            if xs:
                ax.plot(xs, ys, "^--", alpha=0.7,
                        label="site training loss" if metric == "loss" else "site model after local training")
            ax.set_xlabel("round")
            ax.set_ylabel(metric)
            ax.grid(alpha=0.3)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=7)
        fig.suptitle(f"{site}: learning curve")
        fig.tight_layout()
        path = out_dir / f"curve_{site.replace('/', '_').replace(':', '_')}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written
