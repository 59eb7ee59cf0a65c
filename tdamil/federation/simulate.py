"""``tdamil-simulate``: a whole federation on one machine, with centralised and local-only baselines.

Sites come from a dataset: the embedded digits MIL bags split into non-IID sites (default, no
download), or a manifest whose ``cohort`` column becomes the sites (some cohorts can be held out
for server-side evaluation). The same ServerApp / ClientApp code as a real deployment runs:

* ``engine: inprocess`` (default): an in-process Grid calls the ClientApp for each site;
* ``engine: ray``: Flower's Ray simulation engine (``pip install 'tdamil-fl[ray]'``).

At the same budget (rounds x local epochs epochs, same lr) it then trains a centralised model on
the pooled training sets and one local-only model per site, evaluates every model on every
site's test split and on the held-out cohort, and writes ``comparison.md``, ``comparison.csv`` and
one bar plot per site next to the federation's own outputs (checkpoints, metrics, audit log).
"""

from __future__ import annotations

import argparse
import csv
import logging
import math
import os
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, Optional

from tdamil.config import ConfigError, load_config
from tdamil.data.config import DataConfig
from tdamil.data.digits import DigitsBagsConfig
from tdamil.federation.config import CheckpointConfig, FederationConfig
from tdamil.federation.task import ModelSpec, SiteData
from tdamil.security.config import PrivacyConfig
from tdamil.train.engine import TrainConfig

logger = logging.getLogger(__name__)

__all__ = ["SimConfig", "load_sim_config", "simulate", "main"]


@dataclass
class DigitsSitesConfig:
    """Digits bags split into non-IID sites (``tdamil.data.digits.make_digits_sites``).

    num_sites: number of sites; label_skew / size_skew: how much the sites' positive share and
    bag size differ; site_test_bags: test bags per site; held_out_fraction: share of the images
    kept for the held-out cohort; bags: the bag settings (DigitsBagsConfig).
    """

    num_sites: int = 3
    label_skew: float = 0.3
    size_skew: float = 0.4
    site_test_bags: int = 200
    held_out_fraction: float = 0.3
    bags: DigitsBagsConfig = field(default_factory=DigitsBagsConfig)


@dataclass
class ManifestSitesConfig:
    """Sites from a manifest's cohort column (dataset-as-site).

    data: manifest + feature cache; sites: the cohorts that become sites (null = all but
    held_out); held_out: cohorts evaluated at the server only; split: patient-level split of each
    site when the manifest has no ``split`` column.
    """

    data: DataConfig
    sites: Optional[list[str]] = None
    held_out: list[str] = field(default_factory=list)
    val_fraction: float = 0.15
    test_fraction: float = 0.15
    split_seed: int = 0


@dataclass
class SimDataConfig:
    """``source: digits`` (embedded default) or ``source: manifest``."""

    source: Literal["digits", "manifest"] = "digits"
    digits: DigitsSitesConfig = field(default_factory=DigitsSitesConfig)
    manifest: Optional[ManifestSitesConfig] = None

    def __post_init__(self) -> None:
        if self.source == "manifest" and self.manifest is None:
            raise ValueError("data.source is 'manifest' but the data.manifest section is missing")


@dataclass
class SimConfig:
    """A simulation YAML (``configs/sim_digits.yaml``).

    model / num_classes: the model (tdamil.models config); output_dir: where everything goes;
    data: the sites; federation / checkpoint: as in server.yaml; train: the sites' TrainConfig
    (device, accumulation, ...; lr and epochs come from ``federation``); engine: inprocess | ray;
    baselines: also run centralised and local-only training at the same budget; privacy: DP;
    torch_threads: CPU threads for torch (1: small MIL models run fastest single-threaded, and
    oversubscribed cores slow multi-threaded torch down by orders of magnitude; null = torch's default).
    """

    model: dict[str, Any] = field(default_factory=lambda: {"name": "tdamil", "dim": 64, "depth": 1, "num_heads": 4})
    num_classes: int = 2
    output_dir: Path = Path("runs/sim")
    data: SimDataConfig = field(default_factory=SimDataConfig)
    federation: FederationConfig = field(default_factory=lambda: FederationConfig(rounds=10, lr=1e-3, min_sites=3))
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(progress=False, device="cpu"))
    engine: Literal["inprocess", "ray"] = "inprocess"
    baselines: bool = True
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    torch_threads: Optional[int] = 1


