"""The coordinator's YAML (``configs/server.yaml``), validated before anything starts.

Sections::

    output_dir: runs/federation       # checkpoints, metrics, audit log, plots
    model: {name: tdamil, dim: 512, depth: 2, num_heads: 8}   # tdamil.models config
    in_dim: 1024                      # feature width of the sites' encoder (UNI: 1024)
    num_classes: 2
    contract: {encoder: uni, ...}     # tdamil.data.contract.FeatureContract: what every site's features
                                      # must record (null = the width in_dim only)
    versions: {torch_min: "2.4"}      # tdamil.federation.versions.VersionsConfig: sites' software
    federation: {...}                 # tdamil.federation.config.FederationConfig
    checkpoint: {...}                 # tdamil.federation.config.CheckpointConfig
    evaluation: {data: {...}, cohorts: [...]}   # held-out cohorts evaluated at the coordinator
    superlink: {address: "0.0.0.0:9092", ...}   # where sites connect
    tls: {ca_cert, cert, key}         # tdamil.security.config.TLSConfig
    auth: {enabled, site_public_keys} # tdamil.security.config.ServerAuthConfig
    privacy: {enabled, ...}           # tdamil.security.config.PrivacyConfig
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Optional

from tdamil.config import ConfigError, load_config
from tdamil.data.config import DataConfig
from tdamil.data.contract import FeatureContract
from tdamil.federation.config import CheckpointConfig, FederationConfig
from tdamil.federation.versions import VersionsConfig
from tdamil.net import split_host_port
from tdamil.security.config import PrivacyConfig, ServerAuthConfig, TLSConfig

logger = logging.getLogger(__name__)

__all__ = ["ServerConfig", "SuperLinkConfig", "HeldOutConfig", "load_server_config", "validate_model"]


@dataclass
class SuperLinkConfig:
    """Network settings of the coordinator.

    address:       the public fleet address sites dial (``host:port``; ``0.0.0.0:9092`` = all
                   interfaces). Only the Fleet API is served there (a gateway forwards /v1/fleet/*).
    internal_port: port of the SuperLink itself on 127.0.0.1 (Flower 1.42 serves the Fleet, Control
                   and Runtime APIs on one port; it is never exposed).
    database:      SuperLink state database (null = in memory).
    """

    address: str = "0.0.0.0:9092"
    internal_port: int = 9093
    database: Optional[Path] = None

    def __post_init__(self) -> None:
        _, port = split_host_port(self.address, "superlink.address")
        if not 0 < self.internal_port < 65536:
            raise ValueError("superlink.internal_port must be a TCP port (1-65535)")
        if port == self.internal_port:
            raise ValueError("superlink.address port and superlink.internal_port must differ")


@dataclass
class HeldOutConfig:
    """Held-out cohorts the coordinator evaluates the global model on (round 0 and every round).

    data:     a manifest + feature cache at the coordinator (``DataConfig``); null = none.
    cohorts:  values of the manifest's ``cohort`` column to evaluate (null = every cohort).
    """

    data: Optional[DataConfig] = None
    cohorts: Optional[list[str]] = None


@dataclass
class ServerConfig:
    """The coordinator's whole YAML (see the module docstring).

    contract: the federation's feature contract (:mod:`tdamil.data.contract`); after loading it is
              never None and its ``feature_dim`` is ``in_dim`` (given both, they must be equal).
    versions: what sites must run (:mod:`tdamil.federation.versions`).
    """

    model: dict[str, Any]
    in_dim: int = 1024
    num_classes: int = 2
    contract: Optional[FeatureContract] = None
    versions: VersionsConfig = field(default_factory=VersionsConfig)
    output_dir: Path = Path("runs/federation")
    federation: FederationConfig = field(default_factory=FederationConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    evaluation: HeldOutConfig = field(default_factory=HeldOutConfig)
    superlink: SuperLinkConfig = field(default_factory=SuperLinkConfig)
    tls: TLSConfig = field(default_factory=TLSConfig)
    auth: ServerAuthConfig = field(default_factory=ServerAuthConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)

    def __post_init__(self) -> None:
        if self.in_dim < 1 or self.num_classes < 2:
            raise ValueError("in_dim must be >= 1 and num_classes >= 2")
        if self.contract is None or self.contract.feature_dim is None:  # the width is always part of it
            self.contract = replace(self.contract or FeatureContract(), feature_dim=self.in_dim)
        elif self.contract.feature_dim != self.in_dim:
            raise ValueError(f"contract.feature_dim is {self.contract.feature_dim} but in_dim is {self.in_dim}: the "
                             "model takes the features the contract describes. Make them equal (or leave "
                             "contract.feature_dim out)")


def validate_model(model: dict[str, Any], source: str) -> None:
    from tdamil.models import model_config_from_dict  # noqa: PLC0415

    model_config_from_dict(model, source=f"{source}: model")


def load_server_config(path: str | Path, *, check_files: bool = True) -> ServerConfig:
    """Load and validate ``configs/server.yaml`` (keys, types, model config; with ``check_files`` the
    held-out data must exist). TLS and node-auth files are the coordinator's precondition check
    (:func:`tdamil.security.preflight.check_coordinator_security`)."""
    path = Path(path)
    cfg = load_config(path, ServerConfig)
    validate_model(cfg.model, str(path))
    _check_encoder_width(cfg, path)
    cfg.output_dir = Path(cfg.output_dir).resolve()  # logs show /srv/runs/x, not /srv/configs/../runs/x
    ev = cfg.evaluation.data
    if check_files and ev is not None and not Path(ev.manifest).is_file():
        raise ConfigError(f"{path}: 'evaluation.data.manifest' file {ev.manifest} not found. Fix the path or "
                          "remove the evaluation section.")
    return cfg


def _check_encoder_width(cfg: ServerConfig, path: Path) -> None:
    """A contract naming a registered encoder must have that encoder's width (a typo here would
    otherwise refuse every site's files)."""
    from tdamil.wsi.encoders import EncoderError, get_spec  # noqa: PLC0415 - torch only, no timm

    assert cfg.contract is not None
    if cfg.contract.encoder is None:
        return
    try:
        spec = get_spec(cfg.contract.encoder)
    except EncoderError:
        logger.warning("%s: contract.encoder %r is not one of tdamil-extract's encoders; sites must extract "
                       "with another tool that writes this name into their feature files.", path, cfg.contract.encoder)
        return
    if spec.dim != cfg.in_dim:
        raise ConfigError(f"{path}: contract.encoder {spec.name} gives {spec.dim} features per patch but in_dim is "
                          f"{cfg.in_dim}. Set in_dim: {spec.dim}, or name the encoder the sites use.")
