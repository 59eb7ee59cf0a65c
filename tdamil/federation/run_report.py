"""One self-contained HTML page per federated run (``report.html`` in the run's output folder).

Written from the files the run already keeps, so it can be regenerated at any time (the coordinator
does so after every round; the simulation once more after its comparison): ``metrics.jsonl``
(learning curves, held-out metrics, DP epsilon), ``audit.jsonl`` (run status, per-site status,
failures, the sites' software and feature records) and, for simulations, ``comparison.json``
(federated vs centralised vs local-only, with 95 % CIs and Holm-adjusted paired tests; each model's
relevance-map check, a model whose map fails it flagged in plain words under the headline).

The page opens with what a consortium lead asks first: the run's name, whether it is live
(reloading itself), finished or failed, and one headline sentence with the verdicts and their
p-values, or, in a deployment without baselines, the held-out AUROC with its CI. Plots are embedded
as base64 PNGs and the style is inline: the page opens from a USB stick or an e-mail attachment,
with no network and no other file.
"""

from __future__ import annotations

import html
import json
import logging
import math
from collections import defaultdict
from collections.abc import Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from tdamil.atomic import atomic_path
from tdamil.stats import Difference, short_verdict

from .history import read_history
from .report_plots import MODEL_LABELS, comparison_img, finite, learning_curves_img

logger = logging.getLogger(__name__)

__all__ = ["REFRESH_S", "render_run_report", "write_run_report"]

#: seconds between reloads of a live page
REFRESH_S = 30
_CSS = """body{font-family:system-ui,Segoe UI,Helvetica,Arial,sans-serif;margin:24px;color:#222;max-width:1200px}
h1{font-size:22px;margin-bottom:4px}h2{font-size:18px;margin-top:28px;border-bottom:1px solid #ddd}h3{font-size:15px}
table{border-collapse:collapse;margin:8px 0;font-size:13px}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right;white-space:nowrap}
th{background:#f3f3f3}td.l,th.l{text-align:left}.bad{color:#b00020;font-weight:600}.ok{color:#176f2c}
.muted{color:#777}img{max-width:100%;border:1px solid #eee}
.banner{padding:8px 12px;border-radius:4px;font-weight:600;margin:8px 0}.banner.live{background:#e8f1fd;color:#0b4f9c}
.banner.finished{background:#e7f5ea;color:#176f2c}.banner.failed{background:#fde8ec;color:#b00020}
.headline{font-size:17px;line-height:1.45;margin:12px 0}"""
_MODEL_NAMES = {"tdamil": "TDA-MIL", "abmil": "ABMIL", "gated_abmil": "gated ABMIL", "transmil": "TransMIL",
                "transformer_mil": "transformer MIL", "mean_pool": "mean pooling"}
_STRATEGY_NAMES = {"fedavg": "FedAvg", "fedprox": "FedProx", "fedadam": "FedAdam", "fedyogi": "FedYogi",
                   "fedmedian": "FedMedian", "fedtrimmedavg": "FedTrimmedAvg"}
_VERSION_KEYS = ("tdamil-fl", "flwr", "torch", "python", "device", "precision")
_EXTRACTION_KEYS = (("encoder", "encoder"), ("weights_sha256", "weights sha256"),
                    ("target_magnification", "magnification"), ("patch_size", "patch size (px)"),
                    ("feature_dim", "feature width"))


class _Html(str):
    """Text already escaped (a cell with markup)."""


def _e(value: Any) -> str:
    return html.escape(str(value))


def _fmt(value: Any, missing: str = "n/a") -> str:
    if isinstance(value, _Html):
        return value
    if isinstance(value, float):
        return f"{value:.3f}" if math.isfinite(value) else missing
    return missing if value is None else _e(value)


def _p(value: float | None) -> str:
    return "n/a" if value is None else ("< 0.001" if value < 0.001 else f"{value:.3f}")


def _ci(row: dict[str, Any], key: str) -> Any:
    """``0.810 [0.710, 0.860]`` (a cell), the estimate alone without an interval, None if missing."""
    v, lo, hi = finite(row.get(key)), finite(row.get(f"{key}_ci_low")), finite(row.get(f"{key}_ci_high"))
    if v is None:
        return None
    if lo is None or hi is None:
        return v
    return _Html(f"{v:.3f} <span class=muted>[{lo:.3f}, {hi:.3f}]</span>")


