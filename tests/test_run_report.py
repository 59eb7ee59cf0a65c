"""The run report: one self-contained HTML page from a run's metrics.jsonl, audit.jsonl and
comparison.json (written here by the run's own writers). Its elements (title, live banner, headline
with verdicts and p-values, comparison plot, sites table) are checked in the HTML with html.parser
always, and in the DOM of a real headless Chromium, with a screenshot, where /usr/bin/chromium exists."""

from __future__ import annotations

import base64
import json
import re
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest
import torch
from flwr.app import ArrayRecord

from tdamil.federation.audit import AuditLog
from tdamil.federation.checkpoint import CheckpointStore
from tdamil.federation.history import MetricsHistory
from tdamil.federation.run_report import REFRESH_S, write_run_report

CHROMIUM = Path("/usr/bin/chromium")
SHA = "ab" * 32
EXTRACTION = {"encoder": "uni", "weights_sha256": SHA, "target_magnification": 20, "patch_size": 512, "feature_dim": 1024}
SPEC = json.dumps({"in_dim": 1024, "model": {"name": "tdamil", "dim": 64, "depth": 1, "num_heads": 4}, "num_classes": 2})


def _run_folder(root: Path, dp: bool, finished: bool) -> Path:
    """Three of four rounds of two sites and a held-out cohort; site_b fails round 2; site_c is refused."""
    audit, hist = AuditLog(root / "audit.jsonl", session="s1"), MetricsHistory(root)
    audit.run_started(rounds=4, start_round=1, strategy="fedavg", min_sites=2, model_spec=SPEC)
    for rnd in range(4):
        auc = 0.5 + 0.1 * rnd
        hist.add(rnd, "heldout", "held_out", {"auroc": auc, "auroc_ci_low": auc - 0.1, "auroc_ci_high": auc + 0.08,
                                              "balanced_accuracy": 0.5, "f1": 0.4, "loss": 0.7 - 0.1 * rnd, "n": 40})
        for k, site in enumerate(("site_a", "site_b")):
            hist.add(rnd, "evaluate", site, {"auroc": 0.55 + (0.08 - 0.04 * k) * rnd, "loss": 0.69 - 0.05 * rnd, "n": 10})
        if rnd == 0:
            continue
        if rnd == 1:
            versions = {"tdamil-fl": "0.1.0", "flwr": "1.42.0", "torch": "2.6.0", "python": "3.11.7", "device": "cuda",
                        "precision": "bf16"}
            audit.write("site_handshake", site="site_a", node_id=1, versions=versions, extraction=EXTRACTION,
                        accepted=True, problem=None)
            audit.write("site_handshake", site="site_b", node_id=2, versions=versions, extraction=EXTRACTION,
                        accepted=True, problem=None)
            audit.write("site_handshake", site="site_c", node_id=3, versions={**versions, "flwr": "1.20.0"},
                        extraction={**EXTRACTION, "patch_size": 256}, accepted=False,
                        problem="site site_c's features record patch_size 256, the run's contract requires 512")
        for site in ("site_a", "site_b"):
            if site == "site_b" and rnd == 2:
                audit.failure(rnd, "train", "no reply within federation.round_timeout_s=600 s", site=site)
            else:
                audit.reply(rnd, "train", site, 7, 1234, {"train-loss": 0.5})
        if dp:
            hist.add(rnd, "aggregate", "federation", {"dp-epsilon": 0.8 * rnd, "round-seconds": 3.0})
        audit.write("round_finished", round=rnd, ok=True)
    if finished:
        audit.write("run_finished", last_round=3, failed_rounds=[])
    return root


def _comparison(root: Path) -> None:
    """Three sites and a held-out cohort; federated beats local-only on site_a and site_b (Holm p 0.01,
    0.03) and cannot be told apart from centralised anywhere (Holm p >= 0.41)."""
    rows, pairs = [], []
    for target, local in (("site_a", 0.70), ("site_b", 0.72), ("site_c", 0.80), ("held-out:held_out", None)):
        row = {"evaluated_on": target, "slides": 40, "patients": 38}
        for m, v in (("federated", 0.81), ("centralised", 0.84), ("local_own", local)):
            row.update({f"{m}_auroc": v, f"{m}_auroc_ci_low": None if v is None else v - 0.1,
                        f"{m}_auroc_ci_high": None if v is None else v + 0.05,
                        f"{m}_balanced_accuracy": None if v is None else v - 0.1})
        rows.append(row)
        pairs.append({"evaluated_on": target, "a": "federated", "b": "centralised", "auroc_diff": -0.03,
                      "auroc_diff_ci_low": -0.08, "auroc_diff_ci_high": 0.02, "auroc_p": 0.2, "auroc_p_holm": 0.41,
                      "auroc_method": "DeLong"})
        if local is not None:
            p = {"site_a": 0.01, "site_b": 0.03, "site_c": 0.62}[target]
            pairs.append({"evaluated_on": target, "a": "federated", "b": "local_own", "auroc_diff": 0.81 - local,
                          "auroc_diff_ci_low": 0.01, "auroc_diff_ci_high": 0.2, "auroc_p": p / 3, "auroc_p_holm": p,
                          "auroc_method": "DeLong"})
    doc = {"budget_epochs": 4, "bootstrap": {"level": 0.95}, "rows": rows, "pairs": pairs,
           "site_mean_auroc": {"federated_auroc": 0.81, "centralised_auroc": 0.84, "local_own_auroc": 0.74}}
    (root / "comparison.json").write_text(json.dumps(doc))


