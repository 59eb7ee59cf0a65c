"""The simulation YAML (``configs/sim_*.yaml``): typed sections and their checks."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

from tdamil.config import ConfigError, load_config
from tdamil.data.config import DataConfig
from tdamil.data.digits import DigitsBagsConfig
from tdamil.federation.config import CheckpointConfig, FederationConfig
from tdamil.security.config import PrivacyConfig
from tdamil.server.config import validate_model
from tdamil.train.engine import TrainConfig

__all__ = ["DigitsSitesConfig", "ManifestSitesConfig", "SimDataConfig", "SiteResources", "RayConfig", "SimConfig",
           "load_sim_config"]


@dataclass
class DigitsSitesConfig:
    """Digits bags split into non-IID sites (``tdamil.data.digits.make_digits_sites``).

    num_sites: number of sites; label_skew / size_skew: how much the sites' positive share and
    bag size differ; site_test_bags: test bags per site; held_out_fraction: share of the images
    kept for the held-out cohort; bags: the bag settings (DigitsBagsConfig).
    Hospital-like differences (null / 0 = off, the sites above):
    site_train_bags: training bags of each site (one number per site; null = bags.num_train_bags);
    site_positive_fractions / site_mean_bag_sizes: each site's positive share and mean bag size
    (null = from label_skew / size_skew); feature_offset / feature_scale: scanner / stain shift, a
    per-site (and held-out cohort) affine map of the features, x * exp(a) + b per feature with
    a ~ N(0, feature_scale), b ~ N(0, feature_offset); site_split: shares of a site's images for its
    train / val / test pools ([0.6, 0.2, 0.2]).
    """

    num_sites: int = 3
    label_skew: float = 0.3
    size_skew: float = 0.4
    site_test_bags: int = 200
    held_out_fraction: float = 0.3
    bags: DigitsBagsConfig = field(default_factory=DigitsBagsConfig)
    site_train_bags: Optional[list[int]] = None
    site_positive_fractions: Optional[list[float]] = None
    site_mean_bag_sizes: Optional[list[float]] = None
    feature_offset: float = 0.0
    feature_scale: float = 0.0
    site_split: list[float] = field(default_factory=lambda: [0.6, 0.2, 0.2])

    def __post_init__(self) -> None:
        for key in ("site_train_bags", "site_positive_fractions", "site_mean_bag_sizes"):
            values = getattr(self, key)
            if values is not None and len(values) != self.num_sites:
                raise ValueError(f"{key} has {len(values)} values but num_sites is {self.num_sites}; give one per site")
        if self.feature_offset < 0 or self.feature_scale < 0:
            raise ValueError("feature_offset and feature_scale must be >= 0 (0 = no scanner / stain shift)")
        if len(self.site_split) != 3 or min(self.site_split) <= 0:
            raise ValueError(f"site_split must be three positive shares (train, val, test), got {self.site_split}")


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
class SiteResources:
    """``resources:`` what each virtual site reserves while it runs a message (Ray engine).

    num_cpus: CPUs per site; num_gpus: GPUs per site, a fraction lets sites share one (0.5: two sites
    per GPU), more than 1 must be a whole number. The sites' training device follows: cuda when
    num_gpus > 0 (Ray shows each site only the GPU(s) it was given), else cpu. As many sites run
    at once as the cluster fits; the others wait their turn.
    """

    num_cpus: float = 1.0
    num_gpus: float = 0.0

    def __post_init__(self) -> None:
        if self.num_cpus <= 0:
            raise ValueError("resources.num_cpus must be > 0")
        if self.num_gpus < 0 or (self.num_gpus > 1 and self.num_gpus != int(self.num_gpus)):
            raise ValueError("resources.num_gpus must be 0, a fraction of one GPU (e.g. 0.5) or a whole number")

    @property
    def device(self) -> str:
        return "cuda" if self.num_gpus > 0 else "cpu"


@dataclass
class RayConfig:
    """``ray:`` how the Ray engine finds its cluster (``ray.init``).

    address:             null: start a private Ray instance on this machine; ``host:port`` of a running
                         cluster's head (``ray start --head``) or ``auto`` (``RAY_ADDRESS`` / the cluster
                         started on this machine) to join one. ``--ray-address`` overrides it.
    num_cpus / num_gpus: what the private instance may use (default: all of the machine); not allowed
                         with an address (the cluster's nodes declare their own).
    object_store_memory: bytes of Ray's shared object store of the private instance (default: Ray's).
    log_to_driver:       show the sites' log lines in this terminal.
    """

    address: Optional[str] = None
    num_cpus: Optional[int] = None
    num_gpus: Optional[int] = None
    object_store_memory: Optional[int] = None
    log_to_driver: bool = True

    def __post_init__(self) -> None:
        if self.address and any(v is not None for v in (self.num_cpus, self.num_gpus, self.object_store_memory)):
            raise ValueError("ray.num_cpus, ray.num_gpus and ray.object_store_memory apply to a private Ray "
                             "instance only; remove them when ray.address joins a cluster")

    def init_args(self) -> dict[str, Any]:
        """Keyword arguments of ``ray.init``."""
        args: dict[str, Any] = {"include_dashboard": False, "log_to_driver": self.log_to_driver,
                                "logging_level": "WARNING"}
        if self.address:
            args["address"] = self.address
        for key in ("num_cpus", "num_gpus", "object_store_memory"):
            if getattr(self, key) is not None:
                args[key] = getattr(self, key)
        return args


@dataclass
class SimConfig:
    """A simulation YAML (``configs/sim_digits.yaml``).

    model / num_classes: the model (tdamil.models config); output_dir: where everything goes;
    data: the sites; federation / checkpoint: as in server.yaml; train: the sites' TrainConfig
    (accumulation, ...; lr and epochs come from ``federation``; the device follows ``resources``);
    engine: inprocess | ray; resources: per site (SiteResources); ray: the Ray cluster (RayConfig);
    baselines: also run centralised and local-only training at the same budget; privacy: DP;
    torch_threads: CPU threads for torch (1: small MIL models run fastest single-threaded, and
    oversubscribed cores slow multi-threaded torch down by orders of magnitude; null = torch's default).
    folds: 0 = one split per site; k >= 2 = federated k-fold cross-validation: the whole federation
    (and the baselines) runs once per fold, folds by patient and stratified within each site,
    held-out cohorts never split (``tdamil.simulation.folds``, ``tdamil.simulation.crossval``);
    fold: run only this fold (0-based; null = all folds); fold_workers: folds run at once, each in its
    own process (one per core; in-process engine only).
    seeds: [] = one run with the seeds written in the sections; a list = the whole simulation (and the
    baselines) once per seed into ``<output_dir>/seed_<s>/``, seed s setting the digits bags' seed,
    train.seed and federation.seed (sites, bags, initial weights and bag order all change), then the
    summary over seeds (mean +- sd, paired tests over seeds and slides: ``seeds_summary.md``);
    seed_workers: seeds run at once, each in its own process (one per core; in-process engine only).
    """

    model: dict[str, Any] = field(default_factory=lambda: {"name": "tdamil", "dim": 64, "depth": 1, "num_heads": 4})
    num_classes: int = 2
    output_dir: Path = Path("runs/sim")
    data: SimDataConfig = field(default_factory=SimDataConfig)
    federation: FederationConfig = field(default_factory=lambda: FederationConfig(rounds=10, lr=1e-3, min_sites=3))
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(progress=False))
    engine: Literal["inprocess", "ray"] = "inprocess"
    resources: SiteResources = field(default_factory=SiteResources)
    ray: RayConfig = field(default_factory=RayConfig)
    baselines: bool = True
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    torch_threads: Optional[int] = 1
    folds: int = 0
    fold: Optional[int] = None
    fold_workers: int = 1
    seeds: list[int] = field(default_factory=list)
    seed_workers: int = 1

    def __post_init__(self) -> None:
        # One source for the device: what the sites reserve. A contradicting train.device is an
        # error rather than a silent override (cuda without a reserved GPU sees no GPU under Ray).
        want = self.resources.device
        if self.train.device not in ("auto", want):
            raise ValueError(f"train.device is '{self.train.device}' but resources.num_gpus is "
                             f"{self.resources.num_gpus:g}, so the sites train on {want}; remove train.device "
                             f"or set resources.num_gpus (e.g. 1, or 0.5 for two sites per GPU)")
        self.train.device = want


def load_sim_config(path: str | Path, overrides: dict[str, Any] | None = None) -> SimConfig:
    path = Path(path)
    cfg = load_config(path, SimConfig, overrides=overrides)
    validate_model(cfg.model, str(path))
    cfg.output_dir = Path(cfg.output_dir).resolve()  # logs show /work/runs/x, not /work/configs/../runs/x
    if cfg.data.source == "manifest" and not Path(cfg.data.manifest.data.manifest).is_file():
        raise ConfigError(f"{path}: 'data.manifest.data.manifest' file {cfg.data.manifest.data.manifest} not found.")
    if cfg.folds == 1 or cfg.folds < 0:
        raise ConfigError(f"{path}: 'folds' is {cfg.folds}; use 0 (one split per site) or k >= 2 (k-fold CV).")
    if cfg.fold is not None and not 0 <= cfg.fold < max(cfg.folds, 1):
        raise ConfigError(f"{path}: 'fold' is {cfg.fold} but folds is {cfg.folds}; use 0..{cfg.folds - 1} with "
                          "folds >= 2, or remove 'fold'.")
    if cfg.fold_workers < 1 or (cfg.fold_workers > 1 and cfg.engine == "ray"):
        raise ConfigError(f"{path}: 'fold_workers' is {cfg.fold_workers}; use >= 1, and 1 with engine: ray (Ray "
                          "runs the sites in parallel itself).")
    if cfg.seeds and (len(set(cfg.seeds)) != len(cfg.seeds) or cfg.folds >= 2):
        raise ConfigError(f"{path}: 'seeds' is {cfg.seeds}; give distinct seeds, and not together with folds "
                          "(cross-validation already repeats the run).")
    if cfg.folds >= 2 and cfg.data.source == "digits" and cfg.data.digits.site_train_bags is not None:
        raise ConfigError(f"{path}: 'data.digits.site_train_bags' is set but cross-validation (folds: {cfg.folds}) pools "
                          "each site's train, val and test bags and trains on k-1 folds of that pool, so a site's "
                          "training size is set by its whole pool, not by site_train_bags; remove it or set folds: 0 "
                          "(the other hospital options, shift, label skew, bag sizes and site_split, apply in both).")
    if cfg.seed_workers < 1 or (cfg.seed_workers > 1 and cfg.engine == "ray"):
        raise ConfigError(f"{path}: 'seed_workers' is {cfg.seed_workers}; use >= 1, and 1 with engine: ray (Ray "
                          "runs the sites in parallel itself).")
    return cfg
