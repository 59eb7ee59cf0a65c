"""The ``data:`` section of a site's YAML: where a site's manifest, slides and feature cache live."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional


@dataclass
class DataConfig:
    """Where one site's data lives. Relative paths are relative to the YAML file.

    manifest:      CSV with columns slide_id, patient_id, label and optionally cohort, split, fold,
                   slide_path (see ``tdamil.data.manifest``).
    features_dir:  feature cache, one ``<slide_id>.h5`` per slide (TRIDENT/CLAM layout). Written by
                   ``tdamil-extract``, read by training.
    slides_dir:    whole-slide images; when set, slides without cached features are extracted first.
                   A slide is ``<slides_dir>/<slide_id>.<ext>`` or the manifest's ``slide_path``.
    classes:       class names in label order; default: the manifest's labels, sorted.
    features_suffix: ending of the feature files, ``.h5`` (default; tdamil, TRIDENT, CLAM h5) or
                   ``.pt`` to train on and predict from CLAM's ``<slide_id>.pt`` tensors.
    """

    manifest: Path
    features_dir: Path
    slides_dir: Optional[Path] = None
    classes: Optional[list[str]] = None
    features_suffix: str = ".h5"

    def __post_init__(self) -> None:
        if self.features_suffix not in (".h5", ".hdf5", ".pt", ".pth"):
            raise ValueError(f"data.features_suffix '{self.features_suffix}' is not a feature file ending; "
                             "use .h5 (tdamil/TRIDENT/CLAM h5) or .pt (CLAM tensors)")
