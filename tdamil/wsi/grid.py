"""Patch grid: which level-0 squares to read, from which pyramid level, at what size.

A patch is ``patch_size`` x ``patch_size`` pixels at the target resolution (default 512 px at
20x = 0.5 um/px). On a 40x slide (0.25 um/px) that is 1024 level-0 pixels; they are read from a
pyramid level with downsample ~2 when the slide has one, else 1024 px from level 0 resized to
512. Grid cells do not overlap, start at (0, 0) and cover the whole slide: the last column and
row reach past the right and bottom edges. A cell is kept when at least ``min_tissue`` of its
*whole* area is tissue on the thumbnail mask (the part outside the slide counts as background), so
an edge cell that holds tissue is patched, and what lies past the edge is read as white (as
openslide returns transparent pixels there, see :func:`~tdamil.wsi.reader.to_rgb_white`), like
CLAM's padding. Coordinates are the level-0 top-left ``(x, y)`` of each cell.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from .reader import Slide, SlideError
from .tissue import TissueMask

__all__ = ["ReadPlan", "plan_read", "tissue_grid", "padded_cells"]


@dataclass(frozen=True)
class ReadPlan:
    """How to read one patch.

    patch_size:        output side in pixels at the target resolution (e.g. 512).
    patch_size_level0: side of the cell in level-0 pixels (e.g. 1024 on a 40x slide).
    level:             pyramid level read from.
    read_size:         side read at ``level`` (resized to ``patch_size`` when different).
    level0_mpp:        the slide's level-0 resolution.
    target_mpp:        the patch resolution (0.5 for 20x).
    """

    patch_size: int
    patch_size_level0: int
    level: int
    read_size: int
    level0_mpp: float
    target_mpp: float

    @property
    def needs_resize(self) -> bool:
        return self.read_size != self.patch_size

    def read(self, slide: Slide, x: int, y: int) -> np.ndarray:
        """The patch with level-0 top-left ``(x, y)``: RGB uint8 ``(patch_size, patch_size, 3)``."""
        rgb = slide.read_region((x, y), self.level, (self.read_size, self.read_size))
        if self.needs_resize:
            interp = cv2.INTER_AREA if self.read_size > self.patch_size else cv2.INTER_CUBIC
            rgb = cv2.resize(rgb, (self.patch_size, self.patch_size), interpolation=interp)
        return rgb

    @property
    def level0_magnification(self) -> float:
        return 10.0 / self.level0_mpp

    @property
    def target_magnification(self) -> float:
        return 10.0 / self.target_mpp


def plan_read(slide: Slide, patch_size: int = 512, target_mpp: float = 0.5, snap_tolerance: float = 0.05) -> ReadPlan:
    """Choose the level-0 cell size and the pyramid level for ``slide``.

    ``scale = target_mpp / slide.mpp`` level-0 pixels per target pixel. When ``scale`` is within
    ``snap_tolerance`` (relative) of a whole number it is snapped to it, so a 0.499 um/px "20x"
    scan reads 512 px cells rather than 511 px cells resized. The level used is the deepest one
    whose downsample does not exceed ``scale`` (within ``snap_tolerance``); what is read there is
    resized to ``patch_size`` only when its size differs.
    """
    if patch_size < 8:
        raise SlideError(f"patch_size must be >= 8 pixels, got {patch_size}")
    scale = target_mpp / slide.mpp
    nearest = round(scale)
    if nearest >= 1 and abs(scale - nearest) / scale <= snap_tolerance:
        scale = float(nearest)
    if scale < 1.0 / (1.0 + snap_tolerance):
        raise SlideError(
            f"{slide.path}: level-0 resolution {slide.mpp:.4g} um/px is coarser than the target "
            f"{target_mpp:.4g} um/px ({10 / target_mpp:.3g}x); patches would be upsampled. Use a scan at "
            "higher magnification or lower extraction.target_magnification."
        )
    ps0 = int(round(patch_size * scale))
    level = 0
    for i, ds in enumerate(slide.level_downsamples):
        if ds <= scale * (1.0 + snap_tolerance) and ds > slide.level_downsamples[level]:
            level = i
    read_size = int(round(ps0 / slide.level_downsamples[level]))
    if abs(read_size - patch_size) <= max(1, int(patch_size * 0.002)):
        read_size = patch_size  # rounding of the level's downsample, e.g. 2.0004
    return ReadPlan(
        patch_size=patch_size,
        patch_size_level0=ps0,
        level=level,
        read_size=read_size,
        level0_mpp=slide.mpp,
        target_mpp=target_mpp,
    )


def tissue_grid(
    dimensions: tuple[int, int], patch_size_level0: int, tissue: TissueMask, min_tissue: float = 0.1
) -> tuple[np.ndarray, np.ndarray]:
    """Level-0 top-left coordinates of the grid cells with at least ``min_tissue`` tissue.

    Returns ``(coords int64 (N, 2) as x, y in row-major order, tissue_fraction float32 (N,))``.
    The tissue fraction of a cell is the thumbnail mask summed over the cell's footprint inside the
    slide, divided by the footprint the whole cell would have (edge cells count their outside as
    background).
    """
    w0, h0 = dimensions
    ps0 = int(patch_size_level0)
    cols, rows = -(-w0 // ps0), -(-h0 // ps0)
    mask = tissue.mask.astype(np.float64)
    th, tw = mask.shape
    integral = np.zeros((th + 1, tw + 1), np.float64)
    integral[1:, 1:] = mask.cumsum(0).cumsum(1)
    # footprint of every column/row in thumbnail pixels (at least one pixel wide)
    sx, sy = w0 / tw, h0 / th
    x0 = np.clip(np.floor(np.arange(cols) * ps0 / sx + 0.5).astype(int), 0, tw - 1)
    x1 = np.clip(np.floor((np.arange(cols) + 1) * ps0 / sx + 0.5).astype(int), 1, tw)
    y0 = np.clip(np.floor(np.arange(rows) * ps0 / sy + 0.5).astype(int), 0, th - 1)
    y1 = np.clip(np.floor((np.arange(rows) + 1) * ps0 / sy + 0.5).astype(int), 1, th)
    x1 = np.maximum(x1, x0 + 1)
    y1 = np.maximum(y1, y0 + 1)
    Y0, X0 = np.meshgrid(y0, x0, indexing="ij")
    Y1, X1 = np.meshgrid(y1, x1, indexing="ij")
    sums = integral[Y1, X1] - integral[Y0, X1] - integral[Y1, X0] + integral[Y0, X0]
    # a full cell's footprint in thumbnail pixels: edge cells are judged on their whole area
    over_x = np.repeat(((np.arange(cols) + 1) * ps0 > w0)[None, :], rows, axis=0)
    over_y = np.repeat(((np.arange(rows) + 1) * ps0 > h0)[:, None], cols, axis=1)
    cell_w = np.where(over_x, np.maximum(X1 - X0, ps0 / sx), X1 - X0)
    cell_h = np.where(over_y, np.maximum(Y1 - Y0, ps0 / sy), Y1 - Y0)
    frac = sums / (cell_w * cell_h)
    keep_r, keep_c = np.nonzero(frac >= min_tissue)
    coords = np.stack([keep_c * ps0, keep_r * ps0], axis=1).astype(np.int64)
    return coords, frac[keep_r, keep_c].astype(np.float32)


def padded_cells(coords: np.ndarray, dimensions: tuple[int, int], patch_size_level0: int) -> np.ndarray:
    """Bool ``(N,)``: the cell at ``coords`` reaches past the slide's right or bottom edge."""
    xy = np.asarray(coords).reshape(-1, 2)
    w0, h0 = dimensions
    return (xy[:, 0] + patch_size_level0 > w0) | (xy[:, 1] + patch_size_level0 > h0)
