"""The feature contract: one federation, one feature space.

Features of the same width can still come from different spaces: GigaPath and H-optimus-0 both
give 1536 numbers per patch, two releases of one encoder differ in their weights, and a site that
extracted at 40x or with 256 px patches describes other tissue per row. A model averaged over such
sites is trained on inputs that do not mean the same thing, and nothing fails. Every feature file
written by ``tdamil-extract`` records how it was made (attrs of :mod:`tdamil.data.h5`): ``encoder``,
``weights_sha256``, ``target_magnification`` and ``patch_size``. A :class:`FeatureContract` pins
the values a consortium (or a trained model) expects; :func:`check_features` compares every file's
attrs with it, reading metadata only (one h5 open per file, never the feature rows).

Where a contract lives:

* the coordinator's YAML, ``contract:`` (``server/config.py``; when omitted, just ``in_dim``);
* optionally a site's YAML, ``contract:`` (``client/config.py``), checked by ``tdamil-client --check``
  and at start-up, before the site joins;
* in messages as JSON text (:meth:`FeatureContract.to_json` / :meth:`FeatureContract.from_json`);
* in checkpoints as the plain dict ``feature_contract`` (:meth:`FeatureContract.to_dict`).

Files without these attrs (CLAM, TRIDENT, older caches) cannot show they fit: they are refused for
each attribute the contract pins, unless the site says so explicitly (``accept_unlabelled_features:
true`` in its YAML), and then accepted with a warning naming how many files were taken on trust.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional

from tdamil.data.h5 import FeatureFileError, read_header

logger = logging.getLogger(__name__)

__all__ = [
    "FeatureContract",
    "ContractError",
    "ContractOrigin",
    "ContractReport",
    "FEDERATION",
    "coordinator_origin",
    "site_origin",
    "checkpoint_origin",
    "contract_of_file",
    "contract_of_files",
    "check_features",
    "feature_paths",
]

#: Contract fields in message order; all but ``feature_dim`` are file attrs of the same name.
CONTRACT_FIELDS = ("encoder", "weights_sha256", "target_magnification", "patch_size", "feature_dim")
_ATTR_FIELDS = CONTRACT_FIELDS[:-1]


class ContractError(ValueError):
    """Features or a contract do not fit. The message is one line: site, file, attribute, expected,
    found and the fix."""


@dataclass(frozen=True)
class FeatureContract:
    """What every feature file of a federation (or of one model's inputs) must record.

    Each field may be left out (``None``), so a consortium pins what it knows; the federation's
    contract always has ``feature_dim`` (the coordinator fills it from ``in_dim``).

    feature_dim:          features per patch (the model's ``in_dim``), read from the file's shape.
    encoder:              encoder registry name (``uni``, ``uni2_h``, ``gigapath``, ``hoptimus0``,
                          ...; case-insensitive, '-' = '_', as ``tdamil.wsi.encoders.get_spec``).
    weights_sha256:       sha256 of the encoder's weights file (``tdamil-extract`` logs it and writes
                          it into every file; ``none`` for the seeded test encoder).
    target_magnification: magnification the patches were read at (20 = 0.5 um/px).
    patch_size:           patch side in pixels at that magnification (512).
    """

    feature_dim: Optional[int] = None
    encoder: Optional[str] = None
    weights_sha256: Optional[str] = None
    target_magnification: Optional[float] = None
    patch_size: Optional[int] = None

    def __post_init__(self) -> None:
        if self.feature_dim is not None and (isinstance(self.feature_dim, bool) or int(self.feature_dim) < 1):
            raise ValueError(f"contract.feature_dim must be a whole number >= 1, got {self.feature_dim!r}")
        if self.patch_size is not None and (isinstance(self.patch_size, bool) or int(self.patch_size) < 1):
            raise ValueError(f"contract.patch_size must be a whole number of pixels >= 1, got {self.patch_size!r}")
        mag = self.target_magnification
        if mag is not None and not (isinstance(mag, (int, float)) and math.isfinite(mag) and mag > 0):
            raise ValueError(f"contract.target_magnification must be a number > 0 (20 = 0.5 um/px), got {mag!r}")
        for name in ("encoder", "weights_sha256"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value.strip()):
                raise ValueError(f"contract.{name} must be non-empty text, got {value!r}")
        # one spelling per value, so equal contracts compare and serialise equal
        if self.encoder is not None:
            object.__setattr__(self, "encoder", _encoder_key(self.encoder))
        if self.weights_sha256 is not None:
            object.__setattr__(self, "weights_sha256", self.weights_sha256.strip().lower())
        if self.feature_dim is not None:
            object.__setattr__(self, "feature_dim", int(self.feature_dim))
        if self.patch_size is not None:
            object.__setattr__(self, "patch_size", int(self.patch_size))
        if mag is not None:
            object.__setattr__(self, "target_magnification", float(mag))

    def pinned(self) -> dict[str, Any]:
        """The fields this contract sets (``{name: value}``, in message order)."""
        return {name: getattr(self, name) for name in CONTRACT_FIELDS if getattr(self, name) is not None}

    def to_dict(self) -> dict[str, Any]:
        """The set fields as a plain dict (checkpoints, audit lines)."""
        return self.pinned()

    def to_json(self) -> str:
        """Compact JSON text of the set fields (one ConfigRecord value in messages)."""
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_dict(cls, data: Any, *, source: str = "feature contract") -> "FeatureContract":
        """The inverse of :meth:`to_dict`; unknown keys or bad values raise :class:`ContractError`."""
        if not isinstance(data, dict):
            raise ContractError(f"{source}: expected a mapping of {', '.join(CONTRACT_FIELDS)}, got {type(data).__name__}.")
        unknown = sorted(set(data) - set(CONTRACT_FIELDS))
        if unknown:
            raise ContractError(f"{source}: unknown field(s) {', '.join(unknown)}; a contract has "
                                f"{', '.join(CONTRACT_FIELDS)}. Update tdamil-fl on the side that reads it.")
        try:
            return cls(**data)
        except (TypeError, ValueError) as exc:
            raise ContractError(f"{source}: {exc}.") from None

    @classmethod
    def from_json(cls, text: str, *, source: str = "feature contract") -> "FeatureContract":
        """The inverse of :meth:`to_json`."""
        try:
            data = json.loads(text)
        except (TypeError, ValueError) as exc:
            raise ContractError(f"{source}: not JSON text ({exc}).") from None
        return cls.from_dict(data, source=source)

    def describe(self) -> str:
        """``encoder uni2_h, weights sha256 1a2b3c4d5e6f..., 20x, 512 px patches, 1536 features per patch``."""
        parts = []
        if self.encoder is not None:
            parts.append(f"encoder {self.encoder}")
        if self.weights_sha256 is not None:
            parts.append(f"weights sha256 {self.weights_sha256[:12]}{'...' if len(self.weights_sha256) > 12 else ''}")
        if self.target_magnification is not None:
            parts.append(f"{self.target_magnification:g}x")
        if self.patch_size is not None:
            parts.append(f"{self.patch_size} px patches")
        if self.feature_dim is not None:
            parts.append(f"{self.feature_dim} features per patch")
        return ", ".join(parts) or "no constraint"

    def differences(self, found: "FeatureContract") -> list[tuple[str, Any, Any]]:
        """``[(field, expected, found), ...]`` for each field this contract pins that ``found``
        records with another value (a field ``found`` leaves out is not a difference)."""
        return [(name, want, getattr(found, name)) for name, want in self.pinned().items()
                if getattr(found, name) is not None and not _same(name, getattr(found, name), want)]


@dataclass(frozen=True)
class ContractOrigin:
    """Who expects a contract and where it is written down, for the one-line messages.

    who:       "the federation", "this site's contract", "the model".
    where:     the key of the contract, a field name is appended: ``configs/server.yaml contract``.
    otherwise: the other way out of a mismatch: "ask the coordinator ...".
    """

    who: str
    where: str
    otherwise: str


_OVERRIDE = "accept_unlabelled_features: true"


def coordinator_origin(config: str | Path = "the coordinator's server.yaml") -> ContractOrigin:
    """The federation's contract, from the coordinator's YAML (sites pass what the message names)."""
    return ContractOrigin("the federation", f"{config} contract",
                          "ask the coordinator which extraction the federation uses")


#: The federation's contract when the site does not know the coordinator's file name.
FEDERATION = coordinator_origin()


def site_origin(config: str | Path) -> ContractOrigin:
    """The ``contract:`` section of a site's own YAML."""
    return ContractOrigin("this site's contract", f"{config} contract",
                          "fix that contract section (the coordinator's is the one that counts)")


def checkpoint_origin(path: str | Path) -> ContractOrigin:
    """The contract a checkpoint recorded of the features its model was trained on."""
    return ContractOrigin("the model", f"{path} feature_contract", "use a model trained on features like these")


@dataclass
class ContractReport:
    """What :func:`check_features` found.

    n_files:    files checked.
    expected:   the contract checked against.
    observed:   what the files record (a field no file records is ``None``); the site's features
                in one contract, e.g. to record in a checkpoint or to report to the coordinator.
    unlabelled: ``{field: [files]}`` accepted without recording a pinned field (only with
                ``allow_unlabelled_attrs``).
    """

    site: Optional[str]
    n_files: int
    expected: FeatureContract
    observed: FeatureContract
    unlabelled: dict[str, list[Path]] = field(default_factory=dict)

    def summary(self) -> str:
        who = f"site {self.site}: " if self.site else ""
        trust = (f"; {max(len(v) for v in self.unlabelled.values())} accepted without "
                 f"{'/'.join(self.unlabelled)} (unlabelled)") if self.unlabelled else ""
        return f"{who}{self.n_files} feature files fit the contract ({self.expected.describe()}){trust}"


def contract_of_file(path: str | Path) -> FeatureContract:
    """The contract one feature file records: its attrs and its width (metadata only).

    Attrs the file lacks (CLAM, TRIDENT, older caches) are ``None``. Raises
    :class:`ContractError` for an attr that holds no usable value, and lets
    :class:`~tdamil.data.h5.FeatureFileError` through for a missing or unreadable file.
    """
    attrs, shape = read_header(path)
    values: dict[str, Any] = {name: _attr_value(path, name, attrs.get(name)) for name in _ATTR_FIELDS}
    values["feature_dim"] = int(shape[-1]) if len(shape) == 2 and shape[-1] > 0 else None
    try:
        return FeatureContract(**values)
    except ValueError as exc:
        raise ContractError(f"{path}: its attributes are not a usable record ({exc}); re-extract it with "
                            "tdamil-extract.") from None


def contract_of_files(paths: Iterable[str | Path], *, site: Optional[str] = None) -> FeatureContract:
    """The one contract a set of files shares (``tdamil-train`` records it in its checkpoints).

    Every file must record the same values where it records one; the first that differs raises
    :class:`ContractError` (one line). Fields no file records stay ``None``.
    """
    return check_features(paths, FeatureContract(), site=site).observed


def check_features(paths: Iterable[str | Path], contract: FeatureContract, *, site: Optional[str],
                   allow_unlabelled_attrs: bool = False, origin: ContractOrigin = FEDERATION) -> ContractReport:
    """Check that every feature file fits ``contract``, and that the files agree among themselves.

    For each field the contract pins, a file recording another value is refused; a file recording
    nothing for it is refused too unless ``allow_unlabelled_attrs`` (the site's
    ``accept_unlabelled_features``), then accepted with a warning. For each field the contract
    leaves open, all files recording it must record one value (one site, one extraction). Reads
    attrs and shapes only. Raises :class:`ContractError` with one line naming ``site``, the file,
    the attribute, what was expected, what was found and the fix.
    """
    expected = contract.pinned()
    first: dict[str, tuple[Any, Path]] = {}
    unlabelled: dict[str, list[Path]] = {}
    n = 0
    for raw in paths:
        path = Path(raw)
        try:
            found = contract_of_file(path)
        except (ContractError, FeatureFileError) as exc:
            raise ContractError(f"{_prefix(site)}{_one_line(exc)}") from None
        n += 1
        for name in CONTRACT_FIELDS:
            value = getattr(found, name)
            if value is None:
                if name in expected:
                    unlabelled.setdefault(name, []).append(path)
                continue
            if name in expected and not _same(name, value, expected[name]):
                raise ContractError(_mismatch(site, path, name, value, expected[name], contract, origin))
            if name not in expected and name in first and not _same(name, value, first[name][0]):
                raise ContractError(_disagreement(site, path, name, value, *first[name]))
            first.setdefault(name, (value, path))
    if unlabelled and not allow_unlabelled_attrs:
        name, files = next(iter(unlabelled.items()))
        raise ContractError(_unlabelled(site, name, files, expected[name], origin))
    observed = FeatureContract(**{name: value for name, (value, _) in first.items()})
    report = ContractReport(site, n, contract, observed, unlabelled)
    if unlabelled:
        missing = ", ".join(f"{name} ({len(files)} files)" for name, files in unlabelled.items())
        logger.warning("%sACCEPTED UNLABELLED FEATURES (%s is set): files that do not record %s were taken on "
                       "trust; whether they fit %s (%s) cannot be checked. Re-extract them with tdamil-extract "
                       "to remove the doubt.", _prefix(site), _OVERRIDE, missing, contract.describe(), origin.where)
    logger.info("%s", report.summary())
    return report


def feature_paths(datasets: Iterable[Any]) -> list[Path]:
    """The feature files of datasets read from disk (``FeatureBagDataset``: one file per slide),
    each once, in order; in-memory datasets (the digits bags) have none."""
    seen: dict[Path, None] = {}
    for ds in datasets:
        if ds is None or not callable(getattr(ds, "path", None)):
            continue
        for slide_id in ds.slide_ids:
            seen.setdefault(Path(ds.path(slide_id)), None)
    return list(seen)


# --------------------------------------------------------------------------------------------
# values and messages
# --------------------------------------------------------------------------------------------
def _encoder_key(name: str) -> str:
    """The registry's spelling (``tdamil.wsi.encoders.get_spec``: case-insensitive, '-' = '_')."""
    return name.strip().lower().replace("-", "_")


def _attr_value(path: str | Path, name: str, raw: Any) -> Any:
    if raw is None or (isinstance(raw, str) and not raw.strip()):
        return None
    try:
        if name in ("encoder", "weights_sha256"):
            return str(raw)
        if name == "patch_size":
            value = float(raw)
            if value != int(value):
                raise ValueError(raw)
            return int(value)
        return float(raw)
    except (TypeError, ValueError):
        raise ContractError(f"{path}: attribute {name} holds {raw!r}, not a usable value; re-extract the file "
                            "with tdamil-extract.") from None


def _same(name: str, found: Any, expected: Any) -> bool:
    if name == "target_magnification":
        return abs(float(found) - float(expected)) <= 1e-3 * max(1.0, abs(float(expected)))
    return found == expected


def _fmt(name: str, value: Any) -> str:
    if name == "target_magnification":
        return f"{float(value):g}"
    return repr(value) if isinstance(value, str) else str(value)


def _prefix(site: Optional[str]) -> str:
    return f"site {site}: " if site else ""


def _fix(name: str, expected: Any, contract: FeatureContract) -> str:
    tool = "Re-extract with tdamil-extract"
    if name == "encoder":
        return f"{tool} using encoder {expected}"
    if name == "weights_sha256":
        which = f"{contract.encoder} " if contract.encoder else "encoder "
        return f"{tool} using the {which}weights file whose sha256 is {expected} (extraction.weights)"
    if name == "target_magnification":
        return f"{tool} at extraction.target_magnification: {float(expected):g}"
    if name == "patch_size":
        return f"{tool} with extraction.patch_size: {expected}"
    return f"{tool} using encoder {contract.encoder}" if contract.encoder else f"{tool} using the same encoder"


def _mismatch(site: Optional[str], path: Path, name: str, found: Any, expected: Any, contract: FeatureContract,
              origin: ContractOrigin) -> str:
    return (f"{_prefix(site)}{path}: {name} is {_fmt(name, found)}, {origin.who} expects {_fmt(name, expected)} "
            f"({origin.where}.{name}). {_fix(name, expected, contract)}, or {origin.otherwise}.")


def _disagreement(site: Optional[str], path: Path, name: str, found: Any, other: Any, other_path: Path) -> str:
    return (f"{_prefix(site)}{path}: {name} is {_fmt(name, found)}, but {other_path} has {_fmt(name, other)}: "
            "one site's features must come from one extraction (same encoder, weights, magnification and patch "
            "size). Re-extract the files that differ with tdamil-extract, or point data.features_dir at one cache.")


def _unlabelled(site: Optional[str], name: str, files: list[Path], expected: Any, origin: ContractOrigin) -> str:
    more = f" (and {len(files) - 1} more files)" if len(files) > 1 else ""
    return (f"{_prefix(site)}{files[0]}{more}: records no {name} (a CLAM/TRIDENT file or an older cache?), "
            f"{origin.who} expects {_fmt(name, expected)} ({origin.where}.{name}). Re-extract with tdamil-extract, "
            f"or, if you know these features fit, set {_OVERRIDE} in the site config.")


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())
