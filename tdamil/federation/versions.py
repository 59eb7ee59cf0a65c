"""Version handshake: a site tells the coordinator what it runs; the coordinator says what it requires.

Sites run the code installed at the site (the app bundle carries no code), so two hospitals can
train one model with different releases of tdamil-fl, Flower or torch and nothing fails until the
weights or the messages no longer fit. The coordinator sends :func:`required_versions` (plain
strings, one ConfigRecord's worth); a site answers with :func:`site_versions`; either side calls
:func:`check_versions`, which returns one line saying what to install, or ``None``.

Default requirement: the coordinator's own tdamil-fl and Flower major.minor (``==0.1.*``,
``==1.42.*``) and torch at least ``versions.torch_min``.
"""

from __future__ import annotations

import platform
from dataclasses import dataclass
from importlib import metadata
from typing import Any, Mapping, Optional

from packaging.specifiers import InvalidSpecifier, SpecifierSet
from packaging.version import InvalidVersion, Version

from tdamil import __version__

__all__ = ["VersionsConfig", "VERSION_KEYS", "required_versions", "site_versions", "check_versions"]

#: What :func:`site_versions` reports; the first three are checked by :func:`check_versions`.
VERSION_KEYS = ("tdamil-fl", "flwr", "torch", "python", "device", "precision")


@dataclass
class VersionsConfig:
    """What the coordinator requires of every site's software (``versions:`` in its YAML).

    tdamil_fl: PEP 440 specifier for the site's tdamil-fl (null = the coordinator's own
               major.minor, e.g. ``==0.1.*``).
    flwr:      the same for Flower (null = the coordinator's Flower major.minor, ``==1.42.*``).
    torch_min: the oldest torch a site may run (``2.4``; null = any).
    """

    tdamil_fl: Optional[str] = None
    flwr: Optional[str] = None
    torch_min: Optional[str] = "2.4"

    def __post_init__(self) -> None:
        for key in ("tdamil_fl", "flwr"):
            spec = getattr(self, key)
            if spec is not None:
                try:
                    SpecifierSet(spec)
                except InvalidSpecifier:
                    raise ValueError(f"versions.{key} must be a version specifier such as '==0.1.*' or '>=0.1,<0.3', "
                                     f"got {spec!r}") from None
        if self.torch_min is not None:
            try:
                Version(self.torch_min)
            except InvalidVersion:
                raise ValueError(f"versions.torch_min must be a version such as '2.4', got {self.torch_min!r}") from None


def _installed(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def _same_minor(version: str) -> str:
    v = Version(version)
    return f"=={v.major}.{v.minor}.*"


def required_versions(cfg: Optional[VersionsConfig] = None) -> dict[str, str]:
    """At the coordinator: ``{"tdamil-fl": "==0.1.*", "flwr": "==1.42.*", "torch": ">=2.4"}``."""
    cfg = cfg or VersionsConfig()
    required = {"tdamil-fl": cfg.tdamil_fl or _same_minor(__version__),
                "flwr": cfg.flwr or _same_minor(_installed("flwr"))}
    if cfg.torch_min is not None:
        required["torch"] = f">={cfg.torch_min}"
    return required


def site_versions(*, device: str = "auto", mixed_precision: bool = True) -> dict[str, str]:
    """At a site: ``{tdamil-fl, flwr, torch, python, device, precision}`` as text.

    ``device`` / ``mixed_precision`` are the site's ``train`` settings: the device it trains on
    (``cuda (NVIDIA H100 80GB HBM3)``, ``cpu``) and ``bf16`` where autocast runs, else ``fp32``.
    """
    import torch  # noqa: PLC0415 - the ClientApp has imported it already

    from tdamil.train.runtime import resolve_device  # noqa: PLC0415

    dev = resolve_device(device)
    name = str(dev)
    if dev.type == "cuda":
        name += f" ({torch.cuda.get_device_name(dev)})"
    bf16 = mixed_precision and dev.type == "cuda" and torch.cuda.is_bf16_supported()
    return {"tdamil-fl": __version__, "flwr": _installed("flwr"), "torch": torch.__version__.split("+")[0],
            "python": platform.python_version(), "device": name, "precision": "bf16" if bf16 else "fp32"}


def check_versions(site_versions: Mapping[str, Any], required: Mapping[str, str], *,
                   site: str = "this site") -> Optional[str]:
    """One line naming the first package whose version ``required`` refuses, or ``None`` when all fit.

    ``required`` maps a package to a PEP 440 specifier (:func:`required_versions`); a package the
    site does not report is refused (it runs a release from before this handshake).
    """
    for package, spec in required.items():
        found = site_versions.get(package)
        wanted = _human(str(spec))
        install = f"pip install -U '{package}{spec}'"
        if found is None:
            return (f"site {site} does not report its {package} version (a release older than the version handshake), "
                    f"the coordinator requires {package} {wanted} ({install})")
        try:
            ok = SpecifierSet(str(spec)).contains(Version(str(found)), prereleases=True)  # torch nightlies too
        except (InvalidVersion, InvalidSpecifier):
            ok = False
        if not ok:
            return f"site {site} runs {package} {found}, the coordinator requires {wanted} ({install})"
    return None


def _human(spec: str) -> str:
    """``==0.1.*`` -> ``0.1.x``; ``>=2.4`` -> ``>= 2.4``; anything else as written."""
    if spec.startswith("==") and spec.endswith(".*") and "," not in spec:
        return spec[2:-2] + ".x"
    if spec.startswith(">=") and "," not in spec:
        return ">= " + spec[2:]
    return spec
