"""Per-slide quality-control picture: thumbnail, tissue outline and the kept patch grid.

Drawn with OpenCV (fast enough to make one per slide during extraction). Green lines outline the
tissue mask, blue squares are the patches that were encoded; a caption gives the counts.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import cv2
import numpy as np

from tdamil.atomic import atomic_path

from .tissue import TissueMask

__all__ = ["qc_image", "save_qc_thumbnail"]

TISSUE_RGB = (0, 170, 0)
PATCH_RGB = (30, 80, 230)


def qc_image(tissue: TissueMask, coords: np.ndarray, patch_size_level0: int, title: Optional[str] = None,
             min_side_px: int = 800, max_side_px: int = 2000) -> np.ndarray:
    """RGB uint8 QC picture on the thumbnail of ``tissue`` (see module docstring), scaled so its
    long side is between ``min_side_px`` and ``max_side_px``."""
    th, tw = tissue.thumbnail.shape[:2]
    long_side = max(th, tw)
    f = min_side_px / long_side if long_side < min_side_px else min(1.0, max_side_px / long_side)
    size = (max(1, round(tw * f)), max(1, round(th * f)))
    img = np.ascontiguousarray(cv2.resize(tissue.thumbnail, size, interpolation=cv2.INTER_LINEAR if f > 1 else cv2.INTER_AREA))
    mask = cv2.resize(tissue.mask.astype(np.uint8), size, interpolation=cv2.INTER_NEAREST)
    th, tw = img.shape[:2]
    contours, _ = cv2.findContours(mask, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE)
    cv2.drawContours(img, contours, -1, TISSUE_RGB, thickness=max(1, round(long_side * f / 400)))
    ds = tissue.downsample * tissue.thumbnail.shape[1] / tw
    side = max(1, int(round(patch_size_level0 / ds)))
    for x, y in np.asarray(coords).reshape(-1, 2):
        x0, y0 = int(round(x / ds)), int(round(y / ds))
        cv2.rectangle(img, (x0, y0), (x0 + side - 1, y0 + side - 1), PATCH_RGB, thickness=1)
    if title is not None:
        caption = f"{title}: {len(coords)} patches, tissue {tissue.tissue_fraction:.0%}"
        bar = np.full((28, tw, 3), 255, np.uint8)
        cv2.putText(bar, caption, (4, 20), cv2.FONT_HERSHEY_SIMPLEX, 0.6, (0, 0, 0), 1, cv2.LINE_AA)
        img = np.concatenate([bar, img], axis=0)
    return img


def save_qc_thumbnail(path: str | os.PathLike, tissue: TissueMask, coords: np.ndarray, patch_size_level0: int,
                      title: Optional[str] = None) -> Path:
    """Write :func:`qc_image` as PNG to ``path`` (folders created); returns the path."""
    path = Path(path)
    img = qc_image(tissue, coords, patch_size_level0, title)
    with atomic_path(path, suffix=".tmp.png") as tmp:
        if not cv2.imwrite(str(tmp), cv2.cvtColor(img, cv2.COLOR_RGB2BGR)):
            raise OSError(f"{path}: could not write the QC picture")
    return path
