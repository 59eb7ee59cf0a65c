"""Per-slide quality-control pictures a pathologist can read.

They are drawn on a thumbnail read from the slide at :data:`QC_LONG_SIDE` pixels on the long side
(or the slide's own size when it is smaller), not on the small thumbnail the tissue mask was
computed on. Three pictures per slide, so each can be checked on its own:

* ``<slide_id>.jpg``       the thumbnail, the tissue outline (green) and the encoded patches (blue;
                           patches padded past the slide's edge in orange), with a caption bar that
                           names the slide, counts the patches and says what each colour means;
* ``<slide_id>_mask.png``  the tissue mask alone (white = tissue), same size; a data picture that
                           other tools read as a mask, so it carries no legend;
* ``<slide_id>_grid.jpg``  the thumbnail with the patch grid alone, its legend in a box in the
                           corner with the fewest patches and least tissue.

A padded patch reaches past the slide's right or bottom edge; the part outside the scan is encoded
as white, so such a patch shows less tissue than its square suggests.

The two pictures of tissue are JPEG (quality 90, no chroma subsampling, so thin coloured lines keep
their colour): about 0.7 MB each instead of 2.5 MB as PNG, which matters across thousands of slides.

The mask is enlarged with linear interpolation and cut at 0.5, so the outline follows the tissue
smoothly instead of in thumbnail-pixel stair steps.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import cv2
import numpy as np

from tdamil.atomic import atomic_path

from .reader import Slide
from .tissue import TissueMask

__all__ = ["QC_LONG_SIDE", "LEGEND", "qc_thumbnail", "mask_at", "qc_images", "save_qc_pictures", "save_picture"]

#: Long side of the QC pictures in pixels (at least 1000; smaller slides are drawn at their size).
QC_LONG_SIDE = 1500
TISSUE_RGB = (0, 170, 0)
PATCH_RGB = (30, 80, 230)
PADDED_RGB = (255, 140, 0)


def qc_thumbnail(slide: Slide, long_side: int = QC_LONG_SIDE) -> tuple[np.ndarray, float]:
    """``(rgb, downsample)``: the slide at ``long_side`` px on its long side, or at level 0 when smaller."""
    return slide.thumbnail(max(1.0, max(slide.dimensions) / long_side))


def mask_at(tissue: TissueMask, size: tuple[int, int]) -> np.ndarray:
    """The tissue mask enlarged to ``size = (w, h)``, smoothly (uint8 0/255)."""
    soft = cv2.resize(tissue.mask.astype(np.float32), size, interpolation=cv2.INTER_LINEAR)
    return np.where(soft >= 0.5, 255, 0).astype(np.uint8)


def _draw_grid(img: np.ndarray, coords: np.ndarray, padded: np.ndarray, ps0: int, ds: float) -> None:
    side = max(1, int(round(ps0 / ds)))
    thick = max(1, round(max(img.shape[:2]) / 750))
    for (x, y), pad in zip(np.asarray(coords).reshape(-1, 2), padded):
        x0, y0 = int(round(x / ds)), int(round(y / ds))
        cv2.rectangle(img, (x0, y0), (x0 + side - 1, y0 + side - 1), PADDED_RGB if pad else PATCH_RGB, thick)


#: (colour, meaning) of every mark on the QC pictures
LEGEND = ((TISSUE_RGB, "tissue outline"), (PATCH_RGB, "encoded patch"),
          (PADDED_RGB, "patch padded past the slide's edge (white outside)"))
_FONT = cv2.FONT_HERSHEY_SIMPLEX


def _legend_line(img: np.ndarray, x: int, y: int, items: tuple, scale: float) -> None:
    """Colour swatches with their meaning, left to right, baseline ``y``."""
    side = max(6, int(round(14 * scale / 0.45)))
    for rgb, text in items:
        cv2.rectangle(img, (x, y - side + 2), (x + side, y + 2), rgb, thickness=cv2.FILLED)
        x += side + 4
        cv2.putText(img, text, (x, y), _FONT, scale, (0, 0, 0), 1, cv2.LINE_AA)
        x += cv2.getTextSize(text, _FONT, scale, 1)[0][0] + 14


def _caption(img: np.ndarray, text: str) -> np.ndarray:
    """A 32 px bar above the picture: the title on the first line, the colours' meaning on the second."""
    bar = np.full((32, img.shape[1], 3), 255, np.uint8)
    scale = 0.42
    cv2.putText(bar, text, (6, 13), _FONT, scale, (0, 0, 0), 1, cv2.LINE_AA)
    _legend_line(bar, 6, 28, LEGEND, scale * 0.95)
    return np.concatenate([bar, img], axis=0)