def _plain(value: Any) -> Any:
    """A recorded setting as written: 20.0 -> 20 (not a metric to three decimals)."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


def _table(header: list[str], rows: Iterable[list[Any]], left: int = 1, cls: str = "") -> str:
    head = "".join(f'<th class="{"l" if i < left else ""}">{_e(h)}</th>' for i, h in enumerate(header))
    body = "".join("<tr>" + "".join(f'<td class="{"l" if i < left else ""}">{_fmt(c)}</td>' for i, c in enumerate(r))
                   + "</tr>" for r in rows)
    return f'<table class="{cls}"><tr>{head}</tr>{body}</table>'


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Lines of a JSONL file; a line cut by a crash is skipped, not fatal."""
    if not path.exists():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict):
            out.append(rec)
    return out


def _when(stamp: Any) -> str:
    """An audit time (ISO 8601, UTC) as ``2026-12-06 18:58:29 UTC``."""
    try:
        return datetime.fromisoformat(str(stamp)).astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    except ValueError:
        return str(stamp or "")


# --- the run: name, status, headline ---------------------------------------------------------------

def _started(audit: list[dict[str, Any]]) -> dict[str, Any]:
    return next((ev for ev in reversed(audit) if ev.get("event") == "run_started"), {})


def _run_name(out: Path, started: dict[str, Any]) -> str:
    """The run's ``name`` where the audit records one, else the folder name in words plus the model
    and the strategy (``Sim digits: TDA-MIL, FedAvg``)."""
    if isinstance(started.get("name"), str) and started["name"].strip():
        return started["name"].strip()
    words = out.resolve().name.replace("_", " ").replace("-", " ").strip() or "federated run"
    what = []
    try:
        model = json.loads(started.get("model_spec") or "{}").get("model", {}).get("name")
    except (TypeError, ValueError, AttributeError):
        model = None
    if model:
        what.append(_MODEL_NAMES.get(model, str(model)))
    if started.get("strategy"):
        what.append(_STRATEGY_NAMES.get(started["strategy"], str(started["strategy"])))
    return words[0].upper() + words[1:] + (f": {', '.join(what)}" if what else "")


def _status(audit: list[dict[str, Any]]) -> dict[str, Any]:
    """``state`` live / finished / failed (the latest coordinator session's end, if any), rounds done
    and planned, the failure reason, the time of the last event."""
    started = _started(audit)
    ends = [ev for ev in audit if ev.get("event") in ("run_started", "run_finished", "run_failed")]
    last = ends[-1] if ends else {}
    state = {"run_finished": "finished", "run_failed": "failed"}.get(last.get("event", ""), "live")
    done = max((int(ev["round"]) for ev in audit if ev.get("event") == "round_finished"), default=0)
    return {"state": state, "done": done, "total": started.get("rounds"), "when": _when(audit[-1].get("time")) if audit else "",
            "reason": str(last.get("error") or "unknown error"), "failed_rounds": last.get("failed_rounds") or []}


def _banner(st: dict[str, Any]) -> str:
    total = st["total"] if st["total"] is not None else "?"
    if st["state"] == "live":
        where = f"after round {st['done']} of {total}" if st["done"] else f"started, no round finished yet ({total} planned)"
        text = f"Live: updated {where}, {st['when']}. This page reloads every {REFRESH_S} s."
    elif st["state"] == "finished":
        fr = st["failed_rounds"]
        text = f"Finished: {st['done']} of {total} rounds, {st['when']}" + (
            f"; rounds {', '.join(map(str, fr))} failed and kept the previous model." if fr else ".")
    else:
        text = f"Failed: {st['reason']} (after round {st['done']} of {total}, {st['when']})."
    return f'<div id="status" class="banner {st["state"]}">{_e(text)}</div>'


def _held(target: Any) -> bool:
    return str(target).startswith("held-out:")


def _pair_p(pair: dict[str, Any]) -> float | None:
    """The p-value a verdict uses: Holm-adjusted over the report's comparisons."""
    return finite(pair.get("auroc_p_holm", pair.get("auroc_p")))


def _verdict_groups(pairs: list[dict[str, Any]], a: str, b: str, targets: list[str], alpha: float) -> dict[str, list]:
    groups: dict[str, list[tuple[str, float | None]]] = {"a": [], "same": [], "b": [], "na": []}
    for p in pairs:
        if p.get("a") != a or p.get("b") != b or p.get("evaluated_on") not in targets:
            continue
        pv, d = _pair_p(p), finite(p.get("auroc_diff"))
        key = "na" if pv is None or d is None else "same" if pv >= alpha else ("a" if d > 0 else "b")
        groups[key].append((str(p["evaluated_on"]), pv))
    return groups


