"""Whole-slide images: reading, tissue mask, patch grid, encoders, feature extraction, pictures.

Public entry points::

    from tdamil.wsi import ExtractionConfig, extract_site, ExtractionSummary
    summary = extract_site(data_cfg, ExtractionConfig(encoder="uni", weights=Path(...)))

Submodules: ``reader`` (open_slide, mpp), ``tissue`` (segment_tissue), ``grid`` (plan_read,
tissue_grid, edge padding), ``encoders`` (registry, load_encoder), ``extract`` (extract_site: the
pipeline) with ``extract_config`` (settings, hash), ``jobs`` (which slides, shards), ``prepare``
(one slide's grid and attributes), ``patches`` (DataLoader reading), ``claims`` (concurrent
processes), ``extract_report`` (results); ``qc``, ``heatmap`` and ``geojson`` (pictures, QuPath
objects), ``cli`` (``tdamil-extract``), ``testslides`` (pyramids for tests).
Heavy imports (torch, timm) happen only when ``extract``/``encoders`` are used.
"""

from __future__ import annotations

from typing import Any

__all__ = ["ExtractionConfig", "ExtractionSummary", "SlideResult", "extract_site", "ExtractionError"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from . import extract

        return getattr(extract, name)
    raise AttributeError(f"module 'tdamil.wsi' has no attribute {name!r}")
