"""The tissue mask against a reference mask of the repository's real slide (benchmarks/tissue.md).

The reference (tests/data/cmu_small_region_tissue_ref.png) comes from an optical-density procedure
that shares nothing with tdamil.wsi.tissue (benchmarks/bench_tissue.py, reference_mask)."""

from __future__ import annotations

import importlib.util
from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np
import pytest

from tdamil.wsi.extract_config import ExtractionConfig
from tdamil.wsi.reader import open_slide
from tdamil.wsi.tissue import (
    TissueConfig,
    background_saturation,
    segment_tissue,
    tissue_mask_from_rgb,
)

REPO = Path(__file__).resolve().parents[1]
CMU = REPO / "tests" / "data" / "cmu_small_region.svs"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_tissue", REPO / "benchmarks" / "bench_tissue.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def ref(bench):
    return bench.load_reference()


def test_reference_is_the_documented_procedure_of_the_slide(bench, ref):
    with open_slide(CMU) as s:
        rgb = s.read_region((0, 0), 0, s.dimensions)[..., :3]
        assert ref.shape == (s.dimensions[1], s.dimensions[0])
        again = bench.reference_mask(rgb, s.mpp)
    assert (again == ref).mean() > 0.999  # the PNG is what the procedure gives (a codec may differ in a pixel)
    assert 0.35 < ref.mean() < 0.42
    assert not ref[:150, :150].any()  # the dust speck in the top-left corner is not tissue


def test_default_mask_finds_the_reference_tissue(bench, ref):
    with open_slide(CMU) as s:
        tissue = segment_tissue(s)
    r = bench.scores(bench.level0(tissue, ref.shape), ref)
    assert r["recall"] >= 0.97 and r["precision"] >= 0.9, r
    # the thin strand on the left (level-0 rows 1000-1150, columns 100-700) is inside the mask
    strand = ref[1000:1150, 100:700]
    assert bench.level0(tissue, ref.shape)[1000:1150, 100:700][strand].mean() > 0.8


def test_previous_unbounded_otsu_lost_pale_tissue(bench, ref):
    """Otsu alone (threshold 43 here) split the dark from the pale tissue: recall 0.84."""
    with open_slide(CMU) as s:
        tissue = segment_tissue(s, replace(TissueConfig(), background_margin=None, median_blur=7))
    r = bench.scores(bench.level0(tissue, ref.shape), ref)
    assert tissue.threshold > 35 and r["recall"] < 0.9


def test_default_patches_hold_the_reference_tissue(bench, ref):
    """At the default min_tissue every cell with a tenth of reference tissue is patched, none on glass."""
    with open_slide(CMU) as s:
        tissue = segment_tissue(s)
        cells = bench.cells(s, tissue, ref, ExtractionConfig.__dataclass_fields__["min_tissue"].default, 512)
    assert cells["dropped"] == [] and cells["kept_without_tissue"] == 0 and cells["with_tissue"] == 17


def test_tinted_glass_raises_the_bound_and_blank_glass_stays_empty():
    rng = np.random.default_rng(0)
    glass = np.clip(rng.normal(0, 3, (120, 120, 3)) + (238, 232, 214), 0, 255).astype(np.uint8)  # yellowish glass
    hsv = cv2.cvtColor(glass, cv2.COLOR_RGB2HSV)
    assert background_saturation(hsv) > 15
    mask, thr = tissue_mask_from_rgb(glass, TissueConfig(), um2_per_px=256.0)
    assert thr > background_saturation(hsv) and not mask.any()


def test_background_margin_is_validated():
    with pytest.raises(ValueError, match="background_margin"):
        TissueConfig(background_margin=-1)