def _listed(items: list[tuple[str, float | None]], named: bool) -> str:
    return ", ".join((f"{t} " if named else "") + f"p {'< 0.001' if (pv or 0) < 0.001 else f'= {pv:.3f}'}"
                     for t, pv in items)


def _pair_sentence(b: str, g: dict[str, list], n: int, unit: str) -> str:
    """``beats local-only on 2 of 3 sites (p = 0.010, 0.030) and cannot be told apart from it on 1 (p >= 0.41)``."""
    if n == 1:  # one target: its verdict and p-value, nothing to count
        (key, items), = [(k, v) for k, v in g.items() if v]
        pv = items[0][1]
        return {"a": f"beats {b}", "same": f"cannot be told apart from {b}", "b": f"is worse than {b}",
                "na": f"cannot be compared with {b} (AUROC undefined)"}[key] + (f" (p {_listed(items, False)[2:]})"
                                                                             if pv is not None else "")
    parts = []
    if g["a"]:
        parts.append(f"beats {b} on {len(g['a'])} of {n} {unit} ({_listed(g['a'], len(g['a']) < n)})")
    if g["same"]:
        low = min(pv for _, pv in g["same"] if pv is not None)
        parts.append(f"cannot be told apart from {b if not parts else 'it'} on {len(g['same'])} of {n} {unit} "
                     f"(p ≥ {math.floor(low * 100) / 100:.2f})")
    if g["b"]:
        parts.append(f"is worse than {b if not parts else 'it'} on {len(g['b'])} of {n} {unit} "
                     f"({_listed(g['b'], True)})")
    if g["na"]:
        parts.append(f"cannot be compared on {len(g['na'])} (AUROC undefined: one class)")
    return " and ".join(parts)


def _comparison_headline(doc: dict[str, Any]) -> str:
    rows, pairs = doc.get("rows") or [], doc.get("pairs") or []
    alpha = 1.0 - float((doc.get("bootstrap") or {}).get("level", 0.95))
    sites = [str(r["evaluated_on"]) for r in rows if not _held(r.get("evaluated_on"))]
    cohorts = [str(r["evaluated_on"]) for r in rows if _held(r.get("evaluated_on"))]
    said = []
    for b in ("centralised", "local_own"):
        g = _verdict_groups(pairs, "federated", b, sites, alpha)
        if any(g.values()):
            said.append(_pair_sentence(MODEL_LABELS[b].replace(" (own site)", ""), g, sum(map(len, g.values())),
                                       "sites"))
    text = ("Federated " + "; it ".join(said) + ".") if said else ""
    for c in cohorts:
        g = _verdict_groups(pairs, "federated", "centralised", [c], alpha)
        if any(g.values()):
            row = next(r for r in rows if r.get("evaluated_on") == c)
            fed, cen = finite(row.get("federated_auroc")), finite(row.get("centralised_auroc"))
            said_c = _pair_sentence("centralised", g, 1, "cohort")
            if fed is not None and cen is not None:
                said_c = said_c[:-1] + f"; AUROC {fed:.3f} vs {cen:.3f})" if said_c.endswith(")") else said_c
            text += f" On the held-out cohort {c.split(':', 1)[1]}, federated {said_c}."
    return text.strip()


def _site_means(doc: dict[str, Any]) -> str:
    means = doc.get("site_mean_auroc") or {}
    got = [(MODEL_LABELS[m], finite(means.get(f"{m}_auroc"))) for m in MODEL_LABELS]
    if not any(v is not None for _, v in got):
        return ""
    return ('<p class="muted">Mean AUROC over the sites\' test splits: ' + ", ".join(f"{k} {v:.3f}" for k, v in got if v is not None)
            + ". p-values: paired tests on the same slides, Holm-adjusted; \"cannot be told apart\" is no evidence "
            "of a difference, not evidence of equality.</p>")


