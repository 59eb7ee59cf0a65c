"""Toy bags for the relevance-map check's tests: Gaussian patches, and in every second (positive) bag
two evidence patches whose first feature is 4.0, so a map that scores feature 0 is on the evidence."""

from __future__ import annotations

import numpy as np

from tdamil.data.bags import InMemoryBagDataset


def evidence_bags(n_bags: int, seed: int, sizes: tuple[int, int], dim: int) -> InMemoryBagDataset:
    """``n_bags`` bags of ``sizes[0]``-``sizes[1] - 1`` patches of ``dim`` features, labels 0, 1, 0, 1, ..."""
    rng = np.random.default_rng(seed)
    feats, labels = [], []
    for i in range(n_bags):
        x = rng.standard_normal((int(rng.integers(*sizes)), dim)).astype(np.float32) * 0.5
        if i % 2:
            x[rng.choice(len(x), size=2, replace=False), 0] = 4.0
        feats.append(x)
        labels.append(i % 2)
    return InMemoryBagDataset(feats, labels)