class _Page(HTMLParser):
    """Text, images, external references, the meta refresh and the text of elements by id / class."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.text: list[str] = []
        self.imgs: list[dict[str, str]] = []
        self.refs: list[str] = []
        self.refresh: str | None = None
        self.title = ""
        self.by_id: dict[str, str] = {}
        self.banner_class = ""
        self.tables: list[list[list[str]]] = []
        self._open: list[tuple[str, str | None]] = []  # (tag, id) of elements whose text is collected
        self._cell: list[str] | None = None
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        a = {k: v or "" for k, v in attrs}
        if tag == "img":
            self.imgs.append(a)
        if tag == "meta" and a.get("http-equiv", "").lower() == "refresh":
            self.refresh = a.get("content")
        self.refs += [v for k, v in a.items() if k in ("href", "src") and v and not v.startswith("data:")]
        if a.get("id"):
            self.by_id[a["id"]] = ""
            self._open.append((tag, a["id"]))
            if a["id"] == "status":
                self.banner_class = a.get("class", "")
        if tag == "table":
            self.tables.append([])
        elif tag == "tr" and self.tables:
            self.tables[-1].append([])
        elif tag in ("td", "th"):
            self._cell = []

    def handle_endtag(self, tag):
        if self._open and self._open[-1][0] == tag:
            self._open.pop()
        if tag in ("td", "th") and self._cell is not None and self.tables and self.tables[-1]:
            self.tables[-1][-1].append(" ".join("".join(self._cell).split()))
            self._cell = None

    def handle_data(self, data):
        self.text.append(data)
        if self.lasttag == "title":
            self.title += data
        for _, ident in self._open:
            self.by_id[ident] += data
        if self._cell is not None:
            self._cell.append(data)

    def table_with(self, header: str) -> list[list[str]]:
        return next(t for t in self.tables if t and header in t[0])


def _check_page(page: _Page, live: bool) -> None:
    """The elements a reader looks for, wherever the page came from (file or Chromium's DOM)."""
    assert page.title.startswith("Run: TDA-MIL, FedAvg")  # the folder "run" in words, model, strategy
    head = page.by_id["headline"]
    assert "Federated cannot be told apart from centralised on 3 of 3 sites (p ≥ 0.41)" in head
    assert "beats local-only on 2 of 3 sites (site_a p = 0.010, site_b p = 0.030)" in head
    assert "cannot be told apart from it on 1 of 3 sites (p ≥ 0.62)" in head
    assert "held-out cohort held_out, federated cannot be told apart from centralised (p = 0.410" in head
    banner = page.by_id["status"]
    if live:
        assert banner.startswith("Live: updated after round 3 of 4,") and "UTC" in banner and "live" in page.banner_class
        assert page.refresh == str(REFRESH_S)
    else:
        assert banner.startswith("Finished: 3 of 4 rounds") and page.refresh is None
    plots = [i for i in page.imgs if i.get("alt", "").startswith("comparison plot")]
    assert len(plots) == 1 and plots[0]["src"].startswith("data:image/png;base64,")
    png = base64.b64decode(plots[0]["src"].split(",", 1)[1])
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    sites = page.table_with("handshake")
    assert sites[0][:8] == ["site", "handshake", "tdamil-fl", "flwr", "torch", "python", "device", "precision"]
    assert sites[0][8:] == ["encoder", "weights sha256", "magnification", "patch size (px)", "feature width"]
    a = next(r for r in sites if r[0] == "site_a")
    assert a[1] == "accepted" and a[2:8] == ["0.1.0", "1.42.0", "2.6.0", "3.11.7", "cuda", "bf16"]
    assert a[8:] == ["uni", SHA[:12] + "…", "20", "512", "1024"]
    c = next(r for r in sites if r[0] == "site_c")
    assert c[1].startswith("refused") and "patch_size 256" in c[1] and c[3] == "1.20.0"


def test_report_holds_every_section_and_is_self_contained(tmp_path):
    run = _run_folder(tmp_path / "run", dp=True, finished=False)
    _comparison(run)
    page = _Page(write_run_report(run).read_text(encoding="utf-8"))
    _check_page(page, live=True)
    text = " ".join(page.text)
    assert not page.refs  # nothing outside the file: no links to images, styles or scripts
    assert all(i["src"].startswith("data:image/png;base64,") for i in page.imgs) and len(page.imgs) == 2
    for heading in ("Comparison", "Paired tests on the same slides", "Learning curves", "Held-out metrics", "Sites",
                    "Software and features", "Failures", "Privacy"):
        assert heading in text
    comparison = page.table_with("federated AUROC")
    assert comparison[0][3:6] == ["federated AUROC", "centralised AUROC", "local-only (own site) AUROC"]
    assert comparison[1][3] == "0.810 [0.710, 0.860]"
    held = next(r for r in comparison if r[0] == "held-out:held_out")
    assert held[5] == "n/a" and held[8] == "n/a"  # no local model of a held-out cohort: n/a, never 0
    tests = page.table_with("p (Holm)")
    assert ["site_a", "federated vs local-only (own site)", "+0.110 (+0.010 to +0.200)", "0.003", "0.010", "DeLong",
            "federated better"] in tests
    assert "ε = 2.400" in text  # DP budget after round 3
    failures = page.table_with("reason")
    assert failures[1][1:] == ["2", "train", "site_b", "no reply within federation.round_timeout_s=600 s"]
    participation = page.table_with("rounds replied")
    assert participation[2] == ["site_b", "ok", "2", "3", "1", "no reply within federation.round_timeout_s=600 s"]
    heldout = page.table_with("after round")
    assert heldout[1][:4] == ["held_out", "latest", "3", "0.800 [0.700, 0.880]"]


def test_deployed_run_headlines_heldout_auroc_with_ci_and_status(tmp_path):
    run = _run_folder(tmp_path / "run", dp=False, finished=True)
    page = _Page(write_run_report(run).read_text(encoding="utf-8"))
    assert page.by_id["headline"] == ("Held-out AUROC on held_out: 0.800 (95 % CI 0.700 to 0.880), 40 slides, global "
                                      "model after round 3. Run finished.")
    assert page.by_id["status"].startswith("Finished: 3 of 4 rounds") and "finished" in page.banner_class
    text = " ".join(page.text)
    assert "not enabled" in text and "No comparison" in text and page.refresh is None


def test_failed_run_says_why_and_shows_the_feature_contract(tmp_path):
    run = _run_folder(tmp_path / "run", dp=False, finished=False)
    AuditLog(run / "audit.jsonl", session="s1").write("run_failed", error="the held-out cohort cannot be read")
    store = CheckpointStore(run / "checkpoints")
    store.set_feature_contract(EXTRACTION)
    store.save(3, ArrayRecord({"w": torch.zeros(2)}), SPEC, metric_value=0.8)
    page = _Page(write_run_report(run).read_text(encoding="utf-8"))
    assert page.by_id["status"].startswith("Failed: the held-out cohort cannot be read (after round 3 of 4")
    assert "failed" in page.banner_class and page.refresh is None
    assert page.by_id["headline"].endswith("Run failed: the held-out cohort cannot be read.")
    contract = next(t for t in page.tables if t and t[0][0] == "encoder")
    assert contract[-1] == ["uni", SHA, "20", "512", "1024"]


def test_resumed_session_is_live_again_and_a_run_name_wins(tmp_path):
    run = _run_folder(tmp_path / "run", dp=False, finished=True)
    AuditLog(run / "audit.jsonl", session="s2").run_started(rounds=6, start_round=4, strategy="fedavg",
                                                            name="MSI, three TCGA cohorts")
    page = _Page(write_run_report(run).read_text(encoding="utf-8"))
    assert page.title.startswith("MSI, three TCGA cohorts")
    assert page.by_id["status"].startswith("Live: updated after round 3 of 6") and page.refresh == str(REFRESH_S)


def test_report_in_headless_chromium(tmp_path):
    """The same elements in the DOM Chromium built; where Chromium is missing, in the file itself."""
    run = _run_folder(tmp_path / "run", dp=True, finished=False)
    _comparison(run)
    report = write_run_report(run)
    if not CHROMIUM.exists():
        _check_page(_Page(report.read_text(encoding="utf-8")), live=True)
        return
    base = [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
            f"--user-data-dir={tmp_path / 'profile'}"]
    dom = subprocess.run(base + ["--dump-dom", report.as_uri()], check=False, capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    _check_page(_Page(dom.stdout), live=True)
    shot = tmp_path / "shot.png"
    subprocess.run(base + [f"--screenshot={shot}", "--window-size=1280,1800", report.as_uri()],
                   capture_output=True, text=True, timeout=120, check=True)
    import cv2

    img = cv2.imread(str(shot))
    assert img is not None and img.shape[:2] == (1800, 1280)
    # the comparison bars were decoded and drawn: the federated blue and the local-only orange are on screen
    blue = (abs(img.astype(int) - (180, 119, 31)) < 40).all(axis=2).sum()  # BGR of #1f77b4
    orange = (abs(img.astype(int) - (14, 127, 255)) < 40).all(axis=2).sum()  # BGR of #ff7f0e
    assert blue > 500 and orange > 500


@pytest.mark.parametrize("broken", ["{not json", ""])
def test_unreadable_comparison_is_named_not_fatal(tmp_path, broken):
    run = _run_folder(tmp_path / "run", dp=False, finished=True)
    (run / "comparison.json").write_text(broken)
    text = write_run_report(run).read_text(encoding="utf-8")
    assert re.search(r"comparison\.json: unreadable", text) and "Held-out AUROC on held_out" in text
