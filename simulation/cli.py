"""``tdamil-simulate``: a whole federation on one machine, with centralised and local-only baselines.

Sites come from a dataset: the embedded digits MIL bags split into non-IID sites (default, no
download), or a manifest whose ``cohort`` column becomes the sites (some cohorts can be held out
for server-side evaluation). The same ServerApp / ClientApp code as a real deployment runs, with
an in-process Grid (``engine: inprocess``, default) or Flower's Ray engine (``engine: ray``). At
the same budget it then trains centralised and local-only baselines and writes the comparison
(``tdamil.simulation.compare``) next to the federation's own outputs (checkpoints, metrics, audit log).
"""

from __future__ import annotations

import argparse
import logging
import multiprocessing
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any, Optional

import torch
from flwr.app import ArrayRecord

from tdamil.config import ConfigError
from tdamil.checkpoint import load_checkpoint
from tdamil.federation.run_report import write_run_report
from tdamil.federation.task import build_model, load_arrays
from tdamil.logs import setup_logging
from tdamil.simulation.compare import compare, write_seed_summary
from tdamil.simulation.config import SimConfig, load_sim_config
from tdamil.simulation.crossval import crossval
from tdamil.simulation.engines import run_federation
from tdamil.simulation.sites import build_sites

logger = logging.getLogger(__name__)

__all__ = ["simulate", "main"]


def simulate(cfg: SimConfig, *, resume: bool = False, out_dir: Optional[Path] = None) -> dict[str, Any]:
    """Run the simulation described by ``cfg`` (every fold with ``folds: k``, every seed with
    ``seeds: [...]``); returns a summary dict."""
    if cfg.folds >= 2 and cfg.fold is None:
        return crossval(cfg, simulate, out_dir=out_dir, resume=resume)
    if cfg.seeds:
        return _over_seeds(cfg, resume=resume, out_dir=out_dir)
    out = Path(out_dir or cfg.output_dir).resolve()
    if cfg.torch_threads:
        torch.set_num_threads(int(cfg.torch_threads))
    t0 = time.perf_counter()
    sims = build_sites(cfg)
    logger.info("Simulating %d sites (%s), held-out cohorts: %s; engine %s; %d rounds x %d local epoch(s).",
                len(sims.sites), ", ".join(f"{n}: {len(s.train)} train bags" for n, s in sims.sites.items()),
                ", ".join(sims.held_out) or "none", cfg.engine, cfg.federation.rounds, cfg.federation.local_epochs)
    setup = run_federation(cfg, sims, out, resume=resume)
    t_fed = time.perf_counter() - t0
    spec = setup.spec
    model = build_model(spec, seed=None)
    ckpt = load_checkpoint(out / "checkpoints" / "last.pt")
    load_arrays(model, ArrayRecord({k: v for k, v in ckpt["model_state"].items()}))
    summary: dict[str, Any] = {"out_dir": str(out), "federation_seconds": t_fed, "rounds": cfg.federation.rounds}
    if cfg.baselines:
        rows = compare(cfg, sims, model, spec, out)
        summary["comparison"] = rows
        write_run_report(out)  # the federation wrote it each round; now with the comparison table
    summary["seconds"] = time.perf_counter() - t0
    return summary


def with_seed(cfg: SimConfig, seed: int) -> SimConfig:
    """``cfg`` for one seed: the digits bags, the sites' training and the initial weights all take it."""
    digits = replace(cfg.data.digits, bags=replace(cfg.data.digits.bags, seed=seed))
    return replace(cfg, seeds=[], data=replace(cfg.data, digits=digits), train=replace(cfg.train, seed=seed),
                   federation=replace(cfg.federation, seed=seed))


