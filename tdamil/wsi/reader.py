"""Whole-slide image reading behind one small interface.

:func:`open_slide` returns a :class:`Slide` whatever the backend:

* ``openslide`` (default): openslide-python with the openslide-bin wheel (SVS, TIFF, NDPI, MRXS,
  DICOM, ...), no system packages needed;
* ``tiffslide`` (optional extra ``tdamil-fl[tiffslide]``): pure-Python reader for TIFF/SVS.

Resolution comes from the slide's metadata (``openslide.mpp-x``, ``aperio.MPP``, TIFF
resolution tags) or from an explicit per-slide override. It is never guessed: a slide without a
recorded resolution raises :class:`MissingMppError` saying how to set the override.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Mapping, Optional

import cv2
import numpy as np

logger = logging.getLogger(__name__)

__all__ = [
    "Slide",
    "SlideError",
    "SlideOpenError",
    "SlideNotFoundError",
    "SlideReadError",
    "MissingMppError",
    "open_slide",
    "mpp_from_properties",
    "BACKENDS",
    "MPP_RANGE",
]

Backend = Literal["auto", "openslide", "tiffslide"]
BACKENDS = ("auto", "openslide", "tiffslide")

#: Plausible microns per pixel of a brightfield scan (100x oil ~0.1, 1.25x ~8).
MPP_RANGE = (0.05, 20.0)

_OVERRIDE_HOWTO = (
    "Set it per slide: add an 'mpp' column to the site's manifest CSV, or add "
    "`extraction: {{mpp_overrides: {{{sid}: 0.25}}}}` to the site YAML "
    "(0.25 um/px for a 40x scan, 0.5 for 20x; take the value from the scanner's report)."
)


class SlideError(ValueError):
    """A slide cannot be used. The message names the file and the fix."""


class SlideOpenError(SlideError):
    """The file is missing or is not a slide any backend can read."""


class SlideNotFoundError(SlideOpenError):
    """There is no file where the slide was expected."""


class SlideReadError(SlideError):
    """Reading pixels from an opened slide failed (e.g. a corrupt tile)."""


class MissingMppError(SlideError):
    """The slide does not record its resolution and no override was given."""


def mpp_from_properties(props: Mapping[str, str]) -> tuple[Optional[float], str]:
    """Microns per pixel from slide metadata, and where it came from.

    Looks at ``openslide.mpp-x`` / ``tiffslide.mpp-x``, then ``aperio.MPP``, then the TIFF
    resolution tags (``tiff.XResolution`` with ``tiff.ResolutionUnit`` centimeter/inch/
    millimeter/micrometer). Values outside :data:`MPP_RANGE` are ignored (scanners write 0 or 1
    when they do not know). Returns ``(None, "")`` when nothing usable is recorded.
    """
    for key in ("openslide.mpp-x", "tiffslide.mpp-x", "aperio.MPP"):
        value = _as_float(props.get(key))
        if value is not None and MPP_RANGE[0] <= value <= MPP_RANGE[1]:
            return value, key
    xres = _as_float(props.get("tiff.XResolution"))
    unit = str(props.get("tiff.ResolutionUnit", "")).lower()
    per_unit_um = {"centimeter": 1e4, "inch": 25400.0, "millimeter": 1e3, "micrometer": 1.0}
    if xres and xres > 0 and unit in per_unit_um:
        value = per_unit_um[unit] / xres
        if MPP_RANGE[0] <= value <= MPP_RANGE[1]:
            return value, f"tiff.XResolution ({unit})"
    return None, ""


def _as_float(value: Any) -> Optional[float]:
    if value is None:
        return None
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return out if np.isfinite(out) else None


@dataclass
class Slide:
    """An opened whole-slide image. Use :func:`open_slide`; close with :meth:`close` or ``with``.

    path:               the file.
    backend:            ``openslide`` or ``tiffslide``.
    dimensions:         level-0 ``(width, height)``.
    level_dimensions:   ``(width, height)`` of every pyramid level.
    level_downsamples:  downsample factor of every level relative to level 0.
    mpp:                level-0 microns per pixel.
    mpp_source:         where ``mpp`` came from (a property name or ``override``).
    properties:         the backend's metadata (text values).
    """

    path: Path
    backend: str
    dimensions: tuple[int, int]
    level_dimensions: tuple[tuple[int, int], ...]
    level_downsamples: tuple[float, ...]
    mpp: float
    mpp_source: str
    properties: dict[str, str]
    _handle: Any = None

    # ---------------------------------------------------------------------------------------
    @property
    def level_count(self) -> int:
        return len(self.level_dimensions)

    @property
    def magnification(self) -> float:
        """Level-0 magnification derived from mpp (10 / mpp; 0.25 um/px = 40x)."""
        return 10.0 / self.mpp

    def read_region(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        """RGB uint8 ``(h, w, 3)`` of ``size=(w, h)`` pixels at ``level``, top-left ``location``
        in level-0 pixels. Transparent pixels (outside the scanned area) are painted white.
        """
        try:
            if self.backend == "openslide":
                rgba = np.asarray(self._handle.read_region((int(location[0]), int(location[1])), level, size))
            else:
                rgba = np.asarray(
                    self._handle.read_region((int(location[0]), int(location[1])), level, size, as_array=True)
                )
        except Exception as exc:  # openslide raises OpenSlideError, tiffslide many kinds
            raise SlideReadError(
                f"{self.path}: reading {size[0]}x{size[1]} px at level {level}, x={location[0]}, y={location[1]} "
                f"failed ({type(exc).__name__}: {exc}). The file is probably corrupt or truncated; re-export or "
                "re-copy it from the scanner, or remove the slide from the manifest."
            ) from None
        return to_rgb_white(rgba)

    def best_level_for_downsample(self, downsample: float, tolerance: float = 0.01) -> int:
        """Deepest level whose downsample does not exceed ``downsample * (1 + tolerance)``."""
        best = 0
        for i, ds in enumerate(self.level_downsamples):
            if ds <= downsample * (1.0 + tolerance) and ds >= self.level_downsamples[best]:
                best = i
        return best

    def thumbnail(self, downsample: float = 32.0) -> tuple[np.ndarray, float]:
        """RGB thumbnail about ``downsample`` times smaller than level 0 (transparent -> white).

        Reads the deepest pyramid level not coarser than requested and resizes with area
        averaging. Returns ``(rgb, exact_downsample)`` with
        ``exact_downsample = level0_width / thumbnail_width``.
        """
        w0, h0 = self.dimensions
        tw, th = max(1, int(round(w0 / downsample))), max(1, int(round(h0 / downsample)))
        level = self.best_level_for_downsample(downsample)
        lw, lh = self.level_dimensions[level]
        rgb = self.read_region((0, 0), level, (lw, lh))
        if (lw, lh) != (tw, th):
            rgb = cv2.resize(rgb, (tw, th), interpolation=cv2.INTER_AREA)
        return rgb, w0 / tw

    def close(self) -> None:
        if self._handle is not None:
            try:
                self._handle.close()
            finally:
                self._handle = None

    def __enter__(self) -> "Slide":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:  # keep the handle out of logs
        return (
            f"Slide({self.path.name}, {self.dimensions[0]}x{self.dimensions[1]}, {self.level_count} levels, "
            f"{self.mpp:.4g} um/px from {self.mpp_source}, {self.backend})"
        )


def to_rgb_white(rgba: np.ndarray) -> np.ndarray:
    """RGBA/RGB/gray uint8 -> RGB uint8 with transparent pixels composited on white."""
    arr = np.asarray(rgba)
    if arr.ndim == 2:
        return np.repeat(arr[..., None], 3, axis=2).astype(np.uint8, copy=False)
    if arr.shape[2] == 3:
        return np.ascontiguousarray(arr, dtype=np.uint8)
    rgb = arr[..., :3].astype(np.uint16)
    alpha = arr[..., 3:4].astype(np.uint16)
    if int(alpha.min(initial=255)) == 255:
        return np.ascontiguousarray(arr[..., :3], dtype=np.uint8)
    # openslide returns un-premultiplied RGBA: out = rgb * a + 255 * (1 - a)
    out = (rgb * alpha + 255 * (255 - alpha) + 127) // 255
    return out.astype(np.uint8)


def open_slide(
    path: str | os.PathLike,
    mpp_override: Optional[float] = None,
    backend: Backend = "openslide",
    slide_id: Optional[str] = None,
    warn_override: bool = True,
) -> Slide:
    """Open a whole-slide image and resolve its resolution.

    ``mpp_override`` (microns per pixel at level 0) wins over the file's metadata; without it
    the metadata must record a resolution, else :class:`MissingMppError`. ``backend``
    ``auto`` uses tiffslide for .svs/.tif/.tiff when it is installed, openslide otherwise.
    Raises :class:`SlideOpenError` when the file is missing or not a readable slide.
    ``warn_override=False`` silences the warning about an override that contradicts the file
    (used by reading workers, after the main process has warned once).
    """
    path = Path(path)
    sid = slide_id or path.stem
    if not path.exists():
        raise SlideNotFoundError(
            f"{path}: slide file not found. Check data.slides_dir in the site YAML or the manifest's "
            "slide_path column for this slide."
        )
    if path.is_dir() and path.suffix.lower() != ".mrxs":
        raise SlideOpenError(f"{path}: is a folder, not a slide file. Point the manifest at the slide file.")
    chosen = _choose_backend(path, backend)
    handle, props, dims, level_dims, downs = _open_handle(path, chosen)
    if mpp_override is not None:
        mpp = float(mpp_override)
        if not (MPP_RANGE[0] <= mpp <= MPP_RANGE[1]):
            handle.close()
            raise SlideError(
                f"{path}: the mpp override {mpp} is not a plausible resolution (expected {MPP_RANGE[0]} to "
                f"{MPP_RANGE[1]} microns per pixel; 0.25 for 40x, 0.5 for 20x). Fix the override for slide '{sid}'."
            )
        source = "override"
        recorded, _ = mpp_from_properties(props)
        if warn_override and recorded is not None and abs(recorded - mpp) / recorded > 0.05:
            logger.warning(
                "%s: using mpp override %.4g although the file records %.4g um/px", path.name, mpp, recorded
            )
    else:
        mpp, source = mpp_from_properties(props)
        if mpp is None:
            handle.close()
            raise MissingMppError(
                f"{path}: the slide does not record its resolution (no openslide.mpp-x, aperio.MPP or TIFF "
                "resolution tags), and tdamil does not guess it. " + _OVERRIDE_HOWTO.format(sid=sid)
            )
    slide = Slide(
        path=path,
        backend=chosen,
        dimensions=dims,
        level_dimensions=level_dims,
        level_downsamples=downs,
        mpp=float(mpp),
        mpp_source=source,
        properties=props,
        _handle=handle,
    )
    logger.debug("opened %r", slide)
    return slide


def _choose_backend(path: Path, backend: str) -> str:
    if backend not in BACKENDS:
        raise SlideError(f"unknown slide backend '{backend}'; use one of {', '.join(BACKENDS)}.")
    if backend == "auto":
        if path.suffix.lower() in (".svs", ".tif", ".tiff") and _has_tiffslide():
            return "tiffslide"
        return "openslide"
    if backend == "tiffslide" and not _has_tiffslide():
        raise SlideError(
            "extraction.backend is 'tiffslide' but the tiffslide package is not installed; "
            "install it with `pip install 'tdamil-fl[tiffslide]'` or set backend: openslide."
        )
    return backend


def _has_tiffslide() -> bool:
    import importlib.util

    return importlib.util.find_spec("tiffslide") is not None


def _open_handle(path: Path, backend: str) -> tuple[Any, dict[str, str], tuple[int, int], tuple, tuple]:
    not_slide = (
        f"{path}: not a whole-slide image that the {backend} backend can read"
        " ({why}). Check that the file is complete (compare its size with the scanner's copy) and in a "
        "supported format (SVS, TIFF, NDPI, MRXS, SCN, DICOM ...), or remove it from the manifest."
    )
    if backend == "openslide":
        import openslide

        try:
            handle = openslide.OpenSlide(str(path))
        except openslide.OpenSlideUnsupportedFormatError:
            raise SlideOpenError(not_slide.format(why="unsupported or unrecognised format")) from None
        except (openslide.OpenSlideError, OSError, ValueError) as exc:
            raise SlideOpenError(not_slide.format(why=f"{type(exc).__name__}: {exc}")) from None
    else:
        import tiffslide

        try:
            handle = tiffslide.TiffSlide(str(path))
        except Exception as exc:  # tiffslide surfaces tifffile/zarr errors of many types
            raise SlideOpenError(not_slide.format(why=f"{type(exc).__name__}: {exc}")) from None
    try:
        props = {str(k): str(v) for k, v in dict(handle.properties).items()}
        dims = tuple(int(v) for v in handle.dimensions)
        level_dims = tuple(tuple(int(v) for v in d) for d in handle.level_dimensions)
        downs = tuple(float(d) for d in handle.level_downsamples)
    except Exception as exc:
        handle.close()
        raise SlideOpenError(not_slide.format(why=f"bad metadata: {exc}")) from None
    if dims[0] <= 0 or dims[1] <= 0:
        handle.close()
        raise SlideOpenError(not_slide.format(why=f"empty image {dims}"))
    return handle, props, dims, level_dims, downs  # type: ignore[return-value]
