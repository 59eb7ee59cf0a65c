"""Two slide-like bag generators the selection defaults were NOT tuned on (benchmarks only).

Both give what real slides have and the digits bags do not: rare evidence (0.5-5 % of a positive
bag's patches), bag sizes spread over orders of magnitude (log-uniform), look-alike patches that
are common in NEGATIVE bags too, and per-site feature offsets and scales (scanner / stain shift).
Instance labels (1 = evidence) are kept for evaluation only.

* ``tissue_mixture``: each patch is drawn around one of 8 tissue prototypes (Dirichlet mixture per
  bag); evidence patches around a tumour prototype; look-alikes around a prototype at cosine 0.8
  to the tumour's, present in every bag at 2-15 %.
* ``latent_shift``: patches are a low-rank foundation-model-like embedding of 12 latent factors,
  spatially grouped in regions that share a latent state; evidence is ONE contiguous region whose
  latents are shifted along an evidence direction by a strength that varies per patch; look-alike
  regions (in every bag, more in negatives) are shifted along a direction half aligned with it.

    from benchmarks.slide_bags import make_slide_bags
    train, val, test = make_slide_bags("tissue_mixture", seed=0)
"""

from __future__ import annotations

from typing import Any

import numpy as np

GENERATORS = ("tissue_mixture", "latent_shift")
DIM = 48


def _unit(rng: np.random.Generator, d: int) -> np.ndarray:
    v = rng.standard_normal(d)
    return v / np.linalg.norm(v)


def _size(rng: np.random.Generator, lo: int, hi: int) -> int:
    return int(round(np.exp(rng.uniform(np.log(lo), np.log(hi)))))


class _TissueMixture:
    def __init__(self, rng: np.random.Generator) -> None:
        self.protos = np.stack([3.0 * _unit(rng, DIM) for _ in range(8)])
        tumour = _unit(rng, DIM)
        other = _unit(rng, DIM)
        other -= other @ tumour * tumour
        other /= np.linalg.norm(other)
        self.tumour = 3.0 * tumour
        self.lookalike = 3.0 * (0.8 * tumour + 0.6 * other)  # cosine 0.8 with the tumour prototype

    def bag(self, rng: np.random.Generator, n: int, positive: bool) -> tuple[np.ndarray, np.ndarray]:
        share = rng.uniform(0.005, 0.05) if positive else 0.0
        n_pos = max(1, int(round(share * n))) if positive else 0
        n_look = int(round(rng.uniform(0.02, 0.15) * n))
        n_bg = n - n_pos - n_look
        mix = rng.dirichlet(np.full(len(self.protos), 0.7))
        kinds = rng.choice(len(self.protos), size=n_bg, p=mix)
        x = np.concatenate([self.protos[kinds], np.repeat(self.lookalike[None], n_look, 0),
                            np.repeat(self.tumour[None], n_pos, 0)])
        x = x + rng.standard_normal(x.shape) * 0.5
        y = np.concatenate([np.zeros(n_bg + n_look), np.ones(n_pos)])
        order = rng.permutation(n)
        return x[order], y[order]


class _LatentShift:
    def __init__(self, rng: np.random.Generator) -> None:
        self.w = rng.standard_normal((12, DIM)) / np.sqrt(12)
        self.evidence = _unit(rng, 12)
        side = _unit(rng, 12)
        side -= side @ self.evidence * self.evidence
        side /= np.linalg.norm(side)
        self.lookalike = 0.5 * self.evidence + np.sqrt(0.75) * side  # half aligned

    def bag(self, rng: np.random.Generator, n: int, positive: bool) -> tuple[np.ndarray, np.ndarray]:
        n_regions = max(2, n // 25)
        region = np.sort(rng.integers(0, n_regions, size=n))  # contiguous regions of ~25 patches
        centres = rng.standard_normal((n_regions, 12))
        z = centres[region] * 0.8 + rng.standard_normal((n, 12)) * 0.6
        y = np.zeros(n)
        look_share = rng.uniform(0.05, 0.2) if not positive else rng.uniform(0.02, 0.1)
        for r in rng.permutation(n_regions)[: max(1, int(look_share * n_regions))]:
            idx = region == r
            z[idx] += 1.5 * self.lookalike * rng.uniform(0.6, 1.4, size=(int(idx.sum()), 1))
        if positive:
            start = int(rng.integers(0, n))
            length = max(1, int(round(rng.uniform(0.005, 0.05) * n)))
            idx = np.arange(start, min(n, start + length))
            z[idx] += 4.0 * self.evidence * rng.uniform(0.7, 1.3, size=(len(idx), 1))
            y[idx] = 1
        x = z @ self.w + 0.3 * rng.standard_normal((n, DIM))
        return x, y


def make_slide_bags(generator: str, seed: int = 0, *, train: int = 80, val: int = 80, test: int = 300,
                    sizes: tuple[int, int] = (50, 600), sites: int = 3) -> tuple[Any, Any, Any]:
    """``(train, val, test)`` InMemoryBagDatasets with instance labels; half the bags positive.
    The bags are spread over ``sites`` sites with their own feature offset and scale, round robin."""
    from tdamil.data.bags import InMemoryBagDataset  # noqa: PLC0415

    rng = np.random.default_rng(1000 + seed)
    world = {"tissue_mixture": _TissueMixture, "latent_shift": _LatentShift}[generator](rng)
    offsets = [0.7 * rng.standard_normal(DIM) for _ in range(sites)]
    scales = [rng.uniform(0.8, 1.25) for _ in range(sites)]

    def split(count: int, tag: str) -> Any:
        feats, labels, inst = [], [], []
        for i in range(count):
            positive = bool(i % 2)
            x, y = world.bag(rng, _size(rng, *sizes), positive)
            site = i % sites
            feats.append((x * scales[site] + offsets[site]).astype(np.float32))
            labels.append(int(positive))
            inst.append(y.astype(np.int64))
        return InMemoryBagDataset(feats, labels, slide_ids=[f"{tag}_{i:04d}" for i in range(count)],
                                  instance_labels=inst)

    return split(train, "train"), split(val, "val"), split(test, "test")
