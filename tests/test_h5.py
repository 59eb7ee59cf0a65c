"""Feature h5 files: round trip, TRIDENT/CLAM compatibility, atomic writes, clear errors."""

from __future__ import annotations

import os

import h5py
import numpy as np
import pytest
import torch

from tdamil.data.h5 import CHUNK_ROWS, FeatureBag, FeatureFileError, read_attrs, read_features, write_features

ATTRS = {
    "patch_size": 512,
    "patch_size_level0": 1024,
    "level0_magnification": 40.0,
    "target_magnification": 20.0,
    "overlap": 0,
    "level0_width": 40000,
    "level0_height": 30000,
    "name": "slide_1",
    "encoder": "uni",
    "weights_sha256": "ab" * 32,
    "mpp": 0.25,
    "read_level": 1,
    "settings_hash": "0123456789abcdef",
}


def _bag(n: int = 2500, d: int = 16, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    feats = rng.normal(size=(n, d)).astype(np.float32)
    coords = (rng.integers(0, 70, size=(n, 2)) * 1024).astype(np.int64)
    return feats, coords


def test_round_trip_keeps_values_dtypes_and_attrs(tmp_path):
    feats, coords = _bag()
    path = write_features(tmp_path / "slide_1.h5", feats, coords, ATTRS)
    bag = read_features(path)
    assert isinstance(bag, FeatureBag)
    assert bag.features.dtype == np.float32 and bag.coords.dtype == np.int64
    np.testing.assert_array_equal(bag.features, feats)
    np.testing.assert_array_equal(bag.coords, coords)
    for key, value in ATTRS.items():
        assert bag.attrs[key] == value, key
    assert len(bag) == 2500 and bag.dim == 16
    assert read_attrs(path)["settings_hash"] == ATTRS["settings_hash"]


def test_layout_is_trident_compatible(tmp_path):
    """A TRIDENT/CLAM reader opens f['features'], f['coords'] and reads patch attrs from coords."""
    feats, coords = _bag(n=3000)
    path = write_features(tmp_path / "s.h5", feats.astype(np.float64), coords.astype(np.int32), ATTRS)
    with h5py.File(path, "r") as f:
        assert f["features"].dtype == np.float32 and f["features"].shape == (3000, 16)
        assert f["coords"].dtype == np.int64 and f["coords"].shape == (3000, 2)
        assert f["features"].chunks[0] == CHUNK_ROWS
        for key in ("patch_size", "patch_size_level0", "level0_magnification", "target_magnification",
                    "overlap", "level0_width", "level0_height", "name"):
            assert key in f["coords"].attrs and key in f.attrs
        assert f["coords"].attrs["name"] == "slide_1"


def test_write_is_atomic_and_leaves_no_temp_files(tmp_path, monkeypatch):
    feats, coords = _bag(n=10)
    path = write_features(tmp_path / "s.h5", feats, coords, ATTRS)
    before = path.read_bytes()

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        write_features(path, feats * 2, coords, ATTRS)
    assert path.read_bytes() == before  # the finished file is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.h5"]  # temp file cleaned up


def test_empty_bag_round_trips(tmp_path):
    path = write_features(tmp_path / "e.h5", np.zeros((0, 8), np.float32), np.zeros((0, 2), np.int64), {"name": "e"})
    bag = read_features(path)
    assert bag.features.shape == (0, 8) and bag.coords.shape == (0, 2)


def test_write_rejects_bad_arrays(tmp_path):
    feats, coords = _bag(n=5)
    with pytest.raises(ValueError, match="coords must have shape"):
        write_features(tmp_path / "a.h5", feats, coords[:4], {})
    bad = feats.copy()
    bad[2, 3] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        write_features(tmp_path / "b.h5", bad, coords, {})
    with pytest.raises(ValueError, match="2-D"):
        write_features(tmp_path / "c.h5", feats[0], coords, {})
    assert not list(tmp_path.iterdir())


def test_reads_clam_h5(tmp_path):
    feats, coords = _bag(n=40, d=1024)
    path = tmp_path / "clam.h5"
    with h5py.File(path, "w") as f:  # CLAM's create_patches + extract_features layout
        f.create_dataset("features", data=feats)
        c = f.create_dataset("coords", data=coords.astype(np.int32))
        c.attrs["patch_level"] = 0
        c.attrs["patch_size"] = 256
    bag = read_features(path)
    np.testing.assert_array_equal(bag.features, feats)
    assert bag.coords.dtype == np.int64
    assert bag.attrs == {"patch_level": 0, "patch_size": 256}


def test_reads_batched_h5_and_clam_pt(tmp_path):
    feats, coords = _bag(n=7, d=4)
    path = tmp_path / "batched.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("features", data=feats[None])
        f.create_dataset("coords", data=coords[None])
    bag = read_features(path)
    assert bag.features.shape == (7, 4) and bag.coords.shape == (7, 2)

    pt = tmp_path / "slide.pt"
    torch.save(torch.from_numpy(feats).double(), pt)
    bag = read_features(pt)
    assert bag.features.dtype == np.float32 and bag.coords is None
    np.testing.assert_allclose(bag.features, feats)

    pt2 = tmp_path / "slide2.pt"
    torch.save({"features": torch.from_numpy(feats), "coords": torch.from_numpy(coords)}, pt2)
    np.testing.assert_array_equal(read_features(pt2).coords, coords)


def test_errors_name_the_file_and_the_fix(tmp_path):
    missing = tmp_path / "nope.h5"
    with pytest.raises(FeatureFileError, match=r"nope\.h5.*tdamil-extract"):
        read_features(missing)

    feats, coords = _bag(n=3000)
    good = write_features(tmp_path / "good.h5", feats, coords, ATTRS)
    truncated = tmp_path / "truncated.h5"
    truncated.write_bytes(good.read_bytes()[:4000])
    with pytest.raises(FeatureFileError, match=r"truncated\.h5.*(corrupt|datasets).*tdamil-extract"):
        read_features(truncated)

    nofeat = tmp_path / "nofeat.h5"
    with h5py.File(nofeat, "w") as f:
        f.create_dataset("feats", data=feats)
    with pytest.raises(FeatureFileError, match=r"nofeat\.h5.*no 'features'.*feats"):
        read_features(nofeat)

    mismatch = tmp_path / "mismatch.h5"
    with h5py.File(mismatch, "w") as f:
        f.create_dataset("features", data=feats)
        f.create_dataset("coords", data=coords[:10])
    with pytest.raises(FeatureFileError, match=r"mismatch\.h5.*'coords' has shape \(10, 2\)"):
        read_features(mismatch)

    nan = tmp_path / "nan.h5"
    bad = feats.copy()
    bad[5] = np.inf
    with h5py.File(nan, "w") as f:
        f.create_dataset("features", data=bad)
    with pytest.raises(FeatureFileError, match=r"nan\.h5.*1 of 3000 feature rows hold NaN or inf"):
        read_features(nan)

    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a torch file")
    with pytest.raises(FeatureFileError, match=r"junk\.pt.*not a readable torch file"):
        read_features(junk)

    text = tmp_path / "features.csv"
    text.write_text("1,2,3\n")
    with pytest.raises(FeatureFileError, match=r"features\.csv.*unknown feature file type"):
        read_features(text)
    assert issubclass(FeatureFileError, ValueError)
