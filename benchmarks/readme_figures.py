"""The README's main-job figures, generated from a recorded results file (never typed by hand).

The main job (``tdamil-simulate --config configs/sim_digits.yaml``) writes ``comparison.json``; its
copy in ``benchmarks/results/sim_digits.json`` is the reference run. The README block between
``<!-- figures:sim_digits -->`` and ``<!-- /figures -->`` is rendered from that file, and
``tests/test_readme_figures.py`` fails when the two drift apart.

    python benchmarks/readme_figures.py --run     # one command: run the main job, record, rewrite README
    python benchmarks/readme_figures.py --record runs/sim_digits   # record an existing run
    python benchmarks/readme_figures.py           # check only: exit 1 if the README is out of date
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "sim_digits.yaml"
RESULTS = REPO / "benchmarks" / "results" / "sim_digits.json"
README = REPO / "README.md"
START, END = "<!-- figures:sim_digits -->", "<!-- /figures -->"


def render(doc: dict) -> str:
    """The README block for a recorded comparison.json."""
    m = doc["site_mean_auroc"]
    fed_cen = [p for p in doc["pairs"] if (p["a"], p["b"]) == ("federated", "centralised")
               and not p["evaluated_on"].startswith("held-out:")]
    apart = sum(p["auroc_p_holm"] is not None and p["auroc_p_holm"] >= 1 - doc["bootstrap"]["level"] for p in fed_cen)
    return (f"{START}\nOn the reference run ([benchmarks/results/sim_digits.json](benchmarks/results/sim_digits.json)): "
            f"mean per-site AUROC federated {m['federated_auroc']:.3f}, centralised {m['centralised_auroc']:.3f}, "
            f"local-only {m['local_own_auroc']:.3f}; federated and centralised cannot be told apart on {apart} of "
            f"{len(fed_cen)} sites (paired DeLong test, Holm-adjusted; 95 % CIs per site in `comparison.md`).\n{END}")


def readme_block(text: str) -> str:
    if START not in text or END not in text:
        raise SystemExit(f"{README}: the markers {START} ... {END} are missing; put them around the figures line.")
    return text[text.index(START):text.index(END) + len(END)]


def config_sha256() -> str:
    return hashlib.sha256(CONFIG.read_bytes()).hexdigest()


def record(run_dir: Path) -> None:
    """Copy ``run_dir/comparison.json`` (with the config's hash) to RESULTS and rewrite the README block."""
    doc = json.loads((run_dir / "comparison.json").read_text(encoding="utf-8"))
    doc["recorded"] = {"command": "tdamil-simulate --config configs/sim_digits.yaml", "config_sha256": config_sha256()}
    RESULTS.write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
    text = README.read_text(encoding="utf-8")
    README.write_text(text.replace(readme_block(text), render(doc)), encoding="utf-8")
    print(f"Recorded {RESULTS.relative_to(REPO)} and updated README.md:\n{render(doc)}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", action="store_true", help="run the main job into runs/sim_digits first, then record it")
    p.add_argument("--record", type=Path, default=None, metavar="RUN_DIR", help="record RUN_DIR/comparison.json")
    args = p.parse_args(argv)
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
