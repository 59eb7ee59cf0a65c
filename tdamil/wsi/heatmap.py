"""Heatmaps of per-patch scores over a slide thumbnail.

Paints a score per patch (TDA-MIL relevance ``s_i`` in [0, 1], or attention weights) onto the
slide's thumbnail with a matplotlib colormap, alpha-blended over the tissue, with a colorbar.
Patch positions come from the feature file's level-0 coordinates and ``patch_size_level0``.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Optional

import numpy as np

from tdamil.atomic import atomic_path

logger = logging.getLogger(__name__)

__all__ = ["score_canvas", "save_heatmap", "heatmap_for_slide"]


def score_canvas(
    shape: tuple[int, int], coords: np.ndarray, scores: np.ndarray, patch_size_level0: int, downsample: float
) -> np.ndarray:
    """Float ``(h, w)`` map at thumbnail scale: each patch's square holds its score, NaN elsewhere.

    Where patches overlap the later one wins. ``downsample`` = level-0 pixels per thumbnail pixel.
    """
    coords = np.asarray(coords).reshape(-1, 2)
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    if len(coords) != len(scores):
        raise ValueError(f"{len(scores)} scores for {len(coords)} patches: give one score per patch (same order as coords)")
    h, w = shape
    canvas = np.full((h, w), np.nan, np.float64)
    side = max(1, int(round(patch_size_level0 / downsample)))
    for (x, y), s in zip(coords, scores):
        x0, y0 = int(round(x / downsample)), int(round(y / downsample))
        canvas[max(y0, 0): min(y0 + side, h), max(x0, 0): min(x0 + side, w)] = s
    return canvas


def save_heatmap(
    path: str | os.PathLike,
    thumbnail: np.ndarray,
    coords: np.ndarray,
    scores: np.ndarray,
    patch_size_level0: int,
    downsample: float,
    *,
    title: Optional[str] = None,
    label: str = "relevance $s_i$",
    cmap: str = "jet",
    alpha: float = 0.5,
    vmin: Optional[float] = None,
    vmax: Optional[float] = None,
    normalize: bool = False,
    dpi: int = 150,
) -> Path:
    """Write a PNG: ``thumbnail`` with the patch scores blended on top, and a colorbar.

    ``normalize=True`` ranks scores to [0, 1] (useful for attention weights, whose scale shrinks
    with bag size); otherwise the colour range is ``vmin``/``vmax`` or the scores' range
    (TDA-MIL's ``s_i`` already lie in [0, 1]). ``alpha`` is the opacity of the colours.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from matplotlib import colors

    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    if normalize and len(scores):
        order = scores.argsort().argsort()
        scores = order / max(len(scores) - 1, 1)
    finite = scores[np.isfinite(scores)]
    lo = vmin if vmin is not None else (float(finite.min()) if finite.size else 0.0)
    hi = vmax if vmax is not None else (float(finite.max()) if finite.size else 1.0)
    if hi <= lo:
        hi = lo + 1e-6
    thumb = np.asarray(thumbnail)
    canvas = score_canvas(thumb.shape[:2], coords, scores, patch_size_level0, downsample)
    norm = colors.Normalize(vmin=lo, vmax=hi)
    cm = plt.get_cmap(cmap)
    rgba = cm(norm(np.nan_to_num(canvas, nan=lo)))
    covered = np.isfinite(canvas)[..., None]
    base = thumb[..., :3].astype(np.float64) / 255.0
    blended = np.where(covered, (1 - alpha) * base + alpha * rgba[..., :3], base)

    h, w = thumb.shape[:2]
    fig_w = 7.0
    fig_h = max(2.5, fig_w * h / max(w, 1) * 0.9)
    fig, ax = plt.subplots(figsize=(fig_w, fig_h))
    try:
        ax.imshow(np.clip(blended, 0, 1))
        ax.set_axis_off()
        if title:
            ax.set_title(title)
        sm = plt.cm.ScalarMappable(norm=norm, cmap=cm)
        fig.colorbar(sm, ax=ax, fraction=0.046, pad=0.02, label=label + (" (rank)" if normalize else ""))
        path = Path(path)
        with atomic_path(path, suffix=".tmp.png") as tmp:
            fig.savefig(tmp, dpi=dpi, bbox_inches="tight")
    finally:
        plt.close(fig)
    return path


def heatmap_for_slide(
    path: str | os.PathLike,
    slide_path: str | os.PathLike,
    features_h5: str | os.PathLike,
    scores: np.ndarray,
    *,
    mpp_override: Optional[float] = None,
    thumbnail_downsample: Optional[float] = None,
    **kwargs,
) -> Path:
    """Heatmap of ``scores`` (one per row of ``features_h5``) over the slide's thumbnail.

    Reads the coordinates and ``patch_size_level0`` from the feature file and the thumbnail from
    the slide (default size: about 1500 px on the long side); other keyword arguments go to
    :func:`save_heatmap`.
    """
    from tdamil.data.h5 import FeatureFileError, read_features

    from .reader import open_slide

    bag = read_features(features_h5)
    if bag.coords is None:
        raise FeatureFileError(f"{features_h5}: has no coordinates; heatmaps need a file from tdamil-extract, TRIDENT or CLAM h5.")
    ps0 = bag.attrs.get("patch_size_level0")
    if ps0 is None:  # CLAM h5: patch_size at patch_level
        ps0 = bag.attrs.get("patch_size")
    if ps0 is None:
        raise FeatureFileError(f"{features_h5}: no patch_size_level0/patch_size attribute; cannot size the patches.")
    with open_slide(slide_path, mpp_override=mpp_override) as slide:
        if thumbnail_downsample is None:
            thumbnail_downsample = max(1.0, max(slide.dimensions) / 1500.0)
        thumb, ds = slide.thumbnail(thumbnail_downsample)
    kwargs.setdefault("title", str(bag.attrs.get("name", Path(features_h5).stem)))
    return save_heatmap(path, thumb, bag.coords, scores, int(ps0), ds, **kwargs)