def load_sim_config(path: str | Path, overrides: dict[str, Any] | None = None) -> SimConfig:
    path = Path(path)
    cfg = load_config(path, SimConfig, overrides=overrides)
    from tdamil.server.config import validate_model  # noqa: PLC0415

    validate_model(cfg.model, str(path))
    cfg.output_dir = Path(cfg.output_dir).resolve()  # logs show /work/runs/x, not /work/configs/../runs/x
    if cfg.data.source == "manifest" and not Path(cfg.data.manifest.data.manifest).is_file():
        raise ConfigError(f"{path}: 'data.manifest.data.manifest' file {cfg.data.manifest.data.manifest} not found.")
    return cfg


# ------------------------------------------------------------------------------------------------
@dataclass
class SimSites:
    sites: dict[str, SiteData]
    held_out: dict[str, Any]
    in_dim: int


def build_sites(cfg: SimConfig) -> SimSites:
    """The simulated sites and held-out cohorts described by ``cfg.data``."""
    if cfg.data.source == "digits":
        from tdamil.data.digits import make_digits_sites  # noqa: PLC0415

        d = cfg.data.digits
        made = make_digits_sites(d.bags, d.num_sites, label_skew=d.label_skew, size_skew=d.size_skew,
                                 site_test_bags=d.site_test_bags, held_out_fraction=d.held_out_fraction)
        sites = {name: SiteData(name, s.train, s.val, s.test, extra=dict(s.info)) for name, s in made.items()}
        first = next(iter(made.values())).train
        return SimSites(sites, {"held_out": made.held_out}, int(first.in_dim))
    from tdamil.federation.data import cohort_datasets, load_manifest_frame, split_datasets  # noqa: PLC0415

    m = cfg.data.manifest
    df = load_manifest_frame(m.data)
    if "cohort" not in df.columns:
        raise ConfigError(f"{m.data.manifest}: dataset-as-site simulation needs a 'cohort' column in the manifest.")
    all_cohorts = sorted(df["cohort"].unique())
    unknown = [c for c in list(m.held_out) + list(m.sites or []) if c not in all_cohorts]
    if unknown:
        raise ConfigError(f"{m.data.manifest}: cohorts {unknown} not in the manifest (it has {all_cohorts}).")
    names = list(m.sites) if m.sites else [c for c in all_cohorts if c not in m.held_out]
    sites = {}
    for name in names:
        parts = split_datasets(m.data, cohorts=[name], val_fraction=m.val_fraction, test_fraction=m.test_fraction,
                               seed=m.split_seed)
        sites[name] = SiteData(name, parts["train"], parts["val"], parts["test"])
    held = cohort_datasets(m.data, m.held_out) if m.held_out else {}
    first = next(iter(sites.values())).train
    return SimSites(sites, held, int(first.in_dim))


class SimSiteProvider:
    """ClientApp data provider for simulated sites: ``node_config["site"]`` (in-process) or
    ``node_config["partition-id"]`` (Ray) -> that site's data. Picklable; builds the sites lazily
    (deterministically, from the config) in each process that needs them."""

    def __init__(self, cfg: SimConfig, sites: Optional[SimSites] = None) -> None:
        self.cfg = cfg
        self._sites = sites

    def __getstate__(self) -> dict[str, Any]:
        return {"cfg": self.cfg, "_sites": None}

    def __call__(self, context: Any) -> Any:
        from tdamil.client.client_app import SiteRuntime  # noqa: PLC0415

        if self._sites is None:
            self._sites = build_sites(self.cfg)
        names = list(self._sites.sites)
        site = context.node_config.get("site")
        if site is None:
            site = names[int(context.node_config["partition-id"]) % len(names)]
        mods: list = []
        if self.cfg.privacy.enabled:
            from tdamil.security.dp import dp_client_mods  # noqa: PLC0415

            mods = list(dp_client_mods(self.cfg.privacy))
        return SiteRuntime(name=str(site), data=self._sites.sites[str(site)], train_cfg=self.cfg.train, train_mods=mods)


