"""The run report: one self-contained HTML page from a run's metrics.jsonl, audit.jsonl and
comparison.json (written here by the run's own writers), checked in a real headless Chromium."""

from __future__ import annotations

import base64
import json
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

from tdamil.federation.audit import AuditLog
from tdamil.federation.history import MetricsHistory
from tdamil.federation.run_report import write_run_report


def _run_folder(root: Path, dp: bool, finished: bool) -> Path:
    """Three rounds of two sites and a held-out cohort; site_b fails round 2."""
    audit, hist = AuditLog(root / "audit.jsonl", session="s1"), MetricsHistory(root)
    audit.run_started(rounds=4, start_round=1, strategy="fedavg", min_sites=2)
    for rnd in range(0, 4):
        hist.add(rnd, "heldout", "held_out", {"auroc": 0.5 + 0.1 * rnd, "balanced_accuracy": 0.5, "f1": 0.4,
                                              "loss": 0.7 - 0.1 * rnd, "n": 40})
        for k, site in enumerate(("site_a", "site_b")):
            hist.add(rnd, "evaluate", site, {"auroc": 0.55 + (0.08 - 0.04 * k) * rnd, "loss": 0.69 - 0.05 * rnd, "n": 10})
        if rnd == 0:
            continue
        for site in ("site_a", "site_b"):
            if site == "site_b" and rnd == 2:
                audit.failure(rnd, "train", "no reply within federation.round_timeout_s=600 s", site=site)
            else:
                audit.reply(rnd, "train", site, 7, 1234, {"train-loss": 0.5})
        if dp:
            hist.add(rnd, "aggregate", "federation", {"dp-epsilon": 0.8 * rnd, "round-seconds": 3.0})
        audit.write("round_finished", round=rnd, ok=True)
    if finished:
        audit.write("run_finished", last_round=3)
    return root


def _comparison(root: Path) -> None:
    row = {"evaluated_on": "held_out", "slides": 40, "patients": 38}
    for m, v in (("federated", 0.81), ("centralised", 0.84), ("local_own", 0.70)):
        row.update({f"{m}_auroc": v, f"{m}_auroc_ci_low": v - 0.1, f"{m}_auroc_ci_high": v + 0.05,
                    f"{m}_balanced_accuracy": v - 0.1})
    (root / "comparison.json").write_text(json.dumps({"rows": [row], "pairs": []}))


class _Page(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[str] = []
        self.imgs: list[str] = []
        self.refs: list[str] = []
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        a = dict(attrs)
        if tag == "img":
            self.imgs.append(a.get("src", ""))
        self.refs += [v for k, v in attrs if k in ("href", "src") and v and not v.startswith("data:")]

    def handle_data(self, data):
        self.text.append(data)


def test_report_holds_every_section_and_is_self_contained(tmp_path):
    run = _run_folder(tmp_path / "run", dp=True, finished=False)
    _comparison(run)
    page = _Page()
    page.feed(write_run_report(run).read_text(encoding="utf-8"))
    text = " ".join(page.text)
    assert not page.refs  # nothing outside the file: no links to images, styles or scripts
    assert page.imgs and all(src.startswith("data:image/png;base64,") for src in page.imgs)
    png = base64.b64decode(page.imgs[0].split(",", 1)[1])
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    for heading in ("Comparison", "Learning curves", "Held-out metrics", "Sites", "Failures", "Privacy"):
        assert heading in text
    assert "running" in text and "round 3 of 4" in text
    assert "0.810" in text and "[0.710, 0.860]" in text  # comparison with its CI
    assert "ε = 2.400" in text  # DP budget after round 3
    assert "no reply within federation.round_timeout_s=600 s" in text
    assert re.search(r"site_b\s+ok\s+2\s+3\s+1", text)  # failed round 2, replied again in round 3
    assert "0.800" in text  # held-out AUROC of round 3


def test_report_without_dp_or_comparison_says_so(tmp_path):
    run = _run_folder(tmp_path / "run", dp=False, finished=True)
    text = write_run_report(run).read_text(encoding="utf-8")
    assert "not enabled" in text and "No comparison" in text and "finished" in text


def _chromium() -> str | None:
    return next((p for p in (shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome")) if p), None)


@pytest.mark.skipif(_chromium() is None, reason="Chromium is not installed (apt-get install chromium)")
def test_report_renders_in_headless_chromium(tmp_path):
    run = _run_folder(tmp_path / "run", dp=True, finished=True)
    _comparison(run)
    report = write_run_report(run)
    base = [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
            f"--user-data-dir={tmp_path / 'profile'}"]
    dom = subprocess.run(base + ["--dump-dom", report.as_uri()], capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert dom.stdout.count("<table") >= 4 and "federated run report" in dom.stdout
    shot = tmp_path / "shot.png"
    subprocess.run(base + [f"--screenshot={shot}", "--window-size=1280,2400", report.as_uri()],
                   capture_output=True, text=True, timeout=120, check=True)
    import cv2

    img = cv2.imread(str(shot))
    assert img is not None and img.shape[:2] == (2400, 1280)
    # the learning curves were decoded and drawn: matplotlib's blue and orange lines are on screen
    blue = np.all(np.abs(img.astype(int) - (180, 119, 31)) < 40, axis=2).sum()  # BGR of #1f77b4
    orange = np.all(np.abs(img.astype(int) - (14, 127, 255)) < 40, axis=2).sum()  # BGR of #ff7f0e
    assert blue > 100 and orange > 100