def _heldout_headline(rows: list[dict[str, Any]], st: dict[str, Any]) -> str:
    """Deployment: the latest held-out AUROC with its CI per cohort (else the sites' validation mean)."""
    latest: dict[str, dict[str, Any]] = {}
    for r in rows:
        if r.get("phase") == "heldout" and (r["site"] not in latest or r["round"] >= latest[r["site"]]["round"]):
            latest[r["site"]] = r
    parts = []
    for cohort, r in sorted(latest.items()):
        v, lo, hi = finite(r.get("auroc")), finite(r.get("auroc_ci_low")), finite(r.get("auroc_ci_high"))
        ci = f" (95 % CI {lo:.3f} to {hi:.3f})" if lo is not None and hi is not None else ""
        n = f", {int(r['n'])} slides" if finite(r.get("n")) is not None else ""
        parts.append(f"held-out AUROC on {cohort}: {_fmt(v)}{ci}{n}, global model after round {r['round']}")
    if not parts:
        site = [r for r in rows if r.get("phase") == "aggregate" and r.get("site") == "site-evaluation"
                and finite(r.get("auroc")) is not None]
        if site:
            r = max(site, key=lambda x: x["round"])
            parts.append(f"no held-out cohort; sites' validation AUROC (weighted mean) {r['auroc']:.3f} after round {r['round']}")
    state = {"live": f"live, round {st['done']} of {st['total'] or '?'} done", "finished": "finished",
             "failed": f"failed: {st['reason']}"}[st["state"]]
    head = "; ".join(parts) if parts else "no evaluation yet"
    return f"{head[0].upper()}{head[1:]}. Run {state}."


# --- sections --------------------------------------------------------------------------------------

def _read_comparison(out: Path) -> tuple[dict[str, Any] | None, str | None]:
    path = out / "comparison.json"
    if not path.exists():
        return None, None
    try:
        return json.loads(path.read_text(encoding="utf-8")), None
    except (OSError, json.JSONDecodeError) as exc:
        return None, f'<p class="bad">{_e(path.name)}: unreadable ({_e(exc)})</p>'


def _comparison(doc: dict[str, Any] | None, problem: str | None) -> str:
    if problem:
        return problem
    if doc is None:
        return ('<p class="muted">No comparison with centralised and local-only models: tdamil-simulate writes it '
                'after the last round when baselines are on; a deployed federation has none.</p>')
    level = float((doc.get("bootstrap") or {}).get("level", 0.95))
    rows = doc.get("rows") or []
    plot = comparison_img(rows, level)
    header = ["evaluated on", "slides", "patients"] + [f"{MODEL_LABELS[m]} {k}" for k in ("AUROC", "balanced accuracy")
                                                      for m in MODEL_LABELS]
    body = [[r.get("evaluated_on"), r.get("slides"), r.get("patients")]
            + [_ci(r, f"{m}_{k}") for k in ("auroc", "balanced_accuracy") for m in MODEL_LABELS] for r in rows]
    pairs = doc.get("pairs") or []
    tests = []
    for p in pairs:
        d = Difference(*(finite(p.get(f"auroc_{k}")) or math.nan for k in ("diff", "diff_ci_low", "diff_ci_high")),
                       _pair_p(p) or math.nan, str(p.get("auroc_method", "")))
        diff = (f"{d.estimate:+.3f} ({d.low:+.3f} to {d.high:+.3f})" if finite(d.estimate) is not None else None)
        a, b = MODEL_LABELS.get(p.get("a"), p.get("a")), MODEL_LABELS.get(p.get("b"), p.get("b"))
        tests.append([p.get("evaluated_on"), f"{a} vs {b}", diff, _p(finite(p.get("auroc_p"))), _p(_pair_p(p)),
                      p.get("auroc_method"), short_verdict(a, b, d, level=level)])
    budget = doc.get("budget_epochs")
    return ((plot or "") + _table(header, body, left=1)
            + f'<p class="muted">Estimate [{level:.0%} CI]: patient-level stratified bootstrap. Same training budget'
            + (f" ({budget} epochs each)" if budget is not None else "") + "; n/a: the value does not exist "
            "(no local model of a held-out cohort, one class).</p>"
            + ("<h3>Paired tests on the same slides</h3>" + _table(
                ["evaluated on", "models", "AUROC difference (95 % CI)", "p", "p (Holm)", "test", "verdict"], tests, left=2)
               + f'<p class="muted">Verdicts use the Holm-adjusted p over the {len(pairs)} AUROC comparisons. "Cannot '
               'be told apart" means no evidence of a difference at this sample size, not evidence of equality.</p>'
               if pairs else ""))


def _map_checks(doc: dict[str, Any] | None) -> list[tuple[str, dict[str, Any]]]:
    """(model in words, its deletion check) for every model comparison.json checked (``relevance_maps``)."""
    maps = (doc or {}).get("relevance_maps") or {}
    out = [(f"the {m} model", maps[m]) for m in ("federated", "centralised") if isinstance(maps.get(m), dict)]
    return out + [(f"the local-only model of {site}", rec) for site, rec in (maps.get("local_own") or {}).items()
                  if isinstance(rec, dict)]


