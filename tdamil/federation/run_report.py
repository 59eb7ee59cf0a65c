"""One self-contained HTML page per federated run (``report.html`` in the run's output folder).

Written from the files the run already keeps, so it can be regenerated at any time (the coordinator
does so after every round; the simulation once more after its comparison): ``metrics.jsonl``
(learning curves, held-out metrics, DP epsilon), ``audit.jsonl`` (per-site status and failures)
and, for simulations, ``comparison.json`` (federated vs centralised vs local-only, with 95 % CIs).
Plots are embedded as base64 PNGs and the style is inline: the page opens from a USB stick or an
e-mail attachment, with no network and no other file.
"""

from __future__ import annotations

import base64
import html
import io
import json
import logging
import math
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterable, Optional

from tdamil.atomic import atomic_path

from .history import read_history

logger = logging.getLogger(__name__)

__all__ = ["write_run_report", "render_run_report"]

_CSS = """body{font-family:system-ui,Segoe UI,Helvetica,Arial,sans-serif;margin:24px;color:#222;max-width:1200px}
h1{font-size:22px}h2{font-size:18px;margin-top:28px;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:8px 0;font-size:13px}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}
th{background:#f3f3f3}td.l,th.l{text-align:left}.bad{color:#b00020;font-weight:600}.ok{color:#176f2c}
.muted{color:#777}img{max-width:100%;border:1px solid #eee}"""
_METRICS = ("auroc", "balanced_accuracy", "f1", "loss")
_MODELS = ("federated", "centralised", "local_own")


def _e(value: Any) -> str:
    return html.escape(str(value))


def _fmt(value: Any) -> str:
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if isinstance(value, float):
        return "–" if not math.isfinite(float(value)) else f"{float(value):.3f}"
    return "–" if value is None else _e(value)


class _Html(str):
    """Text already escaped (a cell with markup)."""