# ------------------------------------------------------------------------------------------------
def run_federation(cfg: SimConfig, sims: SimSites, out_dir: Path, *, resume: bool = False,
                   on_message: Any = None) -> Any:
    """Run the federation with the configured engine; returns the RunSetup (``setup.result``)."""
    from tdamil.client.client_app import make_client_app  # noqa: PLC0415
    from tdamil.server.server_app import RunSetup, make_server_app  # noqa: PLC0415

    setup = RunSetup(spec=ModelSpec(cfg.model, sims.in_dim, cfg.num_classes), federation=cfg.federation,
                     out_dir=out_dir, checkpoint=cfg.checkpoint, heldout=sims.held_out, privacy=cfg.privacy,
                     resume=resume)
    server_app = make_server_app(lambda context: setup)
    client_app = make_client_app(SimSiteProvider(cfg, sims))
    names = list(sims.sites)
    if cfg.engine == "inprocess":
        from flwr.app import Context, RecordDict  # noqa: PLC0415

        from tdamil.federation.grids import InProcessGrid  # noqa: PLC0415

        grid = InProcessGrid(client_app, {1000 + i: {"site": n} for i, n in enumerate(names)}, on_message=on_message)
        server_app(grid, Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={}))
    else:
        # Ray and Flower's simulation set PYTHONPATH and other variables in this process (some at
        # import): put the environment back so later subprocesses (a SuperLink, an external CLI)
        # are not affected.
        saved_env = dict(os.environ)
        try:
            from flwr.simulation import run_simulation  # noqa: PLC0415
            import ray  # noqa: F401, PLC0415
        except ImportError:
            raise SystemExit("engine: ray needs Flower's simulation extra: pip install 'tdamil-fl[ray]'.") from None
        # Ray runs the ServerApp in this process; the setup object is filled in place.
        try:
            run_simulation(server_app=server_app, client_app=client_app, num_supernodes=len(names),
                           backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}})
        finally:
            os.environ.clear()
            os.environ.update(saved_env)
    return setup


def _concat(datasets: list[Any]) -> Any:
    from tdamil.data.bags import InMemoryBagDataset  # noqa: PLC0415

    feats, labels, ids = [], [], []
    for ds in datasets:
        for i in range(len(ds)):
            bag = ds[i]
            feats.append(bag.features)
            labels.append(bag.label)
            ids.append(bag.slide_id)
    return InMemoryBagDataset(feats, labels, ids, num_classes=datasets[0].num_classes)


def train_baseline(cfg: SimConfig, spec: ModelSpec, dataset: Any, epochs: int) -> Any:
    """A model trained on ``dataset`` for ``epochs`` epochs from the same initial weights."""
    from tdamil.federation.task import build_model, local_train  # noqa: PLC0415

    model = build_model(spec, seed=cfg.federation.seed)
    local_train(model, dataset, cfg.train, epochs=epochs, lr=cfg.federation.lr, weight_decay=cfg.federation.weight_decay)
    return model


def compare(cfg: SimConfig, sims: SimSites, global_model: Any, spec: ModelSpec, out_dir: Path) -> list[dict[str, Any]]:
    """Centralised and local-only baselines at the same budget; per-site comparison table + plots."""
    from tdamil.federation.task import local_evaluate  # noqa: PLC0415

    budget = cfg.federation.rounds * cfg.federation.local_epochs
    logger.info("Baselines at the same budget: %d epochs each (centralised + %d local-only).", budget, len(sims.sites))
    t0 = time.perf_counter()
    central = train_baseline(cfg, spec, _concat([s.train for s in sims.sites.values()]), budget)
    local = {name: train_baseline(cfg, spec, s.train, budget) for name, s in sims.sites.items()}
    logger.info("Baselines trained in %.1f s.", time.perf_counter() - t0)
    targets = {name: s.test for name, s in sims.sites.items()}
    targets.update({f"held-out:{k}": v for k, v in sims.held_out.items()})
    rows = []
    for target, ds in targets.items():
        fed = local_evaluate(global_model, ds)
        cen = local_evaluate(central, ds)
        loc = {name: local_evaluate(m, ds) for name, m in local.items()}
        own = loc.get(target)
        finite = [v["auroc"] for v in loc.values() if math.isfinite(v["auroc"])]
        rows.append({
            "evaluated_on": target,
            "slides": len(ds),
            "federated_auroc": fed["auroc"],
            "centralised_auroc": cen["auroc"],
            "local_own_auroc": own["auroc"] if own else float("nan"),
            "local_mean_auroc": sum(finite) / len(finite) if finite else float("nan"),
            "federated_bacc": fed["balanced_accuracy"],
            "centralised_bacc": cen["balanced_accuracy"],
            "local_own_bacc": own["balanced_accuracy"] if own else float("nan"),
        })
    _write_comparison(rows, out_dir, budget)
    return rows