def _map_flags(doc: dict[str, Any] | None) -> str:
    """One plain sentence per model whose relevance map failed the deletion check (next to the headline)."""
    said = []
    for who, rec in _map_checks(doc):
        if rec.get("verdict") == "not faithful":
            gap, p = finite(rec.get("deletion_gap")), finite(rec.get("sign_test_p"))
            said.append(f"The relevance map of {who} is not faithful: deleting its top-scored patches changes the "
                        f"predicted probability about as much as deleting as many random ones (deletion gap "
                        f"{_fmt(gap)}, {rec.get('checked')} {rec.get('bags', 'validation')} slides, sign test p "
                        f"{'= n/a' if p is None else ('< 0.001' if p < 0.001 else f'= {p:.3f}')}); do not read its "
                        "heatmaps as evidence.")
    return "".join(f'<p class="bad map-flag">{_e(t)}</p>' for t in said)


def _maps(doc: dict[str, Any] | None) -> str:
    checks = _map_checks(doc)
    if not checks:
        return ""
    verdict = {"faithful": _Html('<span class="ok">faithful</span>'), "not faithful": _Html('<span class="bad">NOT faithful</span>')}
    rows = [[who[4:], verdict.get(rec.get("verdict"), rec.get("verdict") or "n/a"), finite(rec.get("deletion_gap")),
             rec.get("checked"), rec.get("bags"), _p(finite(rec.get("sign_test_p")))] for who, rec in checks]
    return ("<h3>Relevance maps: the deletion check</h3>" + _table(
        ["model", "map", "deletion gap", "slides checked", "bags", "sign test p"], rows, left=2)
        + '<p class="muted">Label-free: each model\'s top-scored patches are deleted and, separately, as many random '
        "ones; the gap is how much more the predicted positive probability drops for the former (a faithful map: 0.2 "
        "or more, with a sign test over slides). n/a: no per-patch scores (TransMIL, transformer MIL) or no slide "
        "predicted positive.</p>")


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
        if finite(r.get("auroc")) is not None and (c not in best or r["auroc"] > best[c]["auroc"]):
            best[c] = r
    out = []
    for c in sorted(last):
        for label, r in (("latest", last[c]), ("best AUROC", best.get(c))):
            if r is not None:
                n = finite(r.get("n"))
                out.append([c, label, int(r["round"]), _ci(r, "auroc"), _ci(r, "balanced_accuracy"), _ci(r, "f1"),
                            finite(r.get("loss")), int(n) if n is not None else None])
    return _table(["cohort", "global model", "after round", "AUROC (95 % CI)", "balanced accuracy", "F1", "loss",
                   "slides"], out, left=2)


def _participation(audit: list[dict[str, Any]]) -> str:
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
        failing = last_fail is not None and int(last_fail.get("round", -1)) >= max(replies[s], default=-1)
        state = _Html('<span class="bad">failing</span>' if failing else '<span class="ok">ok</span>')
        rows.append([s, state, len(set(replies[s])), max(replies[s], default=None), len(fails[s]),
                     last_fail.get("reason") if last_fail else ""])
    return _table(["site", "status", "rounds replied", "last reply (round)", "failures", "last failure"], rows, left=1)


def _handshakes(audit: list[dict[str, Any]]) -> str:
    latest = {ev["site"]: ev for ev in audit if ev.get("event") == "site_handshake" and ev.get("site")}
    if not latest:
        return '<p class="muted">No site has reported its software and features yet (written at its first reply).</p>'
    rows = []
    for site, ev in sorted(latest.items()):
        versions = ev.get("versions") if isinstance(ev.get("versions"), dict) else {}
        extraction = ev.get("extraction") if isinstance(ev.get("extraction"), dict) else None
        verdict = _Html('<span class="ok">accepted</span>' if ev.get("accepted") else
                        f'<span class="bad">refused</span>: {_e(ev.get("problem") or "no reason recorded")}')
        cells: list[Any] = [site, verdict] + [versions.get(k) for k in _VERSION_KEYS]
        for key, _ in _EXTRACTION_KEYS:
            value = extraction.get(key) if extraction else None
            if key == "weights_sha256" and isinstance(value, str) and len(value) > 12:
                value = _Html(f'<span title="{_e(value)}">{_e(value[:12])}…</span>')
            cells.append(_plain(value) if extraction else ("not recorded" if key == "encoder" else None))
        rows.append(cells)
    return _table(["site", "handshake"] + list(_VERSION_KEYS) + [label for _, label in _EXTRACTION_KEYS], rows, left=2) + (
        '<p class="muted">Software each site runs and how its features were extracted, as the site reported them at '
        'its first reply of the run. "not recorded": features without an extraction record (the digits '
        'simulation, or files not written by tdamil-extract).</p>')


