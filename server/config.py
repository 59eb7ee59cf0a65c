"""The coordinator's YAML (``configs/server.yaml``), validated before anything starts.

Sections::

    output_dir: runs/federation       # checkpoints, metrics, audit log, plots
    model: {name: tdamil, dim: 512, depth: 2, num_heads: 8}   # tdamil.models config
    in_dim: 1024                      # feature width of the sites' encoder (UNI: 1024)
    num_classes: 2
    federation: {...}                 # tdamil.federation.config.FederationConfig
    checkpoint: {...}                 # tdamil.federation.config.CheckpointConfig
    evaluation: {data: {...}, cohorts: [...]}   # held-out cohorts evaluated at the coordinator
    superlink: {address: "0.0.0.0:9092", ...}   # where sites connect
    tls: {ca_cert, cert, key}         # tdamil.security.config.TLSConfig
    auth: {enabled, site_public_keys} # tdamil.security.config.ServerAuthConfig
    privacy: {enabled, ...}           # tdamil.security.config.PrivacyConfig
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from tdamil.config import ConfigError, load_config
from tdamil.data.config import DataConfig
from tdamil.federation.config import CheckpointConfig, FederationConfig
from tdamil.net import split_host_port
from tdamil.security.config import PrivacyConfig, ServerAuthConfig, TLSConfig

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
    """The coordinator's whole YAML (see the module docstring)."""

    model: dict[str, Any]
    in_dim: int = 1024
    num_classes: int = 2
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
    cfg.output_dir = Path(cfg.output_dir).resolve()  # logs show /srv/runs/x, not /srv/configs/../runs/x
    ev = cfg.evaluation.data
    if check_files and ev is not None and not Path(ev.manifest).is_file():
        raise ConfigError(f"{path}: 'evaluation.data.manifest' file {ev.manifest} not found. Fix the path or "
                          "remove the evaluation section.")
    return cfg
