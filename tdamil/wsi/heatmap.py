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

__all__ = ["score_canvas", "save_heatmap", "heatmap_for_slide", "patch_size_level0_of", "rank_within_slide",
           "colour_scale"]


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

    ``normalize=True`` ranks scores to [0, 1] (for attention weights, whose scale shrinks with bag
    size; pass ``label="attention"``, the colour bar says "(rank within slide)"); tied scores share
    their mean rank, so equal scores get one colour and a slide whose scores are all equal (ABMIL's
    uniform attention) is drawn in one colour that says so, never as a gradient in patch order.
    Otherwise the colour range is ``vmin``/``vmax``, by default the FIXED range [0, 1] of TDA-MIL's
    ``s_i``, never the scores' own range (a slide with scores of at most 1e-6 must look blank, not
    red). A slide whose scores are all 0 says so on the picture. ``alpha`` is the opacity of the colours.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from matplotlib import colors

    scores, label, note = colour_scale(scores, normalize, label)
    lo = 0.0 if vmin is None else vmin
    hi = 1.0 if vmax is None else vmax
    if hi <= lo:
        raise ValueError(f"heatmap colour range needs vmin < vmax, got {lo} and {hi}")
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
        if note:
            ax.text(0.5, 0.02, note, transform=ax.transAxes, ha="center", va="bottom", fontsize=10,
                    bbox=dict(facecolor="white", alpha=0.8))
        sm = plt.cm.ScalarMappable(norm=norm, cmap=cm)
        fig.colorbar(sm, ax=ax, fraction=0.046, pad=0.02, label=label)
        path = Path(path)
        with atomic_path(path, suffix=".tmp.png") as tmp:
            fig.savefig(tmp, dpi=dpi, bbox_inches="tight")
    finally:
        plt.close(fig)
    return path


RANK_SUFFIX = " (rank within slide)"


def colour_scale(scores: np.ndarray, normalize: bool, label: str) -> tuple[np.ndarray, str, Optional[str]]:
    """``(values to colour, colour-bar label, note for the picture or None)``: with ``normalize``
    the ranks within the slide and the label saying so (once); a note when every score is 0 (on the
    fixed scale) or every patch has the same score."""
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    raw = scores[np.isfinite(scores)]
    note = None
    if raw.size and not normalize and bool(np.all(raw == 0)):
        note = "every score is 0: no patch selected on this slide"
    elif raw.size > 1 and bool(np.all(raw == raw[0])):
        note = f"every patch has the same score ({raw[0]:.4g}): nothing stands out on this slide"
    if normalize:
        scores = rank_within_slide(scores)
        label = label if label.endswith(RANK_SUFFIX) else label + RANK_SUFFIX
    return scores, label, note


def rank_within_slide(scores: np.ndarray) -> np.ndarray:
    """Scores -> their rank scaled to [0, 1]; ties share their mean rank (all equal -> all 0.5),
    NaN stays NaN. Rank order never invents differences that the scores do not have."""
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    out = np.full(scores.shape, np.nan)
    finite = np.isfinite(scores)
    n = int(finite.sum())
    if n == 1:
        out[finite] = 0.5
    elif n:
        values = scores[finite]
        ranks = np.empty(n)
        ranks[np.argsort(values, kind="stable")] = np.arange(n)
        _, tie = np.unique(values, return_inverse=True)  # equal scores -> the mean of their ranks
        out[finite] = (np.bincount(tie, weights=ranks) / np.bincount(tie))[tie] / (n - 1)
    return out


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

    Reads the coordinates from the feature file, the patch side with :func:`patch_size_level0_of`
    and the thumbnail from the slide (default size: about 1500 px on the long side); other keyword
    arguments go to :func:`save_heatmap`.
    """
    from tdamil.data.h5 import FeatureFileError, read_features

    from .reader import open_slide

    bag = read_features(features_h5)
    if bag.coords is None:
        raise FeatureFileError(f"{features_h5}: has no coordinates; heatmaps need a file from tdamil-extract, TRIDENT or CLAM h5.")
    with open_slide(slide_path, mpp_override=mpp_override) as slide:
        ps0 = patch_size_level0_of(bag.attrs, bag.coords, slide.level_downsamples, source=features_h5)
        if thumbnail_downsample is None:
            thumbnail_downsample = max(1.0, max(slide.dimensions) / 1500.0)
        thumb, ds = slide.thumbnail(thumbnail_downsample)
    kwargs.setdefault("title", str(bag.attrs.get("name", Path(features_h5).stem)))
    return save_heatmap(path, thumb, bag.coords, scores, int(ps0), ds, **kwargs)


def patch_size_level0_of(attrs: dict, coords: np.ndarray, level_downsamples: tuple[float, ...],
                         source: str | os.PathLike = "feature file") -> int:
    """The patch side in level-0 pixels of a feature file from tdamil, TRIDENT or CLAM.

    ``patch_size_level0`` when recorded (tdamil, TRIDENT); else CLAM's ``patch_size`` at
    ``patch_level`` times that level's downsample (CLAM's own ``downsample`` attribute, else the
    slide's); else, for files without attributes, the most common spacing of neighbouring
    coordinates (the grid step, which is the patch side when patches do not overlap).
    """
    from tdamil.data.h5 import FeatureFileError

    if attrs.get("patch_size_level0") is not None:
        return int(round(float(attrs["patch_size_level0"])))
    if attrs.get("patch_size") is not None:
        level = int(attrs.get("patch_level", 0) or 0)
        recorded = attrs.get("downsample")
        if isinstance(recorded, (list, tuple)) and recorded:
            factor = float(recorded[0])
        elif level < len(level_downsamples):
            factor = float(level_downsamples[level])
        else:
            raise FeatureFileError(f"{source}: patch_level {level} but the slide has {len(level_downsamples)} levels; "
                                   "is this the slide the features were extracted from?")
        return int(round(float(attrs["patch_size"]) * factor))
    step = _grid_step(np.asarray(coords).reshape(-1, 2))
    if step is None:
        raise FeatureFileError(f"{source}: no patch_size_level0/patch_size attribute and too few patches to measure "
                               "the grid; add the attribute patch_size_level0 to the file's coords.")
    logger.info("%s: no patch size recorded; using the coordinates' grid step %d px", source, step)
    return step


def _grid_step(xy: np.ndarray) -> Optional[int]:
    """Most common gap between neighbouring patches in a row or a column, or None."""
    gaps = []
    for axis in (0, 1):
        other = 1 - axis
        order = np.lexsort((xy[:, axis], xy[:, other]))
        a, b = xy[order, axis], xy[order, other]
        same_line = b[1:] == b[:-1]
        d = np.diff(a)[same_line]
        gaps.append(d[d > 0])
    diffs = np.concatenate(gaps)
    if diffs.size == 0:
        return None
    values, counts = np.unique(diffs, return_counts=True)
    return int(values[counts.argmax()])
