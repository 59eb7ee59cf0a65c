"""Write small pyramidal slides from real pixels, for tests, benchmarks and demos.

:func:`write_pyramid` writes a tiled, zlib-compressed TIFF that openslide reads either as a
generic TIFF (resolution in the TIFF resolution tags, or none at all) or as an Aperio SVS
(resolution in the ``MPP = ...`` description). Only tifffile and OpenCV are used.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Optional, Sequence

import cv2
import numpy as np

__all__ = ["write_pyramid", "upsample"]


def upsample(rgb: np.ndarray, factor: int) -> np.ndarray:
    """Enlarge an RGB image ``factor`` times (bicubic), e.g. to make a 40x slide from 20x pixels."""
    h, w = rgb.shape[:2]
    return cv2.resize(rgb, (w * factor, h * factor), interpolation=cv2.INTER_CUBIC)


def write_pyramid(
    path: str | Path,
    rgb: np.ndarray,
    mpp: Optional[float],
    downsamples: Sequence[int] = (1, 2, 4),
    fmt: Literal["tiff", "svs"] = "tiff",
    tile: int = 256,
) -> Path:
    """Write ``rgb`` (level 0) and its downsampled levels as a tiled pyramid; returns ``path``.

    ``mpp`` is the level-0 resolution in um/px; ``None`` writes no resolution at all (to test
    the missing-mpp error). ``fmt='svs'`` writes Aperio-style descriptions (``aperio.MPP``),
    ``'tiff'`` the TIFF resolution tags in centimetres.
    """
    import tifffile

    path = Path(path)
    rgb = np.ascontiguousarray(rgb, dtype=np.uint8)
    h, w = rgb.shape[:2]
    if downsamples[0] != 1:
        raise ValueError("the first level must have downsample 1")
    with tifffile.TiffWriter(path, bigtiff=False) as tw:
        for i, ds in enumerate(downsamples):
            level = rgb if ds == 1 else cv2.resize(rgb, (w // ds, h // ds), interpolation=cv2.INTER_AREA)
            kwargs: dict = dict(tile=(tile, tile), photometric="rgb", compression="zlib", metadata=None)
            if fmt == "svs":
                if i == 0:
                    desc = f"Aperio Image Library v12.0.0\n{w}x{h} [0,0 {w}x{h}] ({tile}x{tile}) JPEG/RGB Q=70"
                    if mpp is not None:
                        desc += f"|AppMag = {10 / mpp:.0f}|MPP = {mpp:.4f}"
                else:
                    desc = f"Aperio Image Library v12.0.0\n{w}x{h} -> {level.shape[1]}x{level.shape[0]} - "
                kwargs["description"] = desc
            else:
                kwargs["subfiletype"] = 0 if i == 0 else 1
                if mpp is not None:
                    res = 1e4 / (mpp * ds)
                    kwargs.update(resolution=(res, res), resolutionunit="CENTIMETER")
            tw.write(level, **kwargs)
    return path