def _contract(out: Path) -> str:
    """The run's feature contract as the last checkpoint stores it (a small read: tensors of one model)."""
    path = out / "checkpoints" / "last.pt"
    if not path.exists():
        return ""
    try:
        from tdamil.checkpoint import load_checkpoint

        contract = load_checkpoint(path).get("feature_contract")
    except Exception as exc:  # noqa: BLE001 - a report never fails a run
        logger.debug("No feature contract from %s: %s", path, exc)
        return ""
    if not isinstance(contract, dict) or not contract:
        return '<p class="muted">The last checkpoint records no feature contract.</p>'
    cells = [_plain(contract.get(k)) for k, _ in _EXTRACTION_KEYS]
    return "<h3>The run's feature contract</h3>" + _table([label for _, label in _EXTRACTION_KEYS], [cells], left=0)


def _failures(audit: list[dict[str, Any]]) -> str:
    fails = [ev for ev in audit if ev.get("event") in ("failure", "run_failed")]
    if not fails:
        return '<p class="ok">No failures recorded.</p>'
    shown = fails[-50:]
    more = f'<p class="muted">The latest 50 of {len(fails)}; all in audit.jsonl.</p>' if len(fails) > 50 else ""
    return _table(["time", "round", "phase", "site", "reason"],
                  [[_when(ev.get("time")), ev.get("round"), ev.get("phase", "run failed"), ev.get("site") or "",
                    ev.get("reason") or ev.get("error") or ""] for ev in shown], left=5) + more


def _privacy(rows: list[dict[str, Any]]) -> str:
    eps = [(r["round"], r["dp-epsilon"]) for r in rows if r.get("phase") == "aggregate" and finite(r.get("dp-epsilon")) is not None]
    if not eps:
        return '<p class="muted">Differential privacy is not enabled for this run.</p>'
    rnd, value = max(eps)
    return f"<p>Privacy budget spent after round {rnd}: <b>ε = {value:.3f}</b> (curve above).</p>"


def render_run_report(out_dir: str | Path, title: str | None = None) -> str:
    """The HTML text of the report of the run in ``out_dir``."""
    out = Path(out_dir)
    rows = read_history(out / "metrics.jsonl") if (out / "metrics.jsonl").exists() else []
    audit = _read_jsonl(out / "audit.jsonl")
    st = _status(audit)
    name = title or _run_name(out, _started(audit))
    doc, problem = _read_comparison(out)
    headline = (_comparison_headline(doc) if doc else "") or _heldout_headline(rows, st)
    refresh = f'<meta http-equiv="refresh" content="{REFRESH_S}">' if st["state"] == "live" else ""
    curves = learning_curves_img(rows) or '<p class="muted">No evaluation yet.</p>'
    parts = [(f"<!DOCTYPE html><html lang=en><head><meta charset=utf-8>{refresh}<title>{_e(name)}: run report</title>"
              f"<style>{_CSS}</style></head><body><h1>{_e(name)}</h1>"),
             '<p class="muted">Federated run report</p>', _banner(st), f'<p id="headline" class="headline">{_e(headline)}</p>', _map_flags(doc), _site_means(doc) if doc else "",
             "<h2>Comparison</h2>", _comparison(doc, problem), _maps(doc), "<h2>Learning curves</h2>", curves,
             "<h2>Held-out metrics</h2>", _heldout(rows), '<h2 id="sites">Sites</h2>', _participation(audit),
             "<h3>Software and features</h3>", _handshakes(audit), _contract(out),
             "<h2>Failures</h2>", _failures(audit), "<h2>Privacy</h2>", _privacy(rows),
             f'<p class="muted">Written from {_e(out)}: metrics.jsonl, audit.jsonl, comparison.json.</p></body></html>']
    return "\n".join(parts)


def write_run_report(out_dir: str | Path, title: str | None = None) -> Path:
    """Write ``<out_dir>/report.html`` atomically; returns its path."""
    path = Path(out_dir) / "report.html"
    text = render_run_report(out_dir, title)
    with atomic_path(path, suffix=".tmp.html") as tmp:
        tmp.write_text(text, encoding="utf-8")
    return path
