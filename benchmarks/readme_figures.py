"""The README's main-job figures, generated from a recorded results file (never typed by hand).

The main job (``tdamil-simulate --config configs/sim_digits.yaml``) runs every seed of the config's
``seeds`` and writes ``seeds_summary.json`` (mean +- sd over seeds per site, every seed's site
means, paired tests over seeds and slides); its copy in ``benchmarks/results/sim_digits.json`` is
the reference run. The README block between ``<!-- figures:sim_digits -->`` and ``<!-- /figures -->``
is rendered from that file, and ``tests/test_readme_figures.py`` fails when the two drift apart.

One seed's figure is not a property of the method (CPUs differ in the order of their float
kernels, and a few hundredths of AUROC move with it), so a fresh run is checked against the
recorded spread: its mean per-site AUROC of each model must lie within the recorded mean +- 2 sd.

    python benchmarks/readme_figures.py --run     # one command: run the main job, record, rewrite README
    python benchmarks/readme_figures.py --record runs/sim_digits   # record an existing run
    python benchmarks/readme_figures.py --check runs/sim_digits    # a fresh run inside the quoted spread?
    python benchmarks/readme_figures.py           # check only: exit 1 if the README is out of date
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import platform
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "sim_digits.yaml"
RESULTS = REPO / "benchmarks" / "results" / "sim_digits.json"
README = REPO / "README.md"
START, END = "<!-- figures:sim_digits -->", "<!-- /figures -->"
MODELS = {"federated_auroc": "federated", "centralised_auroc": "centralised", "local_own_auroc": "local-only"}


def _pm(stats: dict) -> str:
    return f"{stats['mean']:.3f} ± {stats['sd']:.3f}"


def _pooled(doc: dict, a: str, b: str) -> list[dict]:
    return [p for p in doc["pooled_pairs"] if (p["a"], p["b"]) == (a, b) and not p["evaluated_on"].startswith("held-out:")]


def render(doc: dict) -> str:
    """The README block for a recorded seeds_summary.json."""
    m, alpha = doc["site_mean_auroc"], 1 - doc["level"]
    fed_loc, fed_cen = _pooled(doc, "federated", "local_own"), _pooled(doc, "federated", "centralised")
    better = sum(p["auroc_diff_estimate"] > 0 and p["auroc_diff_p_holm"] < alpha for p in fed_loc)
    apart = sum(p["auroc_diff_p_holm"] >= alpha for p in fed_cen)
    gaps = [r["federated_minus_local_own"] for r in doc["per_seed"]]
    close = [r["federated_minus_centralised"] for r in doc["per_seed"]]
    seeds = ", ".join(str(s) for s in doc["seed_values"])
    wins = [len(r["sites_federated_beats_local_own"]) for r in doc["per_seed"]]
    wins_text = f"{min(wins)}" if min(wins) == max(wins) else f"{min(wins)} to {max(wins)}"
    return (f"{START}\nOn the reference run ([benchmarks/results/sim_digits.json](benchmarks/results/sim_digits.json); "
            f"seeds {seeds}, each with its own sites, bags and initial weights): mean per-site AUROC federated "
            f"{_pm(m['federated_auroc'])}, centralised {_pm(m['centralised_auroc'])}, local-only "
            f"{_pm(m['local_own_auroc'])} (mean ± sd over seeds); per seed, federated - local-only "
            f"{min(gaps):+.3f} to {max(gaps):+.3f} and federated - centralised {min(close):+.3f} to {max(close):+.3f}; "
            f"federated beats local-only (paired DeLong test on the seed's slides, Holm p < {alpha:g}) on "
            f"{wins_text} of the {len(fed_loc)} sites per seed. "
            f"Per site, pooled over seeds and slides (random-effects pool of each seed's paired DeLong test, "
            f"Holm-adjusted), federated beats local-only on {better} of {len(fed_loc)} sites and cannot be told apart "
            f"from centralised on {apart} of {len(fed_cen)} (per site and per seed in `seeds_summary.md`).\n{END}")


def readme_block(text: str) -> str:
    if START not in text or END not in text:
        raise SystemExit(f"{README}: the markers {START} ... {END} are missing; put them around the figures line.")
    return text[text.index(START):text.index(END) + len(END)]


def config_sha256() -> str:
    return hashlib.sha256(CONFIG.read_bytes()).hexdigest()


def outside_spread(recorded: dict, fresh: dict, k: float = 2.0) -> list[str]:
    """Each model whose fresh mean per-site AUROC (over its seeds) lies outside the recorded mean +- k sd."""
    problems = []
    for key, name in MODELS.items():
        ref, got = recorded["site_mean_auroc"][key], fresh["site_mean_auroc"][key]["mean"]
        low, high = ref["mean"] - k * ref["sd"], ref["mean"] + k * ref["sd"]
        if not (math.isfinite(got) and low <= got <= high):
            problems.append(f"{name}: {got:.3f} outside the recorded {_pm(ref)} (mean ± {k:g} sd: {low:.3f} to {high:.3f})")
    return problems


def record(run_dir: Path) -> None:
    """Copy ``run_dir/seeds_summary.json`` (with the config's hash) to RESULTS and rewrite the README block."""
    doc = json.loads((run_dir / "seeds_summary.json").read_text(encoding="utf-8"))
    doc["recorded"] = {"command": "tdamil-simulate --config configs/sim_digits.yaml", "config_sha256": config_sha256(),
                       "machine": f"{platform.machine()} {platform.processor() or platform.platform()}"}
    RESULTS.write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
    text = README.read_text(encoding="utf-8")
    README.write_text(text.replace(readme_block(text), render(doc)), encoding="utf-8")
    print(f"Recorded {RESULTS.relative_to(REPO)} and updated README.md:\n{render(doc)}")


def check(run_dir: Path) -> int:
    """0 when ``run_dir``'s figures lie inside the recorded spread (mean +- 2 sd), else 1."""
    fresh = json.loads((run_dir / "seeds_summary.json").read_text(encoding="utf-8"))
    problems = outside_spread(json.loads(RESULTS.read_text(encoding="utf-8")), fresh)
    print("\n".join(problems) if problems else f"{run_dir}: every model inside the recorded mean ± 2 sd.")
    return 1 if problems else 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", action="store_true", help="run the main job into runs/sim_digits first, then record it")
    p.add_argument("--record", type=Path, default=None, metavar="RUN_DIR", help="record RUN_DIR/seeds_summary.json")
    p.add_argument("--check", type=Path, default=None, metavar="RUN_DIR",
                   help="is RUN_DIR (a fresh main job) inside the recorded spread? (records nothing)")
    args = p.parse_args(argv)
    if args.check is not None:
        return check(args.check)
    if args.run:
        exe = Path(sys.executable).parent / "tdamil-simulate"
        subprocess.run([str(exe), "--config", str(CONFIG)], check=True, cwd=REPO)
        args.record = REPO / "runs" / "sim_digits"
    if args.record is not None:
        record(args.record)
        return 0
    doc = json.loads(RESULTS.read_text(encoding="utf-8"))
    ok = readme_block(README.read_text(encoding="utf-8")) == render(doc)
    print("README figures match the recorded run." if ok else "README figures differ from the recorded run: run "
          "python benchmarks/readme_figures.py --record <run dir> (or --run).")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
