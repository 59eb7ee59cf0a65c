"""Bag datasets: lazy h5 feature reading with clear errors; in-memory bags."""

import numpy as np
import pytest
import torch

from tdamil.data.bags import Bag, BagDataset, BagFileError, FeatureBagDataset, InMemoryBagDataset
from tdamil.data.h5 import write_features
from tdamil.data.manifest import load_manifest


def _write(folder, slide_id, n=7, d=16, seed=0):
    rng = np.random.default_rng(seed)
    feats = rng.normal(size=(n, d)).astype(np.float32)
    coords = np.arange(2 * n, dtype=np.int64).reshape(n, 2) * 512
    write_features(folder / f"{slide_id}.h5", feats, coords, {"name": slide_id, "patch_size": 512})
    return feats, coords


def test_feature_bag_dataset_reads_lazily(tmp_path):
    f1, c1 = _write(tmp_path, "s1", n=5)
    _write(tmp_path, "s2", n=9, seed=1)
    ds = FeatureBagDataset(tmp_path, ["s1", "s2"], [0, 1], num_classes=2)
    assert isinstance(ds, BagDataset)
    assert len(ds) == 2 and ds.labels == [0, 1] and ds.in_dim == 16 and ds.num_classes == 2
    bag = ds[0]
    assert isinstance(bag, Bag) and bag.slide_id == "s1" and bag.label == 0
    assert bag.features.dtype == torch.float32 and torch.allclose(bag.features, torch.from_numpy(f1))
    assert torch.equal(bag.coords, torch.from_numpy(c1))
    assert ds[1].features.shape == (9, 16)
    sub = ds.subset([1])
    assert sub.slide_ids == ["s2"] and sub[0].label == 1


def test_from_manifest(tmp_path):
    _write(tmp_path, "a")
    _write(tmp_path, "b")
    csv = tmp_path / "m.csv"
    csv.write_text("slide_id,patient_id,label\na,1,MSI\nb,2,MSS\n")
    ds = FeatureBagDataset.from_manifest(load_manifest(csv, ["MSS", "MSI"]), tmp_path)
    assert ds.labels == [1, 0] and ds.num_classes == 2


def test_missing_file_is_reported_with_fix(tmp_path):
    _write(tmp_path, "s1")
    with pytest.raises(BagFileError, match=r"missing for 1 of 2 slides: .*s2\.h5.*tdamil-extract"):
        FeatureBagDataset(tmp_path, ["s1", "s2"], [0, 1], num_classes=2)
    with pytest.raises(BagFileError, match="feature folder not found"):
        FeatureBagDataset(tmp_path / "nope", ["s1"], [0], num_classes=2)


def test_wrong_dim_names_file(tmp_path):
    _write(tmp_path, "s1", d=16)
    _write(tmp_path, "s2", d=32)
    ds = FeatureBagDataset(tmp_path, ["s1", "s2"], [0, 1], num_classes=2, in_dim=16)
    ds[0]
    with pytest.raises(BagFileError, match=r"s2\.h5: feature dim 32 but this dataset expects 16"):
        ds[1]


def test_malformed_h5_names_file(tmp_path):
    _write(tmp_path, "good")
    (tmp_path / "bad.h5").write_bytes(b"this is not an hdf5 file at all")
    ds = FeatureBagDataset(tmp_path, ["good", "bad"], [0, 1], num_classes=2)
    with pytest.raises(BagFileError, match=r"bad\.h5"):
        ds[1]


def test_in_memory_dataset():
    ds = InMemoryBagDataset([np.ones((3, 4)), np.zeros((5, 4))], [1, 0], num_classes=2)
    assert len(ds) == 2 and ds.in_dim == 4 and ds.bag_sizes == [3, 5] and ds.slide_ids == ["bag_0000", "bag_0001"]
    assert ds[0].features.dtype == torch.float32 and ds[0].label == 1
    assert ds.subset([1]).labels == [0]
    with pytest.raises(ValueError, match="different feature dims"):
        InMemoryBagDataset([np.ones((3, 4)), np.ones((3, 5))], [0, 1])
    with pytest.raises(ValueError, match="labels must lie"):
        InMemoryBagDataset([np.ones((3, 4))], [2], num_classes=2)
