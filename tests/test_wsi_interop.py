"""Issue 12 on the real cmu slide: extraction without labels, edge patches, readable QC pictures,
QuPath GeoJSON, CLAM/TRIDENT interoperability (patch_level, attribute-less h5, .pt suffix)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import yaml

from tdamil.data.config import DataConfig
from tdamil.data.h5 import read_features, write_features
from tdamil.data.manifest import ManifestError, load_manifest
from tdamil.wsi.cli import main as cli_main
from tdamil.wsi.extract import ExtractionConfig, extract_site
from tdamil.wsi.geojson import geojson_for_slide
from tdamil.wsi.heatmap import heatmap_for_slide, patch_size_level0_of
from tdamil.wsi.reader import open_slide
from tdamil.wsi.testslides import upsample, write_pyramid

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CMU = Path(__file__).parent / "data" / "cmu_small_region.svs"
W, H = 2220, 2967


@pytest.fixture(scope="module")
def extracted(tmp_path_factory) -> dict:
    """The cmu slide extracted from a manifest that has slide ids only (no patient, no label)."""
    root = tmp_path_factory.mktemp("nolabels")
    (root / "slides").mkdir()
    shutil.copy(CMU, root / "slides" / "cmu.svs")
    (root / "manifest.csv").write_text("slide_id\ncmu\n")
    data = DataConfig(manifest=root / "manifest.csv", features_dir=root / "features", slides_dir=root / "slides")
    summary = extract_site(data, ExtractionConfig(encoder="tiny", batch_size=16, num_workers=0, progress=False))
    return {"root": root, "data": data, "summary": summary, "h5": root / "features" / "cmu.h5"}


def test_extraction_needs_slide_ids_only_but_training_stays_strict(extracted):
    assert [r.status for r in extracted["summary"].results] == ["extracted"]
    with pytest.raises(ManifestError, match="patient_id, label"):
        load_manifest(extracted["root"] / "manifest.csv")


def test_a_folder_of_slides_is_enough(extracted, tmp_path):
    cfg = {"site": "s", "data": {"features_dir": str(tmp_path / "f"), "slides_dir": str(extracted["root"] / "slides")},
           "extraction": {"encoder": "tiny", "num_workers": 0, "qc": False}}
    (tmp_path / "site.yaml").write_text(yaml.safe_dump(cfg))
    assert cli_main(["--config", str(tmp_path / "site.yaml"), "--no-progress", "--log-level", "WARNING"]) == 0
    assert read_features(tmp_path / "f" / "cmu.h5").features.shape[0] == 17
    del cfg["data"]["slides_dir"]
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(cfg))
    assert cli_main(["--config", str(tmp_path / "bad.yaml"), "--no-progress"]) == 2


def test_edge_cells_with_tissue_are_patched_padded_white_and_recorded(extracted):
    bag = read_features(extracted["h5"])
    bottom = bag.coords[:, 1] + 512 > H
    assert bottom.sum() == 3  # the bottom 407 px hold dense tissue: 3 cells reach past the edge
    assert bag.padded is not None and bag.padded.tolist() == bottom.tolist()
    assert bag.attrs["n_padded"] == 3 and bag.attrs["padding"] == "white"
    # what the encoder saw: the part past the slide's edge is white
    from tdamil.wsi.grid import plan_read

    with open_slide(CMU) as s:
        x, y = bag.coords[np.flatnonzero(bottom)[0]]
        patch = plan_read(s).read(s, int(x), int(y))
    inside = H - int(y)
    assert (patch[inside:] == 255).all() and patch[:inside].mean() < 230


def test_trident_reader_gets_512_px_patches(extracted):
    a = read_features(extracted["h5"]).attrs
    assert a["level0_magnification"] == 20 and a["target_magnification"] == 20 and a["mpp"] == pytest.approx(0.499)
    # TRIDENT: patch_size_src = round(patch_size * level0_mag / target_mag); its writer uses // on ints
    assert round(a["patch_size"] * a["level0_magnification"] / a["target_magnification"]) == a["patch_size_level0"] == 512
    assert a["patch_size"] * int(a["level0_magnification"]) // int(a["target_magnification"]) == 512


def test_qc_pictures_are_large_and_mask_and_grid_stand_alone(extracted):
    qc = extracted["root"] / "features" / "qc"
    overlay, mask, grid = (cv2.imread(str(qc / n)) for n in ("cmu.jpg", "cmu_mask.png", "cmu_grid.jpg"))
    assert max(mask.shape[:2]) == 1500 and max(grid.shape[:2]) == 1500  # not the 93 px thumbnail enlarged
    assert overlay.shape[0] == grid.shape[0] + 32  # caption bar
    ds = W / mask.shape[1]
    m = mask[..., 0] > 0
    assert 0.3 < m.mean() < 0.9
    assert not m[int(600 / ds): int(800 / ds), int(100 / ds): int(300 / ds)].any()  # glass, top left
    # the grid picture: each patch's top-left corner drawn in blue (BGR), orange for padded ones
    bag = read_features(extracted["h5"])
    for (x, y), pad in zip(bag.coords, bag.padded):
        px = grid[int(round(y / ds)) + 1, int(round(x / ds)) + 1].astype(int)  # inside the 2 px line
        assert np.abs(px - ([0, 140, 255] if pad else [230, 80, 30])).max() < 45, (x, y, px)


def _check_geojson(path: Path, dims: tuple[int, int]) -> list[dict]:
    doc = json.loads(path.read_text())
    assert doc["type"] == "FeatureCollection" and doc["features"]
    for f in doc["features"]:
        assert f["type"] == "Feature" and f["geometry"]["type"] == "Polygon"
        assert f["properties"]["objectType"] in ("annotation", "tile", "detection")
        assert all(isinstance(v, float) for v in f["properties"]["measurements"].values())
        for ring in f["geometry"]["coordinates"]:
            assert len(ring) >= 4 and ring[0] == ring[-1]  # closed linear ring
            xy = np.asarray(ring, dtype=float)
            assert np.isfinite(xy).all() and xy.shape[1] == 2
            assert (xy[:, 0] >= 0).all() and (xy[:, 0] <= dims[0]).all()
            assert (xy[:, 1] >= 0).all() and (xy[:, 1] <= dims[1]).all()
    return doc["features"]


def test_tissue_geojson_of_extraction_is_valid_in_level0_pixels(extracted):
    feats = _check_geojson(extracted["root"] / "features" / "qc" / "cmu.tissue.geojson", (W, H))
    assert {f["properties"]["objectType"] for f in feats} == {"annotation"}
    xs = np.concatenate([np.asarray(f["geometry"]["coordinates"][0])[:, 0] for f in feats])
    assert xs.max() > 0.8 * W  # level-0 pixels, not thumbnail pixels


def test_qupath_geojson_of_a_prediction(extracted, tmp_path):
    bag = read_features(extracted["h5"])
    scores = np.linspace(0, 1, len(bag))
    out = geojson_for_slide(tmp_path / "cmu.geojson", CMU, extracted["h5"], scores,
                            slide_measurements={"P(MSI)": 0.8, "P(MSS)": 0.2})
    feats = _check_geojson(out, (W, H))
    tiles = [f for f in feats if f["properties"]["objectType"] == "tile"]
    assert len(tiles) == len(bag)
    assert [t["properties"]["measurements"]["patch score"] for t in tiles] == pytest.approx(scores.tolist())
    assert all(f["properties"]["measurements"]["P(MSI)"] == 0.8 for f in feats)
    first = np.asarray(tiles[0]["geometry"]["coordinates"][0])
    assert first[:, 0].min() == bag.coords[0][0] and first[:, 0].max() == bag.coords[0][0] + 512


@pytest.fixture(scope="module")
def slide40(tmp_path_factory) -> Path:
    with open_slide(CMU) as s:
        rgb = s.read_region((0, 0), 0, (1024, 1024))
    return write_pyramid(tmp_path_factory.mktemp("s40") / "s40.tif", upsample(rgb, 2), 0.25, (1, 2, 4))


def test_clam_patch_size_at_patch_level_and_attributeless_files(slide40, tmp_path):
    coords = np.array([[x, y] for y in range(0, 2048, 1024) for x in range(0, 2048, 1024)])
    with open_slide(slide40) as s:
        downs = s.level_downsamples
    clam = {"patch_size": 512, "patch_level": 1}  # 512 px at level 1 = 1024 level-0 px on this 40x slide
    assert patch_size_level0_of(clam, coords, downs) == 1024
    assert patch_size_level0_of({}, coords, downs) == 1024  # from the coordinates' spacing
    for name, attrs in (("clam", clam), ("bare", {})):
        h5 = write_features(tmp_path / f"{name}.h5", np.zeros((4, 3), np.float32), coords, attrs)
        png = heatmap_for_slide(tmp_path / f"{name}.png", slide40, h5, np.array([0.0, 0.3, 0.6, 1.0]),
                                thumbnail_downsample=16, title=None)
        img = cv2.imread(str(png))
        assert img is not None
    # the squares cover the whole 2048 px slide: no thumbnail pixel is left uncoloured by jet
    from tdamil.wsi.heatmap import score_canvas

    canvas = score_canvas((128, 128), coords, np.array([0.0, 0.3, 0.6, 1.0]), 1024, 16.0)
    assert np.isfinite(canvas).all()


def test_clam_pt_files_through_the_data_config_suffix(tmp_path):
    from tdamil.federation.data import split_datasets

    feats = tmp_path / "pt"
    feats.mkdir()
    rows = ["slide_id,patient_id,label"]
    for i in range(6):
        torch.save(torch.full((5, 8), float(i)), feats / f"s{i}.pt")
        rows.append(f"s{i},p{i},{'AB'[i % 2]}")
    (tmp_path / "m.csv").write_text("\n".join(rows) + "\n")
    data = DataConfig(manifest=tmp_path / "m.csv", features_dir=feats, features_suffix=".pt")
    parts = split_datasets(data, val_fraction=0.0, test_fraction=0.0)
    bag = parts["train"][0]
    assert bag.features.shape == (5, 8)
    with pytest.raises(ValueError, match="features_suffix"):
        DataConfig(manifest=tmp_path / "m.csv", features_dir=feats, features_suffix="h5")
