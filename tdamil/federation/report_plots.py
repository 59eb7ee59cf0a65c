"""The run report's pictures: learning curves and the comparison bars, as embedded PNG ``<img>`` tags.

Drawn with matplotlib's object API (no pyplot: the coordinator draws from a background thread, and
pyplot's global figure registry is not thread-safe). A value that does not exist (no local model of
a held-out cohort, a one-class target) gets no bar, only "n/a": a bar of 0 would read as a result.
"""

from __future__ import annotations

import base64
import html
import io
import math
from collections import defaultdict
from typing import Any

__all__ = ["MODEL_LABELS", "comparison_img", "finite", "learning_curves_img"]

#: comparison.json's model keys -> the words the page uses for them
MODEL_LABELS = {"federated": "federated", "centralised": "centralised", "local_own": "local-only (own site)"}
_COLOURS = {"federated": "#1f77b4", "centralised": "#7f7f7f", "local_own": "#ff7f0e"}


def finite(value: Any) -> float | None:
    """``value`` as a float when it is a finite number, else None (missing, NaN, text)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def _img(fig: Any, alt: str) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    data = base64.b64encode(buf.getvalue()).decode()
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def learning_curves_img(rows: list[dict[str, Any]]) -> str | None:
    """Global-model AUROC and loss vs round on each site's validation split and each held-out
    cohort (and DP epsilon spent, where recorded); None before the first evaluation."""
    from matplotlib.figure import Figure

    series: dict[str, dict[str, list[tuple[int, float]]]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        if r.get("phase") in ("evaluate", "heldout"):
            label = f"{r['site']} ({'held-out cohort' if r['phase'] == 'heldout' else 'site validation'})"
            for m in ("auroc", "loss"):
                if finite(r.get(m)) is not None:
                    series[m][label].append((int(r["round"]), float(r[m])))
        if r.get("phase") == "aggregate" and finite(r.get("dp-epsilon")) is not None:
            series["dp"]["federation"].append((int(r["round"]), float(r["dp-epsilon"])))
    if not series:
        return None
    titles = {"auroc": "Global model AUROC", "loss": "Global model loss", "dp": "Privacy budget spent (ε)"}
    order = [k for k in ("auroc", "loss", "dp") if k in series]
    fig = Figure(figsize=(4.2 * len(order), 3.4))
    for i, key in enumerate(order):
        ax = fig.add_subplot(1, len(order), i + 1)
        for label, pts in sorted(series[key].items()):
            pts.sort()
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=3, label=label)
        ax.set_title(titles[key])
        ax.set_xlabel("round (0 = initial model)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    return _img(fig, "learning curves: " + ", ".join(titles[k] for k in order))


def comparison_img(rows: list[dict[str, Any]], level: float = 0.95) -> str | None:
    """One panel per target (site test split or held-out cohort): AUROC of the federated,
    centralised and local-only models with their CIs as error bars; None without rows."""
    from matplotlib.figure import Figure

    if not rows:
        return None
    cols = min(len(rows), 4)
    nrows = math.ceil(len(rows) / cols)
    fig = Figure(figsize=(3.6 * cols, 3.3 * nrows))
    for i, row in enumerate(rows):
        ax = fig.add_subplot(nrows, cols, i + 1)
        for j, model in enumerate(MODEL_LABELS):
            v = finite(row.get(f"{model}_auroc"))
            if v is None:
                ax.text(j, 0.03, "n/a", ha="center", va="bottom", fontsize=9, color="dimgray")
                continue
            ax.bar(j, v, color=_COLOURS[model], width=0.7)
            lo, hi = finite(row.get(f"{model}_auroc_ci_low")), finite(row.get(f"{model}_auroc_ci_high"))
            top = v
            if lo is not None and hi is not None:
                ax.errorbar(j, v, yerr=[[max(v - lo, 0.0)], [max(hi - v, 0.0)]], fmt="none", ecolor="black",
                            capsize=4)
                top = hi
            ax.text(j, top + 0.01, f"{v:.3f}", ha="center", va="bottom", fontsize=8)
        ax.set_xticks(range(len(MODEL_LABELS)), ["federated", "centralised", "local-only"], fontsize=8)
        ax.set_xlim(-0.6, len(MODEL_LABELS) - 0.4)
        ax.set_ylim(0.0, 1.12)
        ax.axhline(0.5, color="lightgray", lw=0.8, ls="--", zorder=0)
        ax.set_ylabel(f"AUROC ({level:.0%} CI)" if i % cols == 0 else "")
        slides = row.get("slides")
        ax.set_title(f"{row.get('evaluated_on')}" + (f" ({slides} slides)" if slides is not None else ""), fontsize=10)
    fig.suptitle("AUROC on the same slides, same training budget (dashed: chance)", fontsize=10)
    fig.tight_layout()
    return _img(fig, "comparison plot: AUROC of federated, centralised and local-only models with "
                     f"{level:.0%} CIs per site")
