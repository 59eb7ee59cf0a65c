"""Quick VALIDATION-only probes of TDA-MIL selection options on the digits protocol (run by hand).

Each run is ``bench_digits.run_one`` (same bags, optimiser, lr, width as the digits benchmark) with
a few epochs and no test bags evaluated; one JSON row per run is appended to ``--out``. Use it to
shortlist options before the full protocol (``bench_digits.py --ablation``).

    python benchmarks/probe_tdamil_selection.py --epochs 8 --seeds 0 1 2 \\
        --variants '{"default": {}, "projected": {"selection_source": "projected"}}' --out /tmp/probe.jsonl
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_digits import model_section, run_one  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--variants", required=True, help='JSON {label: {TDAMILConfig field: value}}')
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    for label, fields in json.loads(args.variants).items():
        for seed in args.seeds:
            model = dict(model_section("tdamil", 64, 4, 2), **fields)
            job = dict(model=model, label=label, seed=seed, train_bags=100, val_bags=100, test_bags=10,
                       epochs=args.epochs, patience=args.epochs, lr=3e-4, variant="mnist_bags", val_only=True)
            row = run_one(job)
            with args.out.open("a") as fh:
                fh.write(json.dumps(row) + "\n")
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
