"""The ``tls:``, ``auth:`` and ``privacy:`` sections of the server and site YAML files."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional


@dataclass
class TLSConfig:
    """Certificates for the gRPC link between the SuperLink and the SuperNodes.

    Server: ``ca_cert`` + ``cert`` + ``key`` (the server certificate must cover the address sites
    dial, 127.0.0.1 included for local runs). Site: ``ca_cert`` only (the consortium CA that signed
    the server certificate). Created with ``tdamil-certs``.
    """

    ca_cert: Optional[Path] = None
    cert: Optional[Path] = None
    key: Optional[Path] = None


@dataclass
class ServerAuthConfig:
    """SuperNode authentication at the coordinator: only registered site keys may join."""

    enabled: bool = False
    site_public_keys: Optional[Path] = None  # folder of <site>.pub (ECDSA P-384, PEM/OpenSSH)


@dataclass
class SiteAuthConfig:
    """The site's own ECDSA P-384 private key, registered with the coordinator beforehand."""

    private_key: Optional[Path] = None


@dataclass
class PrivacyConfig:
    """Client-side clipping + Gaussian noise (client-level DP) on the weights a site sends."""

    enabled: bool = False
    clipping_norm: float = 1.0
    noise_multiplier: float = 1.0
    delta: float = 1e-5

    def __post_init__(self) -> None:
        if self.clipping_norm <= 0:
            raise ValueError("privacy.clipping_norm must be > 0")
        if self.noise_multiplier < 0:
            raise ValueError("privacy.noise_multiplier must be >= 0")
        if not 0 < self.delta < 1:
            raise ValueError("privacy.delta must be between 0 and 1")


#: A site name becomes file names (``<site>.key``, ``<site>.pub``), a Flower node name and a DNS-label
#: sized certificate field: one leading letter or digit, then up to 62 more (63 in all, a DNS label).
SITE_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")


def check_site_name(site: str) -> str:
    """The one site-name rule (site YAML and ``tdamil-certs``); raises ValueError with the fix."""
    if not SITE_NAME_RE.match(site):
        raise ValueError(f"site name {site!r} is not allowed: use 1-63 letters, digits, '_', '-' or '.', starting "
                         "with a letter or digit (for example site_a).")
    return site
