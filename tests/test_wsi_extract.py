"""Site extraction end to end on real H&E pixels, with the seeded tiny encoder and 2 workers.

The site holds the real 20x cmu slide, a 40x pyramid with a 2x level, a 40x slide without one
(resize path), a slide without recorded resolution (fixed by the manifest's mpp column), one
without resolution or override, a file that is not a slide, a slide with a corrupt tile, and a
manifest row whose file is missing.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
import yaml

from tdamil.data.config import DataConfig
from tdamil.data.h5 import read_features
from tdamil.wsi.cli import main as cli_main
from tdamil.wsi.encoders import load_encoder
from tdamil.wsi.extract import ExtractionConfig, extract_site
from tdamil.wsi.grid import plan_read, tissue_grid
from tdamil.wsi.reader import open_slide
from tdamil.wsi.testslides import upsample, write_pyramid
from tdamil.wsi.tissue import segment_tissue

CMU = Path(__file__).parent / "data" / "cmu_small_region.svs"
GOOD = {"cmu": 17, "s40": 11, "s40_resize": 11, "nompp_fixed": 11}


def _corrupt_tile(src: Path, dst: Path, page: int, x: int, y: int) -> None:
    """Copy a tiled TIFF and overwrite the tile of pyramid ``page`` holding (x, y) with garbage."""
    data = bytearray(src.read_bytes())
    with tifffile.TiffFile(src) as tif:
        page = tif.pages[page]
        per_row = -(-page.imagewidth // page.tilewidth)
        index = (y // page.tilelength) * per_row + x // page.tilewidth
        off, n = page.dataoffsets[index], page.databytecounts[index]
    data[off: off + n] = b"\xff" * n
    dst.write_bytes(bytes(data))


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("site_a")
    slides = root / "slides"
    slides.mkdir()
    shutil.copy(CMU, slides / "cmu.svs")
    with open_slide(CMU) as s:
        rgb = s.read_region((0, 0), 0, s.dimensions)
    up = upsample(rgb[:2048, :2048], 2)
    write_pyramid(slides / "s40.tif", up, 0.25, (1, 2, 4))
    write_pyramid(slides / "s40_resize.svs", up, 0.25, (1, 4), fmt="svs")
    write_pyramid(slides / "nompp_fixed.tif", up, None, (1, 4))
    shutil.copy(slides / "nompp_fixed.tif", slides / "nompp.tif")
    (slides / "notaslide.svs").write_bytes(b"garbage" * 500)
    # a tile of the 2x level (the one patches are read from), inside a tissue cell
    _corrupt_tile(slides / "s40.tif", slides / "corrupt.tif", page=1, x=1024 + 150, y=1024 + 150)
    (root / "manifest.csv").write_text(
        "slide_id,patient_id,label,mpp\n"
        "cmu,p1,MSS,\ns40,p2,MSI,\ns40_resize,p3,MSS,\nnompp_fixed,p4,MSI,0.25\n"
        "nompp,p5,MSS,\nnotaslide,p6,MSI,\ncorrupt,p7,MSS,\ngone,p8,MSI,\n"
    )
    data = DataConfig(manifest=root / "manifest.csv", features_dir=root / "features", slides_dir=slides)
    cfg = ExtractionConfig(encoder="tiny", batch_size=4, num_workers=2, progress=False)
    summary = extract_site(data, cfg)
    return {"root": root, "data": data, "cfg": cfg, "summary": summary, "cmu_rgb": rgb}


def test_good_slides_are_extracted_and_bad_ones_reported(site):
    summary = site["summary"]
    status = {r.slide_id: r.status for r in summary.results}
    assert [r.slide_id for r in summary.results] == ["cmu", "s40", "s40_resize", "nompp_fixed", "nompp",
                                                     "notaslide", "corrupt", "gone"]
    assert {k for k, v in status.items() if v == "extracted"} == set(GOOD)
    assert {k for k, v in status.items() if v == "failed"} == {"nompp", "notaslide", "corrupt", "gone"}
    assert not summary.ok
    by_id = {r.slide_id: r for r in summary.results}
    for sid, n in GOOD.items():
        assert by_id[sid].n_patches == n
        assert (site["data"].features_dir / f"{sid}.h5").is_file()
        assert (site["data"].features_dir / "qc" / f"{sid}.jpg").is_file()
    nompp = by_id["nompp"]
    assert "nompp.tif" in nompp.reason and "mpp_overrides" in nompp.reason and "mpp" in nompp.fix
    assert "notaslide.svs" in by_id["notaslide"].reason and "not a whole-slide image" in by_id["notaslide"].reason
    corrupt = by_id["corrupt"]
    assert "corrupt.tif" in corrupt.reason and "corrupt" in corrupt.fix
    assert "gone" in by_id["gone"].reason and "slides_dir" in by_id["gone"].fix
    for sid in ("nompp", "notaslide", "corrupt", "gone"):
        assert not (site["data"].features_dir / f"{sid}.h5").exists()
    assert not list(site["data"].features_dir.glob(".*tmp"))  # no temp files left behind
    table = summary.table()
    assert table.row_count == 8 and "4 extracted" in table.caption and "4 failed" in table.caption


def test_features_round_trip_and_match_the_patches(site):
    enc = load_encoder("tiny")
    slide_path = site["root"] / "slides" / "s40.tif"
    bag = read_features(site["data"].features_dir / "s40.h5")
    with open_slide(slide_path) as s:
        plan = plan_read(s)
        coords, _ = tissue_grid(s.dimensions, plan.patch_size_level0, segment_tissue(s))
        patches = np.stack([plan.read(s, int(x), int(y)) for x, y in coords])
    np.testing.assert_array_equal(bag.coords, coords)
    assert bag.features.shape == (11, 64) and bag.features.dtype == np.float32
    with torch.no_grad():
        expected = enc(torch.from_numpy(patches).permute(0, 3, 1, 2)).numpy()
    np.testing.assert_allclose(bag.features, expected, rtol=1e-5, atol=1e-5)
    a = bag.attrs
    assert (a["patch_size"], a["patch_size_level0"], a["read_level"], a["read_size"]) == (512, 1024, 1, 512)
    assert (a["level0_magnification"], a["target_magnification"], a["mpp"]) == (40.0, 20.0, 0.25)
    assert a["encoder"] == "tiny" and a["name"] == "s40" and a["weights_sha256"] == "none"
    assert (a["level0_width"], a["level0_height"], a["overlap"]) == (4096, 4096, 0)
    assert len(a["settings_hash"]) == 16


def test_40x_resize_path_and_20x_original_agree(site):
    fd = site["data"].features_dir
    two_x, resized = read_features(fd / "s40.h5"), read_features(fd / "s40_resize.h5")
    assert (two_x.attrs["read_level"], resized.attrs["read_level"], resized.attrs["read_size"]) == (1, 0, 1024)
    np.testing.assert_array_equal(two_x.coords, resized.coords)
    cmu = read_features(fd / "cmu.h5")
    assert cmu.attrs["patch_size_level0"] == 512 and cmu.attrs["mpp"] == pytest.approx(0.499)
    # the 40x cells are the 20x cells (inside the 2048 px crop) at twice the coordinates
    inside = {tuple(c) for c in cmu.coords.tolist() if c[0] + 512 <= 2048 and c[1] + 512 <= 2048}
    assert {tuple(c) for c in (two_x.coords // 2).tolist()} == inside
    # same tissue through both 40x paths and the 20x original: nearly the same features
    cmu_rows = {tuple(c): f for c, f in zip(cmu.coords.tolist(), cmu.features)}
    scale = np.abs(cmu.features).mean()
    for c, f2, fr in zip(two_x.coords.tolist(), two_x.features, resized.features):
        f20 = cmu_rows[(c[0] // 2, c[1] // 2)]
        assert np.abs(f2 - fr).mean() < 0.05 * scale
        assert np.abs(f2 - f20).mean() < 0.05 * scale
    # while different places differ clearly
    assert np.abs(two_x.features[0] - two_x.features[-1]).mean() > 0.1 * scale


def test_rerun_skips_done_slides_and_override_fixes_missing_mpp(site):
    data, fd = site["data"], site["data"].features_dir
    mtimes = {sid: (fd / f"{sid}.h5").stat().st_mtime_ns for sid in GOOD}
    cfg = ExtractionConfig(encoder="tiny", batch_size=4, num_workers=0, progress=False, mpp_overrides={"nompp": 0.25})
    again = extract_site(data, cfg, slide_ids=list(GOOD) + ["nompp"])
    status = {r.slide_id: r.status for r in again.results}
    assert status == {**{sid: "skipped" for sid in GOOD}, "nompp": "extracted"}
    assert {sid: (fd / f"{sid}.h5").stat().st_mtime_ns for sid in GOOD} == mtimes
    fixed = read_features(fd / "nompp.h5")
    assert fixed.attrs["mpp"] == 0.25 and fixed.attrs["mpp_source"] == "override"
    np.testing.assert_array_equal(fixed.features, read_features(fd / "nompp_fixed.h5").features)
    # other settings -> extracted again
    stricter = ExtractionConfig(encoder="tiny", batch_size=4, num_workers=0, progress=False, min_tissue=0.9, qc=False)
    third = extract_site(data, stricter, slide_ids=["cmu"])
    assert third.results[0].status == "extracted" and third.results[0].n_patches < GOOD["cmu"]


def _write_site_yaml(root: Path, extraction: dict) -> Path:
    cfg = {
        "site": "site_a",
        "data": {"manifest": "manifest.csv", "features_dir": "features_cli", "slides_dir": "slides"},
        "extraction": extraction,
        "train": {"anything": "the training client validates this section, not tdamil-extract"},
        "federation": {"superlink": "127.0.0.1:9092"},
    }
    path = root / "configs" / "sites" / "site_a.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    cfg["data"] = {k: f"../../{v}" for k, v in cfg["data"].items()}
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_cli_reads_only_its_sections_and_reports(site, capsys):
    root = site["root"]
    path = _write_site_yaml(root, {"encoder": "tiny", "batch_size": 8, "num_workers": 0, "qc": False,
                                   "mpp_overrides": {"nompp": 0.25}})
    code = cli_main(["--site", "site_a", "--configs-dir", str(path.parent), "--slides", "cmu", "nompp",
                     "--no-progress", "--log-level", "WARNING"])
    assert code == 0
    assert (root / "features_cli" / "cmu.h5").is_file() and (root / "features_cli" / "nompp.h5").is_file()
    code = cli_main(["--config", str(path), "--slides", "cmu", "notaslide", "--no-progress", "--log-level", "ERROR"])
    assert code == 1  # one slide failed; the other was skipped
    err = capsys.readouterr().err
    assert "notaslide" in err and "skipped" in err

    bad = _write_site_yaml(root, {"encoder": "tiny", "batchsize": 8})
    assert cli_main(["--config", str(bad), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "batchsize" in err and "Did you mean 'batch_size'" in err
    nowts = _write_site_yaml(root, {"encoder": "uni"})
    assert cli_main(["--config", str(nowts), "--no-progress"]) == 2
    assert "extraction.weights" in capsys.readouterr().err


def test_manifest_slide_path_column_and_no_location(site):
    root = site["root"]
    manifest = root / "manifest_paths.csv"
    manifest.write_text("slide_id,patient_id,label,slide_path\nA1,p1,MSS,slides/cmu.svs\nB2,p2,MSI,\n")
    data = DataConfig(manifest=manifest, features_dir=root / "features_paths")  # no slides_dir
    cfg = ExtractionConfig(encoder="tiny", batch_size=8, num_workers=0, progress=False, qc=False)
    summary = extract_site(data, cfg)
    a1, b2 = summary.results
    assert (a1.status, a1.n_patches, a1.slide_path) == ("extracted", GOOD["cmu"], root / "slides" / "cmu.svs")
    assert read_features(root / "features_paths" / "A1.h5").attrs["slide_file"] == "cmu.svs"
    assert b2.status == "failed" and "slides_dir" in b2.reason and "slide_path" in b2.reason
