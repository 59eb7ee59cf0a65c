"""GeoJSON for QuPath: tissue contours and the patch grid with per-patch scores, in level-0 pixels.

QuPath (File > Import objects, or drag the file onto the open slide) reads a ``FeatureCollection``
whose features carry ``properties.objectType`` (``annotation``, ``tile``, ``detection``), an
optional ``classification`` (``name``, ``color``) and ``measurements`` (name -> number), with
polygon coordinates in the slide's full-resolution pixels. Here:

* tissue pieces are ``annotation`` polygons (holes as inner rings), classification ``Tissue``;
* each patch is a ``tile`` square (clipped to the slide, padded edge patches included) whose
  measurements hold its score (``s_i`` relevance or attention) and the slide's prediction, so
  QuPath's Measure > Show measurement maps colours the grid by the model's score.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import cv2
import numpy as np

from tdamil.atomic import atomic_path

from .tissue import TissueMask

__all__ = ["tissue_features", "patch_features", "save_geojson", "geojson_for_slide"]

TISSUE_CLASS = {"name": "Tissue", "color": [0, 170, 0]}
PATCH_CLASS = {"name": "Patch", "color": [30, 80, 230]}


def _ring(points: np.ndarray, dims: tuple[int, int]) -> list[list[float]]:
    """A closed ring of level-0 points clipped to the slide (first point repeated at the end)."""
    w0, h0 = dims
    pts = np.column_stack([np.clip(points[:, 0], 0, w0), np.clip(points[:, 1], 0, h0)])
    ring = [[round(float(x), 1), round(float(y), 1)] for x, y in pts]
    return ring + [ring[0]]


def _feature(rings: list, object_type: str, classification: dict, measurements: Mapping[str, float],
             name: Optional[str] = None) -> dict[str, Any]:
    props: dict[str, Any] = {"objectType": object_type, "classification": dict(classification),
                             "isLocked": False, "measurements": {k: float(v) for k, v in measurements.items()}}
    if name is not None:
        props["name"] = name
    return {"type": "Feature", "id": str(uuid.uuid4()), "geometry": {"type": "Polygon", "coordinates": rings},
            "properties": props}


def tissue_features(tissue: TissueMask, dims: tuple[int, int],
                    measurements: Optional[Mapping[str, float]] = None) -> list[dict[str, Any]]:
    """One ``annotation`` polygon per tissue piece, its large holes as inner rings, in level-0 px."""
    mask = tissue.mask.astype(np.uint8)
    contours, hierarchy = cv2.findContours(mask, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE)
    if hierarchy is None:
        return []
    hier = hierarchy[0]
    # thumbnail pixel (i, j) covers level-0 [i*ds, (i+1)*ds): its centre maps to (i + 0.5) * ds
    scale = tissue.downsample
    out = []
    for i, c in enumerate(contours):
        if hier[i][3] != -1 or len(c) < 3:
            continue
        rings = [_ring((c.reshape(-1, 2) + 0.5) * scale, dims)]
        child = hier[i][2]
        while child != -1:
            if len(contours[child]) >= 3:
                rings.append(_ring((contours[child].reshape(-1, 2) + 0.5) * scale, dims))
            child = hier[child][0]
        area_px = cv2.contourArea(c) * (scale ** 2)
        out.append(_feature(rings, "annotation", TISSUE_CLASS, {"area_px2_level0": area_px, **(measurements or {})},
                            name=f"tissue {len(out) + 1}"))
    return out


def patch_features(coords: np.ndarray, patch_size_level0: int, dims: tuple[int, int],
                   scores: Optional[Sequence[float]] = None, score_name: str = "score",
                   slide_measurements: Optional[Mapping[str, float]] = None,
                   object_type: str = "tile") -> list[dict[str, Any]]:
    """One square per patch (level-0 px, clipped to the slide) with its score and the slide's values."""
    xy = np.asarray(coords).reshape(-1, 2)
    if scores is not None and len(scores) != len(xy):
        raise ValueError(f"{len(scores)} scores for {len(xy)} patches: give one score per patch (order of coords)")
    s = int(patch_size_level0)
    out = []
    for i, (x, y) in enumerate(xy):
        square = np.array([[x, y], [x + s, y], [x + s, y + s], [x, y + s]], dtype=np.float64)
        m: dict[str, float] = {}
        if scores is not None and np.isfinite(scores[i]):
            m[score_name] = float(scores[i])
        m.update(slide_measurements or {})
        out.append(_feature([_ring(square, dims)], object_type, PATCH_CLASS, m, name=f"patch {i}"))
    return out


def save_geojson(path: str | Path, features: list[dict[str, Any]]) -> Path:
    """Write a GeoJSON ``FeatureCollection`` atomically; returns the path."""
    path = Path(path)
    with atomic_path(path, suffix=".tmp.geojson") as tmp:
        tmp.write_text(json.dumps({"type": "FeatureCollection", "features": features}))
    return path


def geojson_for_slide(path: str | Path, slide_path: str | Path, features_h5: str | Path, scores: Sequence[float], *,
                      score_name: str = "patch score", slide_measurements: Optional[Mapping[str, float]] = None,
                      mpp_override: Optional[float] = None) -> Path:
    """QuPath GeoJSON of one slide: its tissue contours and its patches with ``scores`` (one per row
    of ``features_h5``), both carrying ``slide_measurements`` (e.g. the predicted probabilities)."""
    from tdamil.data.h5 import FeatureFileError, read_features

    from .heatmap import patch_size_level0_of
    from .reader import open_slide
    from .tissue import segment_tissue

    bag = read_features(features_h5)
    if bag.coords is None:
        raise FeatureFileError(f"{features_h5}: has no coordinates; QuPath objects need an h5 from tdamil-extract, "
                               "TRIDENT or CLAM.")
    with open_slide(slide_path, mpp_override=mpp_override) as slide:
        ps0 = patch_size_level0_of(bag.attrs, bag.coords, slide.level_downsamples, source=features_h5)
        dims = slide.dimensions
        tissue = segment_tissue(slide)
    features = tissue_features(tissue, dims, slide_measurements)
    features += patch_features(bag.coords, ps0, dims, np.asarray(scores, dtype=np.float64), score_name,
                               slide_measurements)
    return save_geojson(path, features)
