"""QC thumbnails and score heatmaps on the real cmu slide."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from tdamil.data.h5 import write_features
from tdamil.wsi.grid import plan_read, tissue_grid
from tdamil.wsi.heatmap import colour_scale, heatmap_for_slide, rank_within_slide, save_heatmap, score_canvas
from tdamil.wsi.qc import qc_images, save_qc_pictures
from tdamil.wsi.reader import open_slide
from tdamil.wsi.tissue import segment_tissue

CMU = Path(__file__).parent / "data" / "cmu_small_region.svs"


def _cmu():
    with open_slide(CMU) as s:
        tm = segment_tissue(s)
        plan = plan_read(s)
        coords, _ = tissue_grid(s.dimensions, plan.patch_size_level0, tm)
    return tm, plan, coords


def test_qc_picture_shows_grid_and_outline(tmp_path):
    tm, plan, coords = _cmu()
    with open_slide(CMU) as s:
        thumb, ds = s.thumbnail(2.0)
        paths = save_qc_pictures(tmp_path / "qc", "cmu", s, tm, coords, plan.patch_size_level0)
    img = qc_images(thumb, ds, tm, coords, plan.patch_size_level0)["overlay"]
    x, y = coords[0]
    # the patch square's top-left corner is drawn in the patch colour, glass far away is untouched
    corner = img[int(round(y / ds)), int(round(x / ds))]
    assert corner.tolist() == [30, 80, 230]
    assert img[int(500 / ds): int(800 / ds), int(50 / ds): int(300 / ds)].mean() > 235  # glass (a few specks of dust)
    green = np.all(img == (0, 170, 0), axis=2)
    assert green.sum() > 2000  # the tissue outline
    assert [p.name for p in paths] == ["cmu.jpg", "cmu_mask.png", "cmu_grid.jpg"]
    png = cv2.imread(str(paths[0]))
    assert png is not None and max(png.shape[:2]) >= 1000


def test_score_canvas_places_each_score_on_its_patch():
    coords = np.array([[0, 0], [64, 0], [0, 64]])
    canvas = score_canvas((10, 10), coords, np.array([0.1, 0.5, 0.9]), patch_size_level0=64, downsample=16.0)
    assert canvas[0:4, 0:4].tolist() == [[0.1] * 4] * 4
    assert np.allclose(canvas[0:4, 4:8], 0.5) and np.allclose(canvas[4:8, 0:4], 0.9)
    assert np.isnan(canvas[4:8, 4:8]).all() and np.isnan(canvas[:, 8:]).all()


def test_heatmap_png_from_a_feature_file(tmp_path):
    tm, plan, coords = _cmu()
    n = len(coords)
    attrs = {"patch_size_level0": plan.patch_size_level0, "name": "cmu"}
    h5 = write_features(tmp_path / "cmu.h5", np.zeros((n, 4), np.float32), coords, attrs)
    scores = np.linspace(0, 1, n)
    out = heatmap_for_slide(tmp_path / "cmu_heatmap.png", CMU, h5, scores, alpha=0.6)
    img = cv2.cvtColor(cv2.imread(str(out)), cv2.COLOR_BGR2RGB)
    # jet: the highest score is painted red-ish, the lowest blue-ish, somewhere in the picture
    red = (img[..., 0] > 150) & (img[..., 2] < 90)
    blue = (img[..., 2] > 150) & (img[..., 0] < 90)
    assert red.sum() > 50 and blue.sum() > 50
    # attention weights: rank-normalised, different picture from the raw one
    out2 = save_heatmap(tmp_path / "att.png", tm.thumbnail, coords, scores ** 4, plan.patch_size_level0,
                        tm.downsample, normalize=True, label="attention")
    out3 = save_heatmap(tmp_path / "raw.png", tm.thumbnail, coords, scores ** 4, plan.patch_size_level0,
                        tm.downsample, label="attention")
    assert not np.array_equal(cv2.imread(str(out2)), cv2.imread(str(out3)))


def test_uniform_attention_is_drawn_as_one_colour_and_says_so(tmp_path, monkeypatch):
    """ABMIL attention identical for every patch (12 at 1/12): one colour, a note, the label once;
    never a blue-to-red gradient in patch order."""
    uniform = np.full(12, 1 / 12)
    values, label, note = colour_scale(uniform, True, "attention")
    assert np.all(values == 0.5)
    assert label == "attention (rank within slide)"
    assert note is not None and "same score (0.08333)" in note
    assert colour_scale(uniform, True, "attention (rank within slide)")[1] == "attention (rank within slide)"
    assert colour_scale(np.zeros(5), False, "relevance")[2] == "every score is 0: no patch selected on this slide"
    assert colour_scale(np.linspace(0, 1, 5), False, "relevance")[2] is None
    # ties share their mean rank; distinct scores still span [0, 1]
    np.testing.assert_allclose(rank_within_slide(np.array([0.1, 0.1, 0.5, np.nan])), [0.25, 0.25, 1.0, np.nan])
    np.testing.assert_allclose(rank_within_slide(np.array([3.0, 1.0, 2.0])), [1.0, 0.0, 0.5])

    # what save_heatmap paints: the scores it hands to the canvas
    import tdamil.wsi.heatmap as heatmap

    painted = []
    monkeypatch.setattr(heatmap, "score_canvas", lambda shape, c, scores, *a: painted.append(scores) or
                        score_canvas(shape, c, scores, *a))
    tm, plan, coords = _cmu()
    n = len(coords)
    for scores in (np.full(n, 1 / n), np.linspace(0, 1, n)):
        out = save_heatmap(tmp_path / "att.png", tm.thumbnail, coords, scores, plan.patch_size_level0, tm.downsample,
                           normalize=True, label="attention")
        assert out.stat().st_size > 1000
    assert np.all(painted[0] == 0.5)  # one colour for the uniform map
    np.testing.assert_allclose(painted[1], np.linspace(0, 1, n))  # distinct scores keep their full range
