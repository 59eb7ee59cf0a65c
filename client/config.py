"""A hospital site's YAML (``configs/sites/<site>.yaml``), validated before anything starts.

Sections (each owned by its component)::

    site: site_a
    data: {manifest: ..., features_dir: ..., slides_dir: ...}     # tdamil.data.config.DataConfig
    extraction: {encoder: uni, weights: ..., ...}                 # tdamil.wsi ExtractionConfig
    train: {...}                                                  # tdamil.train.engine.TrainConfig
    federation: {superlink: "coordinator.example.org:9092", ...}  # SiteFederationConfig (below)
    tls: {ca_cert: ...}                                           # tdamil.security.config.TLSConfig
    auth: {private_key: ...}                                      # tdamil.security.config.SiteAuthConfig
    privacy: {enabled: false, ...}                                # tdamil.security.config.PrivacyConfig
    contract: {encoder: uni, ...}        # optional: the federation's feature contract, checked before joining
    accept_unlabelled_features: false    # true: take feature files without encoder/magnification attrs on trust
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from tdamil.config import ConfigError, from_dict, load_config
from tdamil.data.config import DataConfig
from tdamil.data.contract import FeatureContract
from tdamil.net import split_host_port
from tdamil.security.config import PrivacyConfig, SiteAuthConfig, TLSConfig, check_site_name
from tdamil.train.engine import TrainConfig

__all__ = ["SiteConfig", "SiteFederationConfig", "load_site_config", "site_config_path"]


@dataclass
class SiteFederationConfig:
    """How the site reaches the coordinator.

    superlink:        the coordinator's fleet address ``host:port`` (outbound connection only).
    runtime_port:     local port of this SuperNode's runtime API on 127.0.0.1 (9094; give each site
                      on one machine its own).
    max_retries:      reconnection attempts of one SuperNode before it exits (10); ``tdamil-client``
                      then starts a fresh one (backoff 2-30 s), so a restarted coordinator is
                      found again quickly (null = Flower's own endless backoff).
    max_wait_time_s:  total time to keep reconnecting (null = no limit).
    extract_missing:  extract features of slides without cached features before joining (true).
    val_fraction / test_fraction / split_seed: patient-level split when the manifest has no
                      ``split`` column.
    cpu_threads:      cap torch's CPU threads in the training processes (null = torch's default).
    poll_interval_s:  how often an idle SuperNode asks the coordinator for work (1.0; Flower's own
                      loop waits 3 s, which every round's message waited for, 1.5 s on average;
                      0.1-3, :mod:`tdamil.client.supernode_poll`).
    warm_start:       fork each message's ClientApp from a process that imported the training stack
                      once (true; :mod:`tdamil.client.warm_start`). false: Flower's default, a fresh
                      ``flwr-clientapp`` process per message (slower by the imports, every round).
    """

    superlink: str = "127.0.0.1:9092"
    runtime_port: int = 9094
    max_retries: Optional[int] = 10
    max_wait_time_s: Optional[float] = None
    extract_missing: bool = True
    val_fraction: float = 0.15
    test_fraction: float = 0.15
    split_seed: int = 0
    cpu_threads: Optional[int] = None
    poll_interval_s: float = 1.0
    warm_start: bool = True

    def __post_init__(self) -> None:
        split_host_port(self.superlink, "federation.superlink")
        if not 0 < self.runtime_port < 65536:
            raise ValueError("federation.runtime_port must be a TCP port (1-65535)")
        if not 0.1 <= self.poll_interval_s <= 3.0:
            raise ValueError(f"federation.poll_interval_s must be between 0.1 and 3 seconds, got {self.poll_interval_s}")


@dataclass
class SiteConfig:
    """The whole site YAML (see the module docstring).

    contract:                   the feature contract the site expects to join (a copy of the
                                coordinator's, :mod:`tdamil.data.contract`): ``tdamil-client --check``
                                and start-up check every feature file against it (null = no check
                                before joining; the coordinator's contract is checked in the rounds).
    accept_unlabelled_features: accept feature files that do not record a field the contract pins
                                (CLAM / TRIDENT caches without tdamil-fl's attrs), with a loud warning
                                (false: such files are refused with the fix).
    """

    site: str
    data: DataConfig
    extraction: Optional[dict[str, Any]] = None
    train: TrainConfig = field(default_factory=lambda: TrainConfig(progress=False))
    federation: SiteFederationConfig = field(default_factory=SiteFederationConfig)
    tls: TLSConfig = field(default_factory=TLSConfig)
    auth: SiteAuthConfig = field(default_factory=SiteAuthConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    contract: Optional[FeatureContract] = None
    accept_unlabelled_features: bool = False

    def __post_init__(self) -> None:
        check_site_name(self.site)  # the rule tdamil-certs applies: a name valid here gets its key there


def site_config_path(site: str, configs_dir: str | Path = "configs/sites") -> Path:
    return Path(configs_dir) / f"{site}.yaml"


def load_site_config(path: str | Path, *, check_files: bool = True,
                     extraction: bool = True) -> tuple[SiteConfig, Any]:
    """Load and validate a site YAML; returns ``(SiteConfig, ExtractionConfig | None)``.

    With ``check_files`` the manifest must exist. The TLS CA and the site key are the site's
    precondition check (:func:`tdamil.security.preflight.check_site_security`). ``extraction=False``
    (the ClientApp, which only reads cached features) leaves the ``extraction`` section unparsed, so
    the extraction stack (encoders, OpenCV tissue masks) is not imported in every round's process.
    """
    path = Path(path)
    cfg = load_config(path, SiteConfig)
    parsed = None
    if extraction and cfg.extraction is not None:
        from tdamil.wsi import ExtractionConfig  # noqa: PLC0415 - heavy; only where extraction runs

        parsed = from_dict(ExtractionConfig, cfg.extraction, source=f"{path}: extraction",
                           base_dir=path.resolve().parent)
        _check_extraction_fits(cfg.contract, parsed, path)
    if check_files and not Path(cfg.data.manifest).is_file():
        raise ConfigError(f"{path}: 'data.manifest' file {cfg.data.manifest} not found. Fix the path "
                          "(relative paths are relative to the YAML file).")
    return cfg, parsed


def _check_extraction_fits(contract: Optional[FeatureContract], extraction: Any, path: Path) -> None:
    """The site's own extraction settings must produce what its contract expects (or every file it
    extracts would be refused later)."""
    if contract is None:
        return
    ours = FeatureContract(encoder=extraction.encoder, target_magnification=extraction.target_magnification,
                           patch_size=extraction.patch_size)
    for name, want, found in contract.differences(ours):
        raise ConfigError(f"{path}: extraction.{name} is {found}, but contract.{name} is {want}: tdamil-extract "
                          f"would write features the contract refuses. Set extraction.{name}: {want}, or fix the "
                          "contract (copy the coordinator's).")