def _over_seeds(cfg: SimConfig, *, resume: bool, out_dir: Optional[Path]) -> dict[str, Any]:
    """The simulation once per seed into ``seed_<s>/``, then the summary over seeds."""
    out = Path(out_dir or cfg.output_dir).resolve()
    t0 = time.perf_counter()
    jobs = [(with_seed(cfg, seed), out / f"seed_{seed}") for seed in cfg.seeds]
    for i, (seed, (_, where)) in enumerate(zip(cfg.seeds, jobs)):
        logger.info("Seed %d (%d of %d) -> %s", seed, i + 1, len(cfg.seeds), where)
    workers = min(int(cfg.seed_workers), len(jobs))
    if workers <= 1:
        runs = [simulate(c, resume=resume, out_dir=o) for c, o in jobs]
    else:  # fresh (spawned) processes, one per core: no torch or Flower state is inherited
        level = logging.getLogger().getEffectiveLevel()
        with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"),
                                 initializer=partial(setup_logging, level=level)) as pool:
            runs = [f.result() for f in [pool.submit(simulate, c, resume=resume, out_dir=o) for c, o in jobs]]
    summary: dict[str, Any] = {"out_dir": str(out), "seeds": runs, "seconds": time.perf_counter() - t0,
                               "federation_seconds": sum(r["federation_seconds"] for r in runs)}
    if cfg.baselines:
        budget = cfg.federation.rounds * cfg.federation.local_epochs
        summary["over_seeds"] = write_seed_summary(list(cfg.seeds), [Path(r["out_dir"]) for r in runs], out, budget,
                                                   summary["seconds"])
    return summary


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="tdamil-simulate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/sim_digits.yaml", help="simulation YAML (default: %(default)s)")
    parser.add_argument("--output-dir", type=Path, default=None, help="override output_dir")
    parser.add_argument("--rounds", type=int, default=None, help="override federation.rounds")
    parser.add_argument("--engine", choices=["inprocess", "ray"], default=None, help="override engine")
    parser.add_argument("--ray-address", default=None, metavar="HOST:PORT",
                        help="run on this Ray cluster (host:port of `ray start --head`, or auto); implies --engine ray")
    parser.add_argument("--no-baselines", action="store_true", help="skip the centralised / local-only baselines")
    parser.add_argument("--folds", type=int, default=None, help="override folds (k-fold CV; 0 = one split)")
    parser.add_argument("--fold", type=int, default=None, help="run only this fold (0-based)")
    parser.add_argument("--fold-workers", type=int, default=None, help="folds run at once, one process each")
    parser.add_argument("--seeds", default=None, metavar="S,S,...",
                        help="override seeds: run once per seed and summarise (e.g. 0,1,2; 'none' = one run)")
    parser.add_argument("--seed-workers", type=int, default=None, help="seeds run at once, one process each")
    parser.add_argument("--resume", action="store_true", help="continue from the output folder's last checkpoint")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    setup_logging(args.verbose)
    overrides: dict[str, Any] = {}
    if args.rounds is not None:
        overrides["federation.rounds"] = args.rounds
    if args.engine is not None:
        overrides["engine"] = args.engine
    if args.ray_address is not None:
        overrides.update({"engine": "ray", "ray.address": args.ray_address})
    if args.no_baselines:
        overrides["baselines"] = False
    for key in ("folds", "fold", "fold_workers", "seed_workers"):
        if getattr(args, key) is not None:
            overrides[key] = getattr(args, key)
    if args.seeds is not None:
        try:
            overrides["seeds"] = [] if args.seeds.strip().lower() == "none" else [int(x) for x in args.seeds.split(",")]
        except ValueError:
            print(f"error: --seeds takes comma-separated integers (e.g. 0,1,2) or none, got {args.seeds!r}", file=sys.stderr)
            return 2
    try:
        cfg = load_sim_config(args.config, overrides)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        summary = simulate(cfg, resume=args.resume, out_dir=args.output_dir)
    except (ConfigError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    out = Path(summary["out_dir"])
    print(f"\nFederation finished in {summary['federation_seconds']:.1f} s (all in {summary['seconds']:.1f} s); "
          f"everything in {out}/")
    for report in ("cv_summary.md", "seeds_summary.md", "comparison.md"):  # the CV summary when there is one
        if (out / report).exists():
            print((out / report).read_text(encoding="utf-8"))
            break
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
