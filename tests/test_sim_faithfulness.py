"""The deletion check of every compared model in the simulation's comparison and the run report:
fixed toy models (a map on the evidence, one on the wrong patches, one without scores) on tiny
sites; no training, seconds."""

from __future__ import annotations

import csv
import json
import math
from html.parser import HTMLParser

import numpy as np
import torch
from torch import nn

from evidence_bags import evidence_bags

from tdamil.data.bags import InMemoryBagDataset
from tdamil.federation.run_report import render_run_report
from tdamil.federation.task import SiteData
from tdamil.models.output import MILOutput
from tdamil.simulation.compare import map_checks
from tdamil.simulation.report import CISettings, TargetPredictions, comparison_row, paired_rows, write_comparison
from tdamil.simulation.sites import SimSites


class ToyMIL(nn.Module):
    """Positive when some patch has a high first feature; its map is that feature ("faithful"),
    its negative ("inverted") or absent ("none", like TransMIL)."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.tensor(1.0))
        self.kind = kind

    def forward(self, x: torch.Tensor) -> MILOutput:
        bag = torch.logsumexp(3 * x[..., 0], dim=-1) / 3 - 2.0
        logits = torch.stack([torch.zeros_like(bag), self.w * bag], dim=-1)
        scores = {"faithful": x[..., 0], "inverted": -x[..., 0], "none": None}[self.kind]
        return MILOutput(logits=logits, scores=scores)


def _bags(n: int, seed: int) -> InMemoryBagDataset:
    return evidence_bags(n, seed, (40, 90), 3)


def _sims() -> SimSites:
    sites = {"site_a": SiteData("site_a", _bags(8, 0), _bags(12, 1), _bags(6, 2)),
             "site_b": SiteData("site_b", _bags(10, 3), None, _bags(6, 4))}  # no validation split: training bags
    return SimSites(sites, {"held_out": _bags(6, 5)}, 3)


def test_every_compared_model_gets_its_check_on_its_own_validation_bags():
    maps = map_checks(_sims(), ToyMIL("faithful"), ToyMIL("inverted"),
                      {"site_a": ToyMIL("faithful"), "site_b": ToyMIL("none")})
    fed, cen, loc = maps["federated"], maps["centralised"], maps["local_own"]
    assert fed["verdict"] == "faithful" and fed["deletion_gap"] > 0.2 and fed["sign_test_p"] < 0.05
    assert 6 + 5 <= fed["checked"] <= 12 + 10  # the predicted-positive bags of site_a's validation and site_b's training split
    assert fed["bags"] == "validation (training where a site has none)"
    assert cen["verdict"] == "not faithful" and abs(cen["deletion_gap"]) < 0.1
    assert "the relevance map of the centralised model is NOT faithful" in cen["sentence"]
    assert loc["site_a"]["verdict"] == "faithful" and loc["site_a"]["bags"] == "validation" and 6 <= loc["site_a"]["checked"] <= 12
    assert loc["site_b"]["verdict"] == "n/a" and loc["site_b"]["bags"] == "training"
    assert "no per-patch scores" in loc["site_b"]["sentence"] and math.isnan(loc["site_b"]["deletion_gap"])


def _target(name: str, rng: np.random.Generator, maps: dict, local: bool = True) -> TargetPredictions:
    y = np.r_[np.ones(20, int), np.zeros(20, int)]
    p = 1 / (1 + np.exp(-(rng.normal(0, 1, 40) + 2 * y)))
    probs = {k: np.stack([1 - p, p], 1) for k in (("federated", "centralised", "local_own") if local else
                                                   ("federated", "centralised"))}
    t = TargetPredictions(name, y, [f"{name}-{i}" for i in range(40)], probs, local_mean_auroc=0.7)
    t.maps = {"federated": maps["federated"], "centralised": maps["centralised"]}
    if local:
        t.maps["local_own"] = maps["local_own"][name]
    return t


def test_the_check_is_a_column_of_the_comparison_and_a_plain_flag_in_the_run_report(tmp_path):
    maps = map_checks(_sims(), ToyMIL("faithful"), ToyMIL("inverted"),
                      {"site_a": ToyMIL("faithful"), "site_b": ToyMIL("none")})
    rng, ci = np.random.default_rng(0), CISettings(n_resamples=100, seed=1)
    targets = [_target("site_a", rng, maps), _target("site_b", rng, maps), _target("held-out:ext", rng, maps, local=False)]
    rows = [comparison_row(t, ci) for t in targets]
    write_comparison(rows, [p for t in targets for p in paired_rows(t, ci)], tmp_path, 4, ci,
                     extra={"relevance_maps": maps})

    table = {r["evaluated_on"]: r for r in csv.DictReader(open(tmp_path / "comparison.csv"))}
    assert table["site_a"]["federated_map"] == "faithful" and float(table["site_a"]["federated_deletion_gap"]) > 0.2
    assert table["held-out:ext"]["centralised_map"] == "not faithful"
    assert table["site_b"]["local_own_map"] == "n/a" and table["site_b"]["local_own_deletion_gap"] == ""
    assert table["held-out:ext"]["local_own_map"] == table["held-out:ext"]["local_own_deletion_gap"] == ""
    assert "nan" not in (tmp_path / "comparison.csv").read_text().lower()
    doc = json.loads((tmp_path / "comparison.json").read_text())
    assert doc["relevance_maps"]["local_own"]["site_b"]["deletion_gap"] is None
    assert doc["rows"][2]["local_own_map"] is None
    md = (tmp_path / "comparison.md").read_text()
    line = next(x for x in md.splitlines() if x.startswith("| site_b |") and "faithful" in x)
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert cells[1].endswith(" faithful") and cells[2].endswith(" NOT faithful") and cells[3] == "n/a", cells

    html = render_run_report(tmp_path)
    flags = [chunk.split("</p>")[0] for chunk in html.split('<p class="bad map-flag">')[1:]]
    assert len(flags) == 1 and flags[0].startswith("The relevance map of the centralised model is not faithful: ")
    assert "do not read its heatmaps as evidence" in flags[0]

    class Text(HTMLParser):
        def __init__(self):
            super().__init__()
            self.text = []

        def handle_data(self, data):
            self.text.append(data)

    parser = Text()
    parser.feed(html)
    text = " ".join(parser.text)
    assert "Relevance maps: the deletion check" in text and "local-only model of site_b" in text


def test_a_report_without_map_checks_says_nothing_about_them(tmp_path):
    ci = CISettings(n_resamples=100, seed=1)
    t = TargetPredictions("site_a", np.r_[np.ones(10, int), np.zeros(10, int)], [str(i) for i in range(20)],
                          {"federated": np.tile([0.4, 0.6], (20, 1))})
    row = comparison_row(t, ci)
    assert row["federated_map"] is None and math.isnan(row["federated_deletion_gap"])
    write_comparison([row], [], tmp_path, 1, ci)
    html = render_run_report(tmp_path)
    assert "map-flag" not in html and "Relevance maps" not in html
