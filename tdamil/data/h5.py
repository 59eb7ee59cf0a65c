"""Patch-feature files: one slide's features and patch coordinates.

Layout written by :func:`write_features` (readable by TRIDENT- and CLAM-style loaders)::

    /features   float32 (N, D), chunked by ~1024 rows
    /coords     int64   (N, 2), level-0 top-left (x, y) of each patch
    /padded     uint8   (N,), optional: 1 where the patch reaches past the slide's edge and was
                padded with white (background), as CLAM's padding does; attr ``n_padded`` counts them
    attrs       on the file root and, as TRIDENT does, on ``/coords``:
                patch_size, patch_size_level0, level0_magnification, target_magnification,
                overlap, level0_width, level0_height, name, plus this project's
                encoder, encoder_dim, weights_sha256, mpp, read_level, settings_hash, ...

:func:`read_features` reads that layout, CLAM's h5 (``features`` + ``coords`` with attrs
``patch_level``/``patch_size``) and CLAM's ``.pt`` files (a ``(N, D)`` tensor, no coordinates).
Every problem raises :class:`FeatureFileError`, whose message names the file, what is wrong and
how to fix it.

Files are written to a temporary file in the same folder and renamed into place, so a crash or
a killed process never leaves a half-written ``<slide_id>.h5`` that looks finished.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np

from tdamil.atomic import atomic_path

logger = logging.getLogger(__name__)

__all__ = [
    "FeatureBag",
    "FeatureFileError",
    "write_features",
    "read_features",
    "read_attrs",
    "read_header",
    "TRIDENT_ATTRS",
    "CHUNK_ROWS",
]

#: Attributes TRIDENT writes on ``coords``; :func:`write_features` warns when one is missing.
TRIDENT_ATTRS = (
    "patch_size",
    "patch_size_level0",
    "level0_magnification",
    "target_magnification",
    "overlap",
    "level0_width",
    "level0_height",
    "name",
)

#: Rows per HDF5 chunk of ``features`` (reading a few patches never decompresses the whole slide).
CHUNK_ROWS = 1024

_H5_SUFFIXES = (".h5", ".hdf5", ".hdf")
_PT_SUFFIXES = (".pt", ".pth")


class FeatureFileError(ValueError):
    """A feature file is missing, unreadable or malformed. The message names the file and the fix."""


@dataclass
class FeatureBag:
    """The content of one feature file.

    features: float32 ``(N, D)``.
    coords:   int64 ``(N, 2)`` level-0 top-left ``(x, y)``, or ``None`` (CLAM ``.pt`` files).
    attrs:    plain Python values (str, int, float, bool, lists); empty for ``.pt`` files.
    padded:   bool ``(N,)``: the patch was padded with white past the slide's edge; ``None`` when
              the file does not say (CLAM, TRIDENT, older files).
    """

    features: np.ndarray
    coords: Optional[np.ndarray]
    attrs: dict[str, Any] = field(default_factory=dict)
    padded: Optional[np.ndarray] = None

    def __len__(self) -> int:
        return int(self.features.shape[0])

    @property
    def dim(self) -> int:
        """Feature dimension ``D``."""
        return int(self.features.shape[1])


# --------------------------------------------------------------------------------------------
# writing
# --------------------------------------------------------------------------------------------
def write_features(
    path: str | os.PathLike,
    features: np.ndarray,
    coords: np.ndarray,
    attrs: Optional[dict[str, Any]] = None,
    padded: Optional[np.ndarray] = None,
) -> Path:
    """Write one slide's features and coordinates to ``path`` atomically; returns the path.

    ``padded`` (bool ``(N,)``, optional) marks patches padded with background past the slide's
    edge; stored as the extra dataset ``padded`` (CLAM/TRIDENT readers ignore it) plus the attr
    ``n_padded``.
    ``features`` must be finite floats ``(N, D)`` (stored as float32); ``coords`` integers
    ``(N, 2)`` (stored as int64, level-0 top-left x, y). ``attrs`` values may be str, int,
    float, bool, None (skipped), lists/arrays of numbers, or dicts (stored as JSON text).
    The data go to a temporary file in the same folder which then replaces ``path`` in one
    ``os.replace``; on any error the temporary file is removed and ``path`` is untouched.
    """
    import h5py

    path = Path(path)
    attrs = dict(attrs or {})
    feats = np.asarray(features)
    xy = np.asarray(coords)
    if feats.ndim != 2:
        raise ValueError(f"{path}: features must be a 2-D array (N patches, D dims), got shape {feats.shape}.")
    if not np.issubdtype(feats.dtype, np.floating):
        raise ValueError(f"{path}: features must be floating point, got dtype {feats.dtype}.")
    if xy.ndim != 2 or xy.shape[1] != 2 or xy.shape[0] != feats.shape[0]:
        raise ValueError(
            f"{path}: coords must have shape (N, 2) with N = {feats.shape[0]} (one x,y per feature row), "
            f"got {xy.shape}."
        )
    if xy.size and not np.issubdtype(xy.dtype, np.integer):
        if not np.all(np.equal(np.mod(xy, 1), 0)):
            raise ValueError(f"{path}: coords must be whole pixel positions, got non-integer values.")
    feats = feats.astype(np.float32, copy=False)
    if feats.size and not np.isfinite(feats).all():
        bad = int((~np.isfinite(feats)).any(axis=1).sum())
        raise ValueError(
            f"{path}: {bad} feature rows hold NaN or inf; the encoder produced invalid numbers "
            "(check the weights file and the input normalisation)."
        )
    xy = xy.astype(np.int64, copy=False)
    if padded is not None:
        padded = np.asarray(padded, dtype=bool).reshape(-1)
        if padded.shape[0] != feats.shape[0]:
            raise ValueError(f"{path}: padded must have one flag per feature row ({feats.shape[0]}), got {padded.shape[0]}.")
        attrs["n_padded"] = int(padded.sum())
    missing = [k for k in TRIDENT_ATTRS if k not in attrs]
    if missing:
        logger.debug("%s: TRIDENT attributes not given: %s", path, ", ".join(missing))

    n, d = feats.shape
    with atomic_path(path) as tmp:
        with h5py.File(tmp, "w") as f:
            if n > 0:
                rows = min(CHUNK_ROWS, n)
                f.create_dataset("features", data=feats, chunks=(rows, max(d, 1)) if d else None)
                f.create_dataset("coords", data=xy, chunks=(rows, 2))
            else:  # empty bag: chunked, resizable datasets of zero rows
                f.create_dataset("features", shape=(0, d), maxshape=(None, d), dtype=np.float32, chunks=(1, max(d, 1)))
                f.create_dataset("coords", shape=(0, 2), maxshape=(None, 2), dtype=np.int64, chunks=(1, 2))
            if padded is not None:
                f.create_dataset("padded", data=padded.astype(np.uint8))
            for key, value in attrs.items():
                stored = _to_h5_attr(value)
                if stored is None:
                    continue
                f.attrs[key] = stored
                f["coords"].attrs[key] = stored
    logger.debug("wrote %s: %d x %d features", path, n, d)
    return path


def _to_h5_attr(value: Any) -> Any:
    if value is None:
        return None
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, dict):
        return json.dumps(value, sort_keys=True, default=str)
    if isinstance(value, (list, tuple)):
        if all(isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool) for v in value):
            return np.asarray(value)
        return json.dumps(list(value), default=str)
    if isinstance(value, (str, bool, int, float, np.integer, np.floating, np.bool_, np.ndarray)):
        return value
    return str(value)


def _from_h5_attr(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    if isinstance(value, np.ndarray):
        if value.dtype.kind in ("S", "O"):
            return [_from_h5_attr(v) for v in value.tolist()]
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return value


# --------------------------------------------------------------------------------------------
# reading
# --------------------------------------------------------------------------------------------
_FIX_REEXTRACT = "delete it and run `tdamil-extract` for this site again to rebuild it"


def read_attrs(path: str | os.PathLike) -> dict[str, Any]:
    """Only the attributes of an h5 feature file (cheap: no feature rows are read).

    Raises :class:`FeatureFileError` when the file is missing or not HDF5. ``.pt`` files have no
    attributes and give ``{}``.
    """
    import h5py

    path = Path(path)
    _check_exists(path)
    if path.suffix.lower() in _PT_SUFFIXES:
        return {}
    try:
        with h5py.File(path, "r") as f:
            return _collect_attrs(f)
    except OSError as exc:
        raise FeatureFileError(f"{path}: not a readable HDF5 feature file ({exc}); {_FIX_REEXTRACT}.") from None


def read_header(path: str | os.PathLike) -> tuple[dict[str, Any], tuple[int, ...]]:
    """The attributes and the shape of ``features`` (``(N, D)``), without reading feature rows.

    h5: one open, metadata only. CLAM ``.pt`` files have no attributes (``{}``) and no header: their
    tensor is read to learn its shape.
    """
    import h5py

    path = Path(path)
    _check_exists(path)
    if path.suffix.lower() in _PT_SUFFIXES:
        return {}, (len(bag := _read_pt(path)), bag.dim)
    try:
        with h5py.File(path, "r") as f:
            if "features" not in f:
                raise FeatureFileError(f"{path}: no 'features' dataset; {_FIX_REEXTRACT}.")
            shape = tuple(int(n) for n in f["features"].shape)
            if len(shape) == 3 and shape[0] == 1:
                shape = shape[1:]
            return _collect_attrs(f), shape
    except OSError as exc:
        raise FeatureFileError(f"{path}: not a readable HDF5 feature file ({exc}); {_FIX_REEXTRACT}.") from None


def read_features(path: str | os.PathLike) -> FeatureBag:
    """Read one slide's feature file: this project's/TRIDENT's h5, CLAM's h5 or CLAM's ``.pt``.

    Returns a :class:`FeatureBag` with float32 features ``(N, D)`` and int64 coords ``(N, 2)``
    (``None`` for ``.pt``). A leading batch axis of size 1 (``(1, N, D)``) is squeezed.
    Raises :class:`FeatureFileError` (a ``ValueError``) naming the file, the problem and the fix.
    """
    path = Path(path)
    _check_exists(path)
    suffix = path.suffix.lower()
    if suffix in _PT_SUFFIXES:
        return _read_pt(path)
    if suffix in _H5_SUFFIXES or _looks_like_hdf5(path):
        return _read_h5(path)
    raise FeatureFileError(
        f"{path}: unknown feature file type '{suffix}'. Use .h5 (TRIDENT/CLAM/tdamil layout) or .pt "
        "(CLAM torch tensor); rename the file if it has the wrong extension."
    )


def _check_exists(path: Path) -> None:
    if not path.exists():
        raise FeatureFileError(
            f"{path}: feature file not found. Run `tdamil-extract --site <site>` (or set the site's "
            "data.slides_dir so the client extracts missing slides) or fix data.features_dir."
        )
    if path.is_dir():
        raise FeatureFileError(f"{path}: is a folder, expected one feature file per slide (<slide_id>.h5).")


def _looks_like_hdf5(path: Path) -> bool:
    try:
        with open(path, "rb") as fh:
            return fh.read(8) == b"\x89HDF\r\n\x1a\n"
    except OSError:
        return False


def _collect_attrs(f: Any) -> dict[str, Any]:
    attrs: dict[str, Any] = {}
    # later sources win: coords attrs (TRIDENT/CLAM), then features attrs, then the root.
    for node in ("coords", "features"):
        if node in f:
            attrs.update({k: _from_h5_attr(v) for k, v in f[node].attrs.items()})
    attrs.update({k: _from_h5_attr(v) for k, v in f.attrs.items()})
    return attrs


def _read_h5(path: Path) -> FeatureBag:
    import h5py

    try:
        f = h5py.File(path, "r")
    except OSError as exc:
        raise FeatureFileError(
            f"{path}: not a readable HDF5 file ({exc}); it may be truncated or corrupt: {_FIX_REEXTRACT}."
        ) from None
    with f:
        if "features" not in f:
            keys = ", ".join(sorted(f.keys())) or "none"
            raise FeatureFileError(
                f"{path}: no 'features' dataset (datasets found: {keys}). Expected the TRIDENT/CLAM layout "
                f"with 'features' (N, D) and 'coords' (N, 2); {_FIX_REEXTRACT}."
            )
        try:
            feats = np.asarray(f["features"][()])
            xy = np.asarray(f["coords"][()]) if "coords" in f else None
            padded = np.asarray(f["padded"][()]).astype(bool) if "padded" in f else None
        except (OSError, KeyError, TypeError) as exc:
            raise FeatureFileError(f"{path}: could not read its datasets ({exc}); {_FIX_REEXTRACT}.") from None
        attrs = _collect_attrs(f)
    feats = _check_features(path, feats)
    if xy is not None:
        if xy.ndim == 3 and xy.shape[0] == 1:
            xy = xy[0]
        if xy.ndim != 2 or xy.shape[1] != 2 or xy.shape[0] != feats.shape[0]:
            raise FeatureFileError(
                f"{path}: 'coords' has shape {xy.shape} but 'features' has {feats.shape[0]} rows; "
                f"expected ({feats.shape[0]}, 2). The file is inconsistent: {_FIX_REEXTRACT}."
            )
        if xy.size and not np.issubdtype(xy.dtype, np.integer):
            if not np.all(np.isfinite(xy)):
                raise FeatureFileError(f"{path}: 'coords' holds NaN/inf values; {_FIX_REEXTRACT}.")
        xy = xy.astype(np.int64, copy=False)
    if padded is not None and padded.shape != (feats.shape[0],):
        raise FeatureFileError(f"{path}: 'padded' has shape {padded.shape}, expected ({feats.shape[0]},); {_FIX_REEXTRACT}.")
    return FeatureBag(features=feats, coords=xy, attrs=attrs, padded=padded)


def _read_pt(path: Path) -> FeatureBag:
    import torch

    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a bad file (pickle, zip, EOF)
        raise FeatureFileError(
            f"{path}: not a readable torch file ({type(exc).__name__}: {exc}); {_FIX_REEXTRACT} "
            "(or convert it to a (N, D) tensor saved with torch.save)."
        ) from None
    coords = None
    if isinstance(obj, dict):
        if "features" not in obj:
            raise FeatureFileError(
                f"{path}: a dict without a 'features' entry (keys: {', '.join(map(str, obj))}). CLAM .pt files "
                "hold one (N, D) tensor; save the features tensor itself or under the key 'features'."
            )
        coords = obj.get("coords")
        obj = obj["features"]
    if not isinstance(obj, torch.Tensor):
        raise FeatureFileError(
            f"{path}: holds a {type(obj).__name__}, expected a (N, D) float tensor as CLAM writes; "
            "save the features with torch.save(tensor, path)."
        )
    feats = _check_features(path, obj.detach().to(torch.float32).numpy())
    xy = None
    if coords is not None:
        xy = np.asarray(coords.numpy() if isinstance(coords, torch.Tensor) else coords)
        if xy.shape != (feats.shape[0], 2):
            raise FeatureFileError(f"{path}: 'coords' has shape {xy.shape}, expected ({feats.shape[0]}, 2).")
        xy = xy.astype(np.int64)
    return FeatureBag(features=feats, coords=xy, attrs={})


def _check_features(path: Path, feats: np.ndarray) -> np.ndarray:
    if feats.ndim == 3 and feats.shape[0] == 1:
        feats = feats[0]
    if feats.ndim != 2:
        raise FeatureFileError(
            f"{path}: 'features' has shape {feats.shape}, expected 2-D (N patches, D dims); {_FIX_REEXTRACT}."
        )
    if not (np.issubdtype(feats.dtype, np.floating) or np.issubdtype(feats.dtype, np.integer)):
        raise FeatureFileError(f"{path}: 'features' has dtype {feats.dtype}, expected float; {_FIX_REEXTRACT}.")
    feats = feats.astype(np.float32, copy=False)
    if feats.size and not np.isfinite(feats).all():
        bad = int((~np.isfinite(feats)).any(axis=1).sum())
        raise FeatureFileError(
            f"{path}: {bad} of {feats.shape[0]} feature rows hold NaN or inf; the encoder output was invalid. "
            f"Check the encoder weights and {_FIX_REEXTRACT}."
        )
    return feats
