"""Preparing one slide for encoding (main process): open, resolution, tissue mask, grid, attributes, QC.

The attributes written into the feature file follow TRIDENT's ``coords`` attributes, chosen so
that TRIDENT's reader gets the stored patch size back exactly: TRIDENT computes the level-0 patch
side as ``patch_size * level0_magnification / target_magnification``, so ``level0_magnification``
is recorded as ``target_magnification * patch_size_level0 / patch_size`` (the nominal 20 for a
0.499 um/px scan, 40 for 0.25 um/px), and the measured resolution is kept in ``mpp``.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np

from .encoders import PatchEncoder
from .extract_config import FEATURE_FORMAT_VERSION, ExtractionConfig
from .extract_report import NoTissueError
from .grid import ReadPlan, padded_cells, plan_read, tissue_grid
from .jobs import SlideJob
from .reader import Slide, SlideNotFoundError, open_slide
from .tissue import TissueMask, segment_tissue

logger = logging.getLogger("tdamil.wsi.extract")

__all__ = ["Prepared", "prepare_slide", "trident_magnifications"]


@dataclass
class Prepared:
    """A slide ready to be read and encoded."""

    job: SlideJob
    out: Path
    shash: str
    plan: ReadPlan
    coords: np.ndarray
    padded: np.ndarray
    attrs: dict[str, Any]
    t_start: float
    timings: dict[str, float]


def _whole(value: float) -> float | int:
    """An int when ``value`` is whole (TRIDENT writes magnifications as ints)."""
    return int(round(value)) if abs(value - round(value)) < 1e-9 else round(value, 6)


def trident_magnifications(plan: ReadPlan) -> tuple[float | int, float | int]:
    """``(level0_magnification, target_magnification)`` consistent with ``patch_size_level0``."""
    target = plan.target_magnification
    return _whole(target * plan.patch_size_level0 / plan.patch_size), _whole(target)


def _attrs(job: SlideJob, slide: Slide, plan: ReadPlan, tissue: TissueMask, encoder: PatchEncoder,
           ext_cfg: ExtractionConfig, shash: str, n_padded: int) -> dict[str, Any]:
    level0_mag, target_mag = trident_magnifications(plan)
    return {
        "patch_size": plan.patch_size,
        "patch_size_level0": plan.patch_size_level0,
        "level0_magnification": level0_mag,
        "target_magnification": target_mag,
        "overlap": 0,
        "level0_width": int(slide.dimensions[0]),
        "level0_height": int(slide.dimensions[1]),
        "name": job.slide_id,
        "encoder": encoder.spec.name,
        "encoder_dim": encoder.dim,
        "weights_sha256": encoder.weights_sha256,
        "mpp": float(slide.mpp),
        "mpp_source": slide.mpp_source,
        "read_level": plan.level,
        "read_size": plan.read_size,
        "min_tissue": ext_cfg.min_tissue,
        "tissue_threshold": float(tissue.threshold),
        "padding": "white" if n_padded else "none",
        "settings_hash": shash,
        "slide_file": job.path.name if job.path else "",
        "backend": slide.backend,
        "format_version": FEATURE_FORMAT_VERSION,
    }


def prepare_slide(job: SlideJob, ext_cfg: ExtractionConfig, encoder: PatchEncoder, out: Path, shash: str,
                  qc_dir: Optional[Path]) -> Prepared:
    """Open the slide, resolve its resolution, segment tissue and lay the grid; write its QC files."""
    t0 = time.perf_counter()
    if job.path is None:
        raise SlideNotFoundError(job.problem)
    with open_slide(job.path, mpp_override=job.mpp_override, backend=ext_cfg.backend, slide_id=job.slide_id) as slide:
        plan = plan_read(slide, ext_cfg.patch_size, ext_cfg.target_mpp)
        tissue = segment_tissue(slide, ext_cfg.tissue)
        coords, _ = tissue_grid(slide.dimensions, plan.patch_size_level0, tissue, ext_cfg.min_tissue)
        padded = padded_cells(coords, slide.dimensions, plan.patch_size_level0)
        attrs = _attrs(job, slide, plan, tissue, encoder, ext_cfg, shash, int(padded.sum()))
        if qc_dir is not None:
            _save_qc(qc_dir, job.slide_id, slide, tissue, coords, padded, plan)
    if len(coords) == 0:
        raise NoTissueError(
            f"{job.path}: no grid cell of {plan.patch_size_level0} px has >= {ext_cfg.min_tissue:.0%} tissue "
            f"(tissue covers {tissue.tissue_fraction:.1%} of the thumbnail)"
        )
    return Prepared(job, out, shash, plan, coords, padded, attrs, t0, {"open_segment": time.perf_counter() - t0})


def _save_qc(qc_dir: Path, slide_id: str, slide: Slide, tissue: TissueMask, coords: np.ndarray,
             padded: np.ndarray, plan: ReadPlan) -> None:
    from .geojson import save_geojson, tissue_features
    from .qc import save_qc_pictures

    try:
        save_qc_pictures(qc_dir, slide_id, slide, tissue, coords, plan.patch_size_level0, padded)
        save_geojson(qc_dir / f"{slide_id}.tissue.geojson", tissue_features(tissue, slide.dimensions))
    except Exception as exc:  # a picture must never cost the features
        logger.warning("%s: QC pictures not written (%s)", slide_id, exc)
