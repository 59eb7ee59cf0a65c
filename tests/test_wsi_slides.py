"""Slide reading, resolution, tissue segmentation and the patch grid, on real H&E pixels.

``tests/data/cmu_small_region.svs`` is a real Aperio H&E scan (20x, 0.499 um/px, CC0; see
tests/data/README.md). 40x slides are written from its pixels (2x bicubic enlargement), so a
patch read from them at 20x must match the original 20x pixels at half the coordinates.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from tdamil.wsi.grid import plan_read, tissue_grid
from tdamil.wsi.reader import (
    MissingMppError,
    SlideError,
    SlideOpenError,
    mpp_from_properties,
    open_slide,
    to_rgb_white,
)
from tdamil.wsi.testslides import upsample, write_pyramid
from tdamil.wsi.tissue import TissueConfig, segment_tissue, tissue_mask_from_rgb

CMU = Path(__file__).parent / "data" / "cmu_small_region.svs"


def _saturation(rgb: np.ndarray) -> np.ndarray:
    return cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV)[..., 1]


@pytest.fixture(scope="module")
def cmu_rgb() -> np.ndarray:
    with open_slide(CMU) as s:
        return s.read_region((0, 0), 0, s.dimensions)


@pytest.fixture(scope="module")
def slides40(tmp_path_factory, cmu_rgb) -> dict[str, Path]:
    """40x versions of the top-left 2048x2048 of the cmu slide: with a 2x level, without one."""
    d = tmp_path_factory.mktemp("slides40")
    up = upsample(cmu_rgb[:2048, :2048], 2)
    return {
        "pyramid": write_pyramid(d / "s40.tif", up, 0.25, (1, 2, 4)),
        "no2x": write_pyramid(d / "s40_no2x.svs", up, 0.25, (1, 4), fmt="svs"),
        "nompp": write_pyramid(d / "s40_nompp.tif", up[:1024, :1024], None, (1,)),
    }


def test_cmu_slide_resolution_from_metadata():
    with open_slide(CMU) as s:
        assert s.dimensions == (2220, 2967)
        assert s.mpp == pytest.approx(0.499)
        assert s.mpp_source == "openslide.mpp-x"
        assert s.magnification == pytest.approx(20.04, abs=0.01)


def test_mpp_sources_in_priority_order():
    assert mpp_from_properties({"aperio.MPP": "0.2527"}) == (0.2527, "aperio.MPP")
    # 1 / (101600 px per inch) = 0.25 um/px
    mpp, src = mpp_from_properties({"tiff.XResolution": "101600", "tiff.ResolutionUnit": "inch"})
    assert mpp == pytest.approx(0.25) and "inch" in src
    # scanners that do not know write 0 or a screen resolution (72 dpi): not a resolution
    assert mpp_from_properties({"openslide.mpp-x": "0", "tiff.XResolution": "72", "tiff.ResolutionUnit": "inch"}) == (None, "")
    assert mpp_from_properties({"openslide.mpp-x": "0.5", "aperio.MPP": "0.25"})[0] == 0.5


def test_missing_mpp_is_an_error_naming_the_file_and_the_override(slides40):
    path = slides40["nompp"]
    with pytest.raises(MissingMppError) as err:
        open_slide(path, slide_id="case_7")
    msg = str(err.value)
    assert str(path) in msg and "mpp_overrides" in msg and "case_7" in msg and "'mpp' column" in msg
    with open_slide(path, mpp_override=0.25) as s:
        assert s.mpp == 0.25 and s.mpp_source == "override"
        assert plan_read(s).patch_size_level0 == 1024
    with pytest.raises(SlideError, match="not a plausible resolution"):
        open_slide(path, mpp_override=25.0)


def test_not_a_slide_and_missing_file_errors(tmp_path):
    fake = tmp_path / "broken.svs"
    fake.write_bytes(b"this is not a slide" * 100)
    with pytest.raises(SlideOpenError, match=r"broken\.svs: not a whole-slide image.*remove it from the manifest"):
        open_slide(fake)
    truncated = tmp_path / "truncated.svs"
    truncated.write_bytes(CMU.read_bytes()[:5000])
    with pytest.raises(SlideOpenError, match=r"truncated\.svs"):
        open_slide(truncated)
    with pytest.raises(SlideOpenError, match=r"missing\.svs: slide file not found.*slides_dir"):
        open_slide(tmp_path / "missing.svs")


def test_transparent_pixels_are_painted_white():
    rgba = np.zeros((2, 2, 4), np.uint8)
    rgba[0, 0] = (200, 10, 10, 255)  # opaque tissue stays
    rgba[1, 1] = (0, 0, 0, 0)  # outside the scan -> white
    rgba[0, 1] = (100, 100, 100, 128)  # half transparent -> blended toward white
    out = to_rgb_white(rgba)
    assert out[0, 0].tolist() == [200, 10, 10]
    assert out[1, 1].tolist() == [255, 255, 255]
    assert 170 <= out[0, 1, 0] <= 185


def test_tissue_mask_finds_tissue_not_glass():
    with open_slide(CMU) as s:
        tm = segment_tissue(s)
    assert 28 <= tm.downsample <= 36
    h, w = tm.mask.shape
    ds = tm.downsample
    glass = tm.mask[int(400 / ds): int(900 / ds), : int(400 / ds)]  # empty glass, left of the tissue
    tissue = tm.mask[int(2000 / ds): int(2500 / ds), int(1000 / ds): int(1300 / ds)]  # dense dermis
    assert glass.mean() < 0.02
    assert tissue.mean() > 0.9
    assert 0.15 < tm.tissue_fraction < 0.6
    # the dust speck at the top-left corner (about 5 thumbnail px) is filtered by area
    assert not tm.mask[:4, :4].any()


def test_blank_glass_gives_no_tissue():
    rng = np.random.default_rng(0)
    glass = np.clip(235 + rng.normal(0, 4, (200, 200, 3)), 0, 255).astype(np.uint8)
    mask, thr = tissue_mask_from_rgb(glass, TissueConfig(), um2_per_px=256.0)
    assert thr >= TissueConfig().min_saturation
    assert not mask.any()


def test_grid_cells_land_on_tissue(cmu_rgb):
    with open_slide(CMU) as s:
        tm = segment_tissue(s)
        plan = plan_read(s)
        assert (plan.patch_size_level0, plan.level, plan.read_size) == (512, 0, 512)  # 0.499 snaps to 20x
        coords, frac = tissue_grid(s.dimensions, plan.patch_size_level0, tm, min_tissue=0.25)
        all_cells, _ = tissue_grid(s.dimensions, plan.patch_size_level0, tm, min_tissue=0.0)
        assert len(all_cells) == -(-2220 // 512) * -(-2967 // 512)  # edge cells reach past the slide
        assert 4 <= len(coords) < len(all_cells)
        assert (frac >= 0.25).all()
        for x, y in coords:
            patch = plan.read(s, int(x), int(y))
            assert patch.shape == (512, 512, 3)
            inside = cmu_rgb[y: y + 512, x: x + 512]
            h, w = inside.shape[:2]
            np.testing.assert_array_equal(patch[:h, :w], inside)
            assert (patch[h:] == 255).all() and (patch[:, w:] == 255).all()  # padded white past the edge
            assert (_saturation(patch) > 30).mean() > 0.2, (x, y)
        kept = {tuple(c) for c in coords.tolist()}
        for x, y in all_cells.tolist():
            if (x, y) not in kept:  # dropped cells are mostly glass
                assert (_saturation(cmu_rgb[y: y + 512, x: x + 512]) > 30).sum() / 512 ** 2 < 0.35, (x, y)
        # raising the bar keeps a subset
        strict, _ = tissue_grid(s.dimensions, plan.patch_size_level0, tm, min_tissue=0.9)
        assert {tuple(c) for c in strict.tolist()} < kept


@pytest.mark.parametrize("which, level, read_size", [("pyramid", 1, 512), ("no2x", 0, 1024)])
def test_40x_slides_read_20x_patches_at_the_right_place(slides40, cmu_rgb, which, level, read_size):
    with open_slide(slides40[which]) as s:
        assert s.mpp == pytest.approx(0.25)
        plan = plan_read(s)
        assert (plan.patch_size_level0, plan.level, plan.read_size) == (1024, level, read_size)
        assert plan.needs_resize == (read_size != 512)
        tm = segment_tissue(s)
        coords, _ = tissue_grid(s.dimensions, plan.patch_size_level0, tm)
        # same cells as the 20x original over the same area, at twice the coordinates
        with open_slide(CMU) as s20:
            c20, _ = tissue_grid(s20.dimensions, 512, segment_tissue(s20))
        inside = c20[(c20[:, 0] + 512 <= 2048) & (c20[:, 1] + 512 <= 2048)]
        assert {tuple(c) for c in coords.tolist()} == {tuple(c) for c in (inside * 2).tolist()}
        for x, y in coords[:3]:
            patch = plan.read(s, int(x), int(y)).astype(np.float32)
            original = cmu_rgb[y // 2: y // 2 + 512, x // 2: x // 2 + 512].astype(np.float32)
            assert patch.shape == original.shape
            assert np.abs(patch - original).mean() < 4.0  # same pixels up to resampling
            shifted = cmu_rgb[y // 2 + 64: y // 2 + 576, x // 2: x // 2 + 512].astype(np.float32)
            if shifted.shape == original.shape:  # a misplaced read would be this far off
                assert np.abs(patch - shifted).mean() > 3 * np.abs(patch - original).mean()


def test_backend_choice(monkeypatch):
    """``auto`` uses tiffslide only when it is installed; asking for it without it is a clear error."""
    import tdamil.wsi.reader as reader

    monkeypatch.setattr(reader, "_has_tiffslide", lambda: False)
    with open_slide(CMU, backend="auto") as s:
        assert s.backend == "openslide"
    with pytest.raises(SlideError, match=r"tiffslide.*not installed.*tdamil-fl\[tiffslide\]"):
        open_slide(CMU, backend="tiffslide")
    with pytest.raises(SlideError, match="unknown slide backend"):
        open_slide(CMU, backend="pillow")  # type: ignore[arg-type]
