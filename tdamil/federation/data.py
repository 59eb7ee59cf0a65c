"""Datasets of a site or of the coordinator's held-out cohorts, from a manifest + feature cache."""

from __future__ import annotations

import logging
from typing import Any, Optional, Sequence

logger = logging.getLogger(__name__)

__all__ = ["load_manifest_frame", "split_datasets", "cohort_datasets"]


def load_manifest_frame(data_cfg: Any) -> Any:
    """The validated manifest of a ``DataConfig`` (``manifest``, ``features_dir``, ``classes``)."""
    from tdamil.data.manifest import load_manifest  # noqa: PLC0415

    return load_manifest(data_cfg.manifest, classes=data_cfg.classes)


def _dataset(df: Any, data_cfg: Any, num_classes: int) -> Any:
    from tdamil.data.bags import FeatureBagDataset  # noqa: PLC0415

    return FeatureBagDataset(data_cfg.features_dir, df["slide_id"].tolist(), df["label_index"].tolist(),
                             num_classes, patient_ids=df["patient_id"].tolist(), suffix=data_cfg.features_suffix)


def split_datasets(data_cfg: Any, *, cohorts: Optional[Sequence[str]] = None, val_fraction: float = 0.15,
                   test_fraction: float = 0.15, seed: int = 0) -> dict[str, Any]:
    """``{"train", "val", "test"}`` FeatureBagDatasets of a site.

    The manifest's ``split`` column is used when present, else a seeded, stratified patient-level
    split. ``cohorts`` keeps only those rows of a ``cohort`` column.
    """
    from tdamil.data.splits import patient_split, split_from_column  # noqa: PLC0415

    df = load_manifest_frame(data_cfg)
    classes = df.attrs.get("classes") or sorted(df["label"].unique())
    if cohorts:
        if "cohort" not in df.columns:
            raise ValueError(f"{data_cfg.manifest}: cohorts {list(cohorts)} requested but the manifest has no "
                             "'cohort' column. Add one or remove the cohorts setting.")
        df = df[df["cohort"].isin(list(cohorts))].reset_index(drop=True)
        if df.empty:
            raise ValueError(f"{data_cfg.manifest}: no rows for cohorts {list(cohorts)}.")
    if "split" in df.columns and (df["split"].astype(str).str.len() > 0).all():
        parts = split_from_column(df["split"].tolist())
    else:
        parts = patient_split(df["patient_id"].tolist(), df["label_index"].tolist(), val_fraction=val_fraction,
                              test_fraction=test_fraction, seed=seed)
    return {name: _dataset(df.iloc[idx].reset_index(drop=True), data_cfg, len(classes))
            for name, idx in parts.as_dict().items()}


def cohort_datasets(data_cfg: Any, cohorts: Optional[Sequence[str]] = None) -> dict[str, Any]:
    """``{cohort: FeatureBagDataset}`` of every (or the listed) value of the ``cohort`` column; a
    manifest without that column is one cohort named after its file."""
    df = load_manifest_frame(data_cfg)
    classes = df.attrs.get("classes") or sorted(df["label"].unique())
    if "cohort" not in df.columns:
        name = data_cfg.manifest.stem
        return {name: _dataset(df, data_cfg, len(classes))}
    names = list(cohorts) if cohorts else sorted(df["cohort"].unique())
    out = {}
    for name in names:
        sub = df[df["cohort"] == name].reset_index(drop=True)
        if sub.empty:
            raise ValueError(f"{data_cfg.manifest}: cohort '{name}' has no rows. Known cohorts: "
                             f"{sorted(df['cohort'].unique())}.")
        out[name] = _dataset(sub, data_cfg, len(classes))
    return out
