"""The ``extraction:`` section of a site YAML and the settings hash that names a slide's features.

A feature file records :func:`settings_hash` of everything that determines its content; a rerun
with the same hash skips the slide, any change (encoder, weights, patch size, tissue settings,
format version) extracts it again.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal, Optional

from .encoders import get_spec
from .tissue import TissueConfig

__all__ = ["ExtractionConfig", "ExtractionError", "settings_hash", "FEATURE_FORMAT_VERSION", "SLIDE_EXTENSIONS"]

#: Bumped when the meaning of the stored features changes (forces re-extraction).
#: 2: edge cells holding tissue are patched (padded with white outside the slide).
FEATURE_FORMAT_VERSION = 2

SLIDE_EXTENSIONS = [".svs", ".tif", ".tiff", ".ndpi", ".mrxs", ".scn", ".svslide", ".bif", ".vms", ".vmu", ".dcm"]


@dataclass
class ExtractionConfig:
    """The ``extraction:`` section of a site YAML. Relative paths are relative to the YAML file.

    encoder:              registry name (``uni``, ``uni2_h``, ``virchow2``, ``hoptimus0``,
                          ``gigapath``, ``resnet50_trunc``, ``conch``, ``phikon_v2``, ``tiny``).
                          Default ``uni``.
    weights:              LOCAL weights file of the encoder (required except for ``tiny``);
                          nothing is ever downloaded.
    batch_size:           patches per encoder batch (default 64).
    num_workers:          DataLoader processes reading patches (default 4; 0 = read in the main
                          process).
    device:               ``auto`` (CUDA when available, else CPU), ``cpu``, ``cuda``, ``cuda:1``...
    precision:            ``auto`` (bf16/fp16 autocast on GPU, fp32 on CPU), ``fp32``, ``fp16``, ``bf16``.
    patch_size:           patch side in pixels at the target magnification (default 512).
    target_magnification: 20.0 (= 0.5 um/px; magnification = 10 / mpp).
    min_tissue:           keep grid cells with at least this tissue fraction (default 0.1: a 512 px
                          patch at 20x then still shows about 6,500 um^2 of tissue; at 0.25 edge
                          cells of epithelium and thin strands were lost, benchmarks/tissue.md).
    mpp_overrides:        ``{slide_id: microns_per_pixel}`` for slides whose files lack or misstate
                          their resolution (a manifest ``mpp`` column works too; this wins).
    backend:              ``openslide`` (default), ``tiffslide`` (optional extra) or ``auto``.
    tissue:               tissue-mask settings (:class:`~tdamil.wsi.tissue.TissueConfig`).
    qc:                   write QC pictures per slide (default true): tissue outline + patch grid,
                          the tissue mask and the grid alone, and the tissue contours as GeoJSON.
    qc_dir:               where QC pictures go (default ``<features_dir>/qc``).
    overwrite:            re-extract even when the feature file has the same settings (default false).
    slide_extensions:     file endings tried for ``<slides_dir>/<slide_id>.<ext>``.
    progress:             show progress bars (default true).
    claim_stale_minutes:  a slide claimed by another extraction process whose heartbeat is older
                          than this is taken over (default 30; a dead process on this host at once).
    """

    encoder: str = "uni"
    weights: Optional[Path] = None
    batch_size: int = 64
    num_workers: int = 4
    device: str = "auto"
    precision: Literal["auto", "fp32", "fp16", "bf16"] = "auto"
    patch_size: int = 512
    target_magnification: float = 20.0
    min_tissue: float = 0.1
    mpp_overrides: dict[str, float] = field(default_factory=dict)
    backend: Literal["auto", "openslide", "tiffslide"] = "openslide"
    tissue: TissueConfig = field(default_factory=TissueConfig)
    qc: bool = True
    qc_dir: Optional[Path] = None
    overwrite: bool = False
    slide_extensions: list[str] = field(default_factory=lambda: list(SLIDE_EXTENSIONS))
    progress: bool = True
    claim_stale_minutes: float = 30.0

    def __post_init__(self) -> None:
        get_spec(self.encoder)  # EncoderError (a ValueError) lists the known names
        if self.batch_size < 1:
            raise ValueError("batch_size must be >= 1 (default 64)")
        if self.num_workers < 0:
            raise ValueError("num_workers must be >= 0 (0 reads patches in the main process)")
        if self.patch_size < 8:
            raise ValueError("patch_size must be >= 8 pixels (default 512)")
        if not 0.0 < self.target_magnification <= 200.0:
            raise ValueError("target_magnification must be in (0, 200], e.g. 20 for 0.5 um/px")
        if not 0.0 <= self.min_tissue <= 1.0:
            raise ValueError("min_tissue must be between 0 and 1 (default 0.1)")
        for sid, mpp in self.mpp_overrides.items():
            if not 0.05 <= float(mpp) <= 20.0:
                raise ValueError(f"mpp_overrides.{sid} = {mpp} is not a plausible um/px (0.25 for 40x, 0.5 for 20x)")
        if self.claim_stale_minutes <= 0:
            raise ValueError("claim_stale_minutes must be > 0 (default 30)")
        if get_spec(self.encoder).needs_weights and self.weights is None:
            raise ValueError(
                f"encoder '{self.encoder}' needs weights: set extraction.weights to its local weights file "
                "(tdamil never downloads weights), or use encoder: tiny for a test run"
            )

    @property
    def target_mpp(self) -> float:
        """Microns per pixel of the patches (10 / target_magnification)."""
        return 10.0 / self.target_magnification


class ExtractionError(RuntimeError):
    """Extraction cannot start at all (no slides, bad encoder). Per-slide problems never raise."""


def settings_hash(ext_cfg: ExtractionConfig, weights_sha256: str, mpp_override: Optional[float]) -> str:
    """16 hex digits identifying everything that determines a slide's features."""
    payload = {
        "format": FEATURE_FORMAT_VERSION,
        "encoder": get_spec(ext_cfg.encoder).name,
        "weights_sha256": weights_sha256,
        "patch_size": ext_cfg.patch_size,
        "target_mpp": round(ext_cfg.target_mpp, 6),
        "min_tissue": ext_cfg.min_tissue,
        "tissue": asdict(ext_cfg.tissue),
        "mpp_override": mpp_override,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]