def _legend_box(img: np.ndarray, busy: np.ndarray, items: tuple) -> None:
    """The legend in a white box in the corner where ``busy`` (patches, tissue) is least."""
    scale = max(0.4, min(0.8, img.shape[1] / 2500))
    line_h = int(round(24 * scale / 0.45))
    w = max(cv2.getTextSize(t, _FONT, scale, 1)[0][0] for _, t in items) + line_h + 24
    h = line_h * len(items) + 10
    H, W = img.shape[:2]
    if w >= W or h >= H:
        return
    corners = [(0, 0), (W - w, 0), (0, H - h), (W - w, H - h)]
    x0, y0 = min(corners, key=lambda c: busy[c[1]:c[1] + h, c[0]:c[0] + w].sum())
    if busy[y0:y0 + h, x0:x0 + w].max(initial=0) > 255:  # every corner would hide a patch: the caption says it
        return
    cv2.rectangle(img, (x0, y0), (x0 + w - 1, y0 + h - 1), (255, 255, 255), thickness=cv2.FILLED)
    cv2.rectangle(img, (x0, y0), (x0 + w - 1, y0 + h - 1), (120, 120, 120), 1)
    for i, item in enumerate(items):
        _legend_line(img, x0 + 8, y0 + 6 + line_h * (i + 1) - 6, (item,), scale)


def qc_images(thumb: np.ndarray, ds: float, tissue: TissueMask, coords: np.ndarray, patch_size_level0: int,
              padded: Optional[np.ndarray] = None, title: Optional[str] = None) -> dict[str, np.ndarray]:
    """``{"overlay", "mask", "grid"}`` pictures on ``thumb`` (``ds`` level-0 px per thumbnail px)."""
    padded = np.zeros(len(coords), bool) if padded is None else np.asarray(padded, bool)
    h, w = thumb.shape[:2]
    mask = mask_at(tissue, (w, h))
    grid = np.ascontiguousarray(thumb[..., :3], dtype=np.uint8).copy()
    _draw_grid(grid, coords, padded, patch_size_level0, ds)
    overlay = grid.copy()
    if title is not None:
        busy = mask.astype(np.int64) + 255 * 4 * np.any(grid != thumb[..., :3], axis=2)  # patches weigh more
        _legend_box(grid, busy, ((PATCH_RGB, "encoded patch"), (PADDED_RGB, "padded past the edge")))
    contours, _ = cv2.findContours(mask, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_NONE)
    cv2.drawContours(overlay, contours, -1, TISSUE_RGB, thickness=max(2, round(max(h, w) / 500)), lineType=cv2.LINE_AA)
    if title is not None:
        overlay = _caption(overlay, f"{title}: {len(coords)} patches ({int(padded.sum())} padded at the edge), "
                                    f"tissue {tissue.tissue_fraction:.0%}")
    return {"overlay": overlay, "mask": mask, "grid": grid}


def save_picture(path: Path, img: np.ndarray) -> Path:
    """Write an RGB or grey uint8 image atomically, PNG or JPEG by the file's ending."""
    path = Path(path)
    bgr = cv2.cvtColor(img, cv2.COLOR_RGB2BGR) if img.ndim == 3 else img
    params = [cv2.IMWRITE_JPEG_QUALITY, 90, cv2.IMWRITE_JPEG_SAMPLING_FACTOR,
              cv2.IMWRITE_JPEG_SAMPLING_FACTOR_444] if path.suffix.lower() == ".jpg" else []
    with atomic_path(path, suffix=".tmp" + path.suffix) as tmp:
        if not cv2.imwrite(str(tmp), bgr, params):
            raise OSError(f"{path}: could not write the picture")
    return path


def save_qc_pictures(qc_dir: Path, slide_id: str, slide: Slide, tissue: TissueMask, coords: np.ndarray,
                     patch_size_level0: int, padded: Optional[np.ndarray] = None) -> list[Path]:
    """Write the three QC pictures of one slide into ``qc_dir`` (see module docstring)."""
    thumb, ds = qc_thumbnail(slide)
    imgs = qc_images(thumb, ds, tissue, coords, patch_size_level0, padded, title=slide_id)
    names = {"overlay": f"{slide_id}.jpg", "mask": f"{slide_id}_mask.png", "grid": f"{slide_id}_grid.jpg"}
    return [save_picture(Path(qc_dir) / names[k], img) for k, img in imgs.items()]