def _table(header: list[str], rows: Iterable[list[Any]], left: int = 1) -> str:
    head = "".join(f'<th class="{"l" if i < left else ""}">{_e(h)}</th>' for i, h in enumerate(header))
    body = "".join("<tr>" + "".join(f'<td class="{"l" if i < left else ""}">{c if isinstance(c, _Html) else _fmt(c)}</td>'
                                     for i, c in enumerate(r)) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Lines of a JSONL file; a line cut by a crash is skipped, not fatal."""
    if not path.exists():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def _png(fig: Any) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return f'<img alt="{_e(fig.axes[0].get_title())}" src="data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()}">'


def _curves(rows: list[dict[str, Any]]) -> str:
    """Global-model metrics vs round: each site's validation split and each held-out cohort."""
    from matplotlib.figure import Figure  # no pyplot: no global state in the coordinator

    series: dict[str, dict[str, list[tuple[int, float]]]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        if r.get("phase") in ("evaluate", "heldout"):
            label = f"{r['site']} ({'held-out' if r['phase'] == 'heldout' else 'site validation'})"
            for m in ("auroc", "loss"):
                if isinstance(r.get(m), (int, float)) and math.isfinite(r[m]):
                    series[m][label].append((int(r["round"]), float(r[m])))
        if r.get("phase") == "aggregate" and isinstance(r.get("dp-epsilon"), (int, float)):
            series["DP epsilon"]["federation"].append((int(r["round"]), float(r["dp-epsilon"])))
    if not series:
        return '<p class="muted">No evaluation yet.</p>'
    fig = Figure(figsize=(4.2 * len(series), 3.4))
    for i, (metric, lines) in enumerate(sorted(series.items())):
        ax = fig.add_subplot(1, len(series), i + 1)
        for label, pts in sorted(lines.items()):
            pts.sort()
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=3, label=label)
        ax.set_title(f"global model: {metric}" if metric != "DP epsilon" else "DP epsilon spent")
        ax.set_xlabel("round")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    return _png(fig)


def _comparison(out: Path) -> str:
    path = out / "comparison.json"
    if not path.exists():
        return '<p class="muted">No comparison (written by tdamil-simulate with baselines, after the last round).</p>'
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        return f'<p class="bad">{_e(path)}: unreadable ({_e(exc)})</p>'
    header = ["evaluated on", "slides"] + [f"{m} {k}" for k in ("auroc", "balanced_accuracy") for m in _MODELS]
    body = []
    for row in doc.get("rows", []):
        cells: list[Any] = [row.get("evaluated_on"), row.get("slides")]
        for k in ("auroc", "balanced_accuracy"):
            for m in _MODELS:
                v, lo, hi = row.get(f"{m}_{k}"), row.get(f"{m}_{k}_ci_low"), row.get(f"{m}_{k}_ci_high")
                cells.append(_Html(f"{_fmt(v)} <span class=muted>[{_fmt(lo)}, {_fmt(hi)}]</span>") if v is not None else None)
        body.append(cells)
    return _table(header, body, left=1) + '<p class="muted">95 % CIs: patient-level stratified bootstrap.</p>'


def _site_status(audit: list[dict[str, Any]]) -> str:
    replies: dict[str, list[int]] = defaultdict(list)
    fails: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for ev in audit:
        if ev.get("event") == "reply" and ev.get("site"):
            replies[ev["site"]].append(int(ev.get("round", 0)))
        elif ev.get("event") == "failure":
            who = ev.get("site") or (f"node {ev['node_id']}" if ev.get("node_id") is not None else "federation")
            fails[who].append(ev)
    sites = sorted(set(replies) | set(fails))
    if not sites:
        return '<p class="muted">No site has replied yet.</p>'
    rows = []
    for s in sites:
        last_fail = fails[s][-1] if fails[s] else None
        state = _Html('<span class="bad">failing</span>') if last_fail and last_fail.get("round", -1) >= max(
            replies[s], default=-1) else _Html('<span class="ok">ok</span>')
        rows.append([s, state, len(set(replies[s])), max(replies[s], default="–"), len(fails[s]),
                     last_fail["reason"] if last_fail else ""])
    return _table(["site", "status", "rounds replied", "last reply", "failures", "last failure"], rows)


def _failures(audit: list[dict[str, Any]]) -> str:
    fails = [ev for ev in audit if ev.get("event") in ("failure", "run_failed")]
    if not fails:
        return '<p class="ok">No failures recorded.</p>'
    return _table(["time", "round", "phase", "site", "reason"],
                  [[ev.get("time", ""), ev.get("round", ""), ev.get("phase", ev.get("event")), ev.get("site") or "",
                    ev.get("reason") or ev.get("error") or ""] for ev in fails[-50:]], left=5)


def _heldout(rows: list[dict[str, Any]]) -> str:
    held = [r for r in rows if r.get("phase") == "heldout"]
    if not held:
        return '<p class="muted">No held-out cohort at the coordinator.</p>'
    last: dict[str, dict[str, Any]] = {}
    best: dict[str, dict[str, Any]] = {}
    for r in held:
        c = r["site"]
        if c not in last or r["round"] >= last[c]["round"]:
            last[c] = r
        if isinstance(r.get("auroc"), (int, float)) and (c not in best or r["auroc"] > (best[c].get("auroc") or -1)):
            best[c] = r
    out = []
    for c in sorted(last):
        for label, r in (("latest", last[c]), ("best AUROC", best.get(c))):
            if r is not None:
                n = r.get("n")
                out.append([c, label, int(r["round"]), *[r.get(m) for m in _METRICS], int(n) if n is not None else None])
    return _table(["cohort", "model", "round", *_METRICS, "slides"], out, left=2)


def _privacy(rows: list[dict[str, Any]]) -> str:
    eps = [(r["round"], r["dp-epsilon"]) for r in rows if r.get("phase") == "aggregate" and r.get("dp-epsilon") is not None]
    if not eps:
        return '<p class="muted">Differential privacy is not enabled for this run.</p>'
    rnd, value = max(eps)
    return f"<p>Privacy budget spent after round {rnd}: <b>ε = {_fmt(value)}</b> (curve above).</p>"


def _header(audit: list[dict[str, Any]]) -> str:
    started = [ev for ev in audit if ev.get("event") == "run_started"]
    total = started[-1].get("rounds") if started else None
    done = max((int(ev["round"]) for ev in audit if ev.get("event") == "round_finished"), default=0)
    ends = [ev for ev in audit if ev.get("event") in ("run_finished", "run_failed", "run_started")]
    state = "running"
    if ends and ends[-1]["event"] == "run_finished":
        state = "finished"
    elif ends and ends[-1]["event"] == "run_failed":
        state = "failed"
    strategy = started[-1].get("strategy", "") if started else ""
    when = audit[-1].get("time", "") if audit else ""
    return (f"<p>Status: <b>{_e(state)}</b>; round {done} of {_e(total if total is not None else '?')}; "
                   f"strategy {_e(strategy)}; last event {_e(when)}.</p>")


def render_run_report(out_dir: str | Path, title: Optional[str] = None) -> str:
    """The HTML text of the report of the run in ``out_dir``."""
    out = Path(out_dir)
    rows = read_history(out / "metrics.jsonl") if (out / "metrics.jsonl").exists() else []
    audit = _read_jsonl(out / "audit.jsonl")
    header = _header(audit)
    name = title or out.name
    parts = [f"<!DOCTYPE html><html lang=en><head><meta charset=utf-8><title>{_e(name)}: run report</title>"
             f"<style>{_CSS}</style></head><body><h1>{_e(name)}: federated run report</h1>", header,
             "<h2>Comparison</h2>", _comparison(out), "<h2>Learning curves</h2>", _curves(rows),
             "<h2>Held-out metrics</h2>", _heldout(rows), "<h2>Sites</h2>", _site_status(audit),
             "<h2>Failures</h2>", _failures(audit), "<h2>Privacy</h2>", _privacy(rows),
             f'<p class="muted">Written from {_e(out)}: metrics.jsonl, audit.jsonl, comparison.json.</p></body></html>']
    return "\n".join(parts)


def write_run_report(out_dir: str | Path, title: Optional[str] = None) -> Path:
    """Write ``<out_dir>/report.html`` atomically; returns its path."""
    path = Path(out_dir) / "report.html"
    text = render_run_report(out_dir, title)
    with atomic_path(path, suffix=".tmp.html") as tmp:
        tmp.write_text(text, encoding="utf-8")
    return path