def _fmt(v: Any) -> str:
    return f"{v:.3f}" if isinstance(v, float) and math.isfinite(v) else ("n/a" if isinstance(v, float) else str(v))


def _write_comparison(rows: list[dict[str, Any]], out_dir: Path, budget: int) -> None:
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / "comparison.csv", "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    site_rows = [r for r in rows if not r["evaluated_on"].startswith("held-out:")]
    mean = {k: sum(r[k] for r in site_rows) / len(site_rows) for k in
            ("federated_auroc", "centralised_auroc", "local_own_auroc", "local_mean_auroc")} if site_rows else {}
    lines = [
        f"# Federated vs centralised vs local-only TDA-MIL (same budget: {budget} epochs each)",
        "",
        "AUROC on each site's own test split (and on the held-out cohort). *local own*: the model trained only "
        "on that site; *local mean*: mean over all local-only models evaluated there.",
        "",
        "| evaluated on | slides | federated | centralised | local own | local mean | federated bal. acc | centralised bal. acc | local own bal. acc |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(r[k]) for k in r) + " |")
    if mean:
        lines += ["", "Mean over sites: " + ", ".join(f"{k.replace('_auroc', '')} {_fmt(v)}" for k, v in mean.items())]
    (out_dir / "comparison.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    plots = out_dir / "plots"
    plots.mkdir(exist_ok=True)
    for r in rows:
        fig, ax = plt.subplots(figsize=(4.2, 3.2))
        labels = ["federated", "centralised", "local own", "local mean"]
        values = [r["federated_auroc"], r["centralised_auroc"], r["local_own_auroc"], r["local_mean_auroc"]]
        values = [v if math.isfinite(v) else 0.0 for v in values]
        ax.bar(labels, values, color=["tab:blue", "tab:gray", "tab:orange", "tab:olive"])
        ax.set_ylim(0.0, 1.0)
        ax.set_ylabel("AUROC")
        ax.set_title(r["evaluated_on"])
        for i, v in enumerate(values):
            ax.text(i, v + 0.01, f"{v:.3f}", ha="center", fontsize=8)
        fig.tight_layout()
        fig.savefig(plots / f"comparison_{r['evaluated_on'].replace(':', '_').replace('/', '_')}.png", dpi=100)
        plt.close(fig)


def simulate(cfg: SimConfig, *, resume: bool = False, out_dir: Optional[Path] = None) -> dict[str, Any]:
    """Run the simulation described by ``cfg``; returns a summary dict."""
    from tdamil.federation.task import build_model, load_arrays  # noqa: PLC0415

    out = Path(out_dir or cfg.output_dir).resolve()
    if cfg.torch_threads:
        import torch  # noqa: PLC0415

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
    from tdamil.federation.checkpoint import load_checkpoint  # noqa: PLC0415
    from flwr.app import ArrayRecord  # noqa: PLC0415

    ckpt = load_checkpoint(out / "checkpoints" / "last.pt")
    load_arrays(model, ArrayRecord({k: v for k, v in ckpt["state_dict"].items()}))
    summary: dict[str, Any] = {"out_dir": str(out), "federation_seconds": t_fed, "rounds": cfg.federation.rounds}
    if cfg.baselines:
        rows = compare(cfg, sims, model, spec, out)
        summary["comparison"] = rows
    summary["seconds"] = time.perf_counter() - t0
    return summary


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="tdamil-simulate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/sim_digits.yaml", help="simulation YAML (default: %(default)s)")
    parser.add_argument("--output-dir", type=Path, default=None, help="override output_dir")
    parser.add_argument("--rounds", type=int, default=None, help="override federation.rounds")
    parser.add_argument("--engine", choices=["inprocess", "ray"], default=None, help="override engine")
    parser.add_argument("--no-baselines", action="store_true", help="skip the centralised / local-only baselines")
    parser.add_argument("--resume", action="store_true", help="continue from the output folder's last checkpoint")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    from tdamil.logs import setup_logging  # noqa: PLC0415

    setup_logging(args.verbose)
    overrides: dict[str, Any] = {}
    if args.rounds is not None:
        overrides["federation.rounds"] = args.rounds
    if args.engine is not None:
        overrides["engine"] = args.engine
    if args.no_baselines:
        overrides["baselines"] = False
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
    print(f"\nFederation finished in {summary['federation_seconds']:.1f} s; everything in {out}/")
    if (out / "comparison.md").exists():
        print((out / "comparison.md").read_text(encoding="utf-8"))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
