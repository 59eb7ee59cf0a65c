"""The virtual sites of a simulation and the ClientApp's data provider for them."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from tdamil.client.client_app import SiteRuntime
from tdamil.config import ConfigError
from tdamil.data.digits import make_digits_sites
from tdamil.federation.data import cohort_datasets, load_manifest_frame, split_datasets
from tdamil.federation.task import SiteData
from tdamil.security.dp import dp_client_mods
from tdamil.simulation.config import SimConfig
from tdamil.simulation.folds import fold_datasets
from tdamil.simulation.resources import record_placement

__all__ = ["SimSites", "build_sites", "SimSiteProvider"]


@dataclass
class SimSites:
    sites: dict[str, SiteData]
    held_out: dict[str, Any]
    in_dim: int


def build_sites(cfg: SimConfig) -> SimSites:
    """The simulated sites and held-out cohorts described by ``cfg.data`` (of fold ``cfg.fold`` with folds)."""
    if cfg.folds >= 2:
        return SimSites(*fold_datasets(cfg, cfg.fold or 0))
    if cfg.data.source == "digits":
        d = cfg.data.digits
        made = make_digits_sites(d.bags, d.num_sites, label_skew=d.label_skew, size_skew=d.size_skew,
                                 site_test_bags=d.site_test_bags, held_out_fraction=d.held_out_fraction,
                                 site_train_bags=d.site_train_bags, site_positive_fractions=d.site_positive_fractions,
                                 site_mean_bag_sizes=d.site_mean_bag_sizes, feature_offset=d.feature_offset,
                                 feature_scale=d.feature_scale, site_split=tuple(d.site_split))
        sites = {name: SiteData(name, s.train, s.val, s.test, extra=dict(s.info)) for name, s in made.items()}
        first = next(iter(made.values())).train
        return SimSites(sites, {"held_out": made.held_out}, int(first.in_dim))
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
    (deterministically, from the config) in each process that needs them: a Ray actor receives the
    config, never arrays, and its sites read their bags from the feature files one at a time.
    ``placement``: a file where each call notes where the site ran (Ray engine)."""

    def __init__(self, cfg: SimConfig, sites: Optional[SimSites] = None, placement: Optional[Path] = None) -> None:
        self.cfg = cfg
        self._sites = sites
        self.placement = placement

    def __getstate__(self) -> dict[str, Any]:
        return {"cfg": self.cfg, "_sites": None, "placement": self.placement}

    def __call__(self, context: Any) -> SiteRuntime:
        if self._sites is None:
            self._sites = build_sites(self.cfg)
        names = list(self._sites.sites)
        site = context.node_config.get("site")
        if site is None:
            site = names[int(context.node_config["partition-id"]) % len(names)]
        if self.placement is not None:
            record_placement(self.placement, str(site), self.cfg.train.device)
        mods = list(dp_client_mods(self.cfg.privacy)) if self.cfg.privacy.enabled else []
        return SiteRuntime(name=str(site), data=self._sites.sites[str(site)], train_cfg=self.cfg.train, train_mods=mods)
