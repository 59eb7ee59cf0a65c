"""Digits MIL bags: the MNIST-bags protocol on scikit-learn's digits, and non-IID sites."""

import numpy as np
import pytest
import torch

from tdamil.data.digits import DigitsBagsConfig, load_digit_images, make_digits_bags, make_digits_sites


def _image_keys(ds):
    return {tuple(np.round(row, 4)) for i in range(len(ds)) for row in ds[i].features.numpy()}


def test_protocol_properties():
    cfg = DigitsBagsConfig(num_train_bags=100, num_val_bags=50, num_test_bags=1000, seed=1)
    bags = make_digits_bags(cfg)
    assert (len(bags.train), len(bags.val), len(bags.test)) == (100, 50, 1000)
    images, digits = load_digit_images()
    key_to_digits = {}
    for im, d in zip(images, digits):
        key_to_digits.setdefault(tuple(np.round(im, 4)), set()).add(int(d))
    for ds in (bags.train, bags.test):
        for i in range(len(ds)):
            b = ds[i]
            assert b.features.shape[1] == 64
            # label rule: positive iff the bag holds the target digit (checked on the pixels)
            has9 = [9 in key_to_digits[tuple(np.round(r, 4))] for r in b.features.numpy()]
            assert b.label == int(any(has9))
            assert b.label == int(b.instance_labels.max())
    sizes = np.array(bags.test.bag_sizes)
    assert abs(sizes.mean() - 10) < 0.3 and 1.5 < sizes.std() < 2.5 and sizes.min() >= cfg.min_bag_size
    assert abs(np.mean(bags.test.labels) - 0.5) < 0.01


def test_pools_are_disjoint():
    bags = make_digits_bags(DigitsBagsConfig(num_train_bags=200, num_val_bags=100, num_test_bags=400))
    tr, va, te = _image_keys(bags.train), _image_keys(bags.val), _image_keys(bags.test)
    # a handful of identical 8x8 images exist in the raw data; pools are disjoint by index
    images, _ = load_digit_images()
    dup = len(images) - len({tuple(np.round(r, 4)) for r in images})
    assert len(tr & te) <= dup and len(va & te) <= dup and len(tr & va) <= dup


def test_seeded_and_wsi_like_variant():
    a = make_digits_bags(DigitsBagsConfig(num_test_bags=20, seed=5))
    b = make_digits_bags(DigitsBagsConfig(num_test_bags=20, seed=5))
    assert all(torch.equal(a.train[i].features, b.train[i].features) for i in range(len(a.train)))
    w = make_digits_bags(DigitsBagsConfig.wsi_like(num_train_bags=30, num_val_bags=10, num_test_bags=30))
    pos = [w.train[i] for i in range(len(w.train)) if w.train[i].label == 1]
    assert pos and all(1 <= int(b.instance_labels.sum()) <= 3 for b in pos)
    assert 85 < np.mean(w.train.bag_sizes) < 115


def test_sites_are_non_iid_with_held_out_cohort():
    cfg = DigitsBagsConfig(num_train_bags=60, num_val_bags=20, num_test_bags=200, seed=0)
    sites = make_digits_sites(cfg, 3, site_test_bags=40)
    assert list(sites) == ["site_a", "site_b", "site_c"]
    pos = [np.mean(s.train.labels) for s in sites.values()]
    size = [np.mean(s.train.bag_sizes) for s in sites.values()]
    assert pos[0] < pos[1] < pos[2] and size[0] < size[1] < size[2]
    assert len(sites.held_out) == 200 and set(sites.held_out.labels) == {0, 1}
    held = _image_keys(sites.held_out)
    a, c = _image_keys(sites["site_a"].train), _image_keys(sites["site_c"].train)
    assert len(held & a) <= 3 and len(a & c) <= 3
    again = make_digits_sites(cfg, 3, site_test_bags=40)
    assert torch.equal(again["site_b"].train[0].features, sites["site_b"].train[0].features)
    with pytest.raises(ValueError):
        make_digits_sites(cfg, 2, site_names=["x", "x"])
