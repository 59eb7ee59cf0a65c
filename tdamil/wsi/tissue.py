"""Tissue segmentation on a slide thumbnail.

Steps (all on a ~32x downsampled thumbnail, transparent borders already painted white):
HSV saturation -> median blur -> threshold -> morphological close -> contours with holes, of
which pieces smaller than ``min_area_um2`` (dust, pen dots) and holes smaller than
``min_hole_area_um2`` are dropped.

The threshold is Otsu's, held between two bounds measured on glass: at most the glass's own
saturation plus ``background_margin`` (Otsu alone splits a slide with much strongly stained tissue
into dark and pale tissue, and the pale tissue, loose stroma and thin strands, was lost), and never
below ``min_saturation`` nor within ``GLASS_NOISE`` of the glass (an almost empty slide does not
turn glass into tissue). The glass's
saturation is the median over the brightest 10 % of the thumbnail, so a tinted background raises
the bound with it. Measured against a reference mask of a real slide in ``benchmarks/tissue.md``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional

import cv2
import numpy as np

from .reader import Slide

logger = logging.getLogger(__name__)

__all__ = ["TissueConfig", "TissueMask", "background_saturation", "segment_tissue", "tissue_mask_from_rgb"]


#: the threshold stays this far above the glass's own saturation (noise on glass: a few units)
GLASS_NOISE = 10.0


@dataclass
class TissueConfig:
    """Tissue-detection settings (the ``extraction.tissue`` section).

    thumbnail_downsample: thumbnail size relative to level 0 (default 32).
    saturation_threshold: fixed HSV-saturation threshold 0-255; ``None`` (default) = Otsu between
                          the two bounds below.
    min_saturation:       lower bound on the threshold (default 20; glass is ~0-15).
    background_margin:    upper bound on the threshold: the glass's saturation plus this (default
                          15); ``None`` = Otsu unbounded above (the earlier behaviour).
    median_blur:          median-filter size in thumbnail pixels, odd (default 3: 48 um at 0.5 um/px,
                          24 um at 0.25; larger filters erase strands of tissue a few cells wide).
    close_size:           morphological-close kernel in thumbnail pixels (default 5).
    min_area_um2:         tissue pieces smaller than this are dropped (default 20,000 um^2,
                          about a 140 um square).
    min_hole_area_um2:    holes (fat, lumen) larger than this are kept out of the mask
                          (default 40,000 um^2).
    """

    thumbnail_downsample: float = 32.0
    saturation_threshold: Optional[int] = None
    min_saturation: int = 20
    background_margin: Optional[float] = 15.0
    median_blur: int = 3
    close_size: int = 5
    min_area_um2: float = 20_000.0
    min_hole_area_um2: float = 40_000.0

    def __post_init__(self) -> None:
        if self.thumbnail_downsample < 1:
            raise ValueError("tissue.thumbnail_downsample must be >= 1 (default 32)")
        if self.median_blur < 1 or self.median_blur % 2 == 0:
            raise ValueError("tissue.median_blur must be an odd number >= 1 (default 7)")
        if self.close_size < 0:
            raise ValueError("tissue.close_size must be >= 0 (default 5)")
        if self.background_margin is not None and self.background_margin < 0:
            raise ValueError("tissue.background_margin must be >= 0, or null for Otsu unbounded above (default 15)")
        if self.saturation_threshold is not None and not 0 <= self.saturation_threshold <= 255:
            raise ValueError("tissue.saturation_threshold must be 0-255 or left out for Otsu")


@dataclass
class TissueMask:
    """A binary tissue mask on the thumbnail.

    mask:        bool ``(h, w)``, True = tissue.
    thumbnail:   the RGB thumbnail the mask was computed on.
    downsample:  level-0 pixels per thumbnail pixel.
    threshold:   the saturation threshold used.
    """

    mask: np.ndarray
    thumbnail: np.ndarray
    downsample: float
    threshold: float

    @property
    def tissue_fraction(self) -> float:
        """Fraction of the thumbnail that is tissue."""
        return float(self.mask.mean()) if self.mask.size else 0.0


def segment_tissue(slide: Slide, cfg: Optional[TissueConfig] = None) -> TissueMask:
    """Tissue mask of ``slide`` computed on a thumbnail (see module docstring)."""
    cfg = cfg or TissueConfig()
    thumb, ds = slide.thumbnail(cfg.thumbnail_downsample)
    um2_per_px = (ds * slide.mpp) ** 2
    mask, thr = tissue_mask_from_rgb(thumb, cfg, um2_per_px=um2_per_px)
    logger.debug("%s: tissue %.1f%% of the thumbnail (saturation threshold %.0f)", slide.path.name, 100 * mask.mean(), thr)
    return TissueMask(mask=mask, thumbnail=thumb, downsample=ds, threshold=thr)


def background_saturation(hsv: np.ndarray) -> float:
    """Saturation of the glass: the median over the brightest 10 % of the image (HSV uint8)."""
    value = hsv[..., 2]
    bright = value >= np.percentile(value, 90)
    return float(np.median(hsv[..., 1][bright]))


def tissue_mask_from_rgb(rgb: np.ndarray, cfg: Optional[TissueConfig] = None, um2_per_px: float = 1.0) -> tuple[np.ndarray, float]:
    """Tissue mask of an RGB uint8 image; returns ``(mask bool (h, w), threshold)``.

    ``um2_per_px`` is the area of one image pixel in square microns (for the area filters).
    """
    cfg = cfg or TissueConfig()
    hsv = cv2.cvtColor(np.ascontiguousarray(rgb, dtype=np.uint8), cv2.COLOR_RGB2HSV)
    sat = hsv[..., 1]
    if cfg.median_blur > 1:
        sat = cv2.medianBlur(sat, cfg.median_blur)
    if cfg.saturation_threshold is not None:
        thr = float(cfg.saturation_threshold)
    else:
        thr, _ = cv2.threshold(sat, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
        thr, glass = float(thr), background_saturation(hsv)
        if cfg.background_margin is not None:
            thr = min(thr, glass + float(cfg.background_margin))
        thr = max(thr, float(cfg.min_saturation), glass + GLASS_NOISE)
    binary = (sat > thr).astype(np.uint8)
    if cfg.close_size > 0:
        kernel = np.ones((cfg.close_size, cfg.close_size), np.uint8)
        binary = cv2.morphologyEx(binary, cv2.MORPH_CLOSE, kernel)
    min_area = cfg.min_area_um2 / um2_per_px
    min_hole = cfg.min_hole_area_um2 / um2_per_px
    contours, hierarchy = cv2.findContours(binary, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_NONE)
    out = np.zeros_like(binary)
    if hierarchy is not None:
        hier = hierarchy[0]
        # first the outer pieces large enough, then cut out their large holes
        for i, c in enumerate(contours):
            if hier[i][3] == -1 and cv2.contourArea(c) >= min_area:
                cv2.drawContours(out, contours, i, 1, thickness=cv2.FILLED)
        for i, c in enumerate(contours):
            if hier[i][3] != -1 and cv2.contourArea(c) >= min_hole:
                cv2.drawContours(out, contours, i, 0, thickness=cv2.FILLED)
    return out.astype(bool), thr
