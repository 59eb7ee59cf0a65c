"""Relevance maps on slide-sized bags: the two new generators with bag sizes log-uniform over 50-5,000
patches (issue 22's range; ``bench_faithfulness.py`` uses 50-600 to fit its 10-seed CPU budget).

Same protocol as ``bench_faithfulness.py`` (80 / 80 / 300 bags, 20 epochs, project defaults incl. the
start candidates, the label-free check on the validation bags); one process per run, one torch thread.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_faithfulness_sizes.py --seeds 0 1 2 --jobs 2
"""

from __future__ import annotations

import argparse
import csv
import sys
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))


def _run(generator: str, seed: int, sizes: tuple[int, int], epochs: int) -> dict:
    import functools

    import torch

    torch.set_num_threads(1)
    import benchmarks.slide_bags as slide_bags
    from benchmarks import bench_faithfulness

    slide_bags.make_slide_bags = functools.partial(slide_bags.make_slide_bags, sizes=sizes)
    row = bench_faithfulness.run(generator, "tdamil", seed, epochs)
    row["sizes"] = f"{sizes[0]}-{sizes[1]}"
    print(row, flush=True)
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--generators", nargs="+", default=["tissue_mixture", "latent_shift"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--sizes", type=int, nargs=2, default=[50, 5000])
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--out", type=Path, default=HERE / "results" / "faithfulness_sizes.csv")
    args = parser.parse_args()
    jobs = [(g, s, tuple(args.sizes), args.epochs) for g in args.generators for s in args.seeds]
    with ProcessPoolExecutor(max_workers=args.jobs, mp_context=get_context("spawn")) as pool:
        rows = list(pool.map(_run, *zip(*jobs)))
    with args.out.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    for r in rows:
        print(f"{r['generator']} | seed {r['seed']} | bag {r['bag_auroc']:.3f} | inst {r['inst_auroc']:.3f} | "
              f"top-1 {r['top1']:.3f} | gap {r['deletion_gap']:.2f} ({r['verdict']}) | {r['train_seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
