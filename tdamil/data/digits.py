"""The embedded default data: MIL bags built from scikit-learn's handwritten digits (no download).

MNIST-bags protocol (Ilse et al., 2018) on ``sklearn.datasets.load_digits`` (1797 images of 8x8
pixels, D = 64 features per instance, scaled to [0, 1]):

* a bag is positive iff it holds at least one image of ``target_digit``;
* bag sizes follow N(``mean_bag_size``, ``std_bag_size``), rounded, at least ``min_bag_size``;
* train, validation and test bags are drawn from DISJOINT image pools (stratified by digit), so a
  test image is never seen in training;
* ``positive_fraction`` of the bags are positive (0.5 by default, balanced classes);
* ``positives_per_bag = [lo, hi]`` fixes how many target images a positive bag holds; by default a
  positive bag holds 1 + Binomial(n - 1, p) of them, with p the target digit's share of the digits
  (the natural rate of the original protocol).

:meth:`DigitsBagsConfig.wsi_like` gives the harder variant: bags of ~100 instances with 1-3
positives, closer to a slide where a few patches decide the label. :meth:`DigitsBagsConfig.distractor`
gives bags of ~20 with 1-2 positives whose negatives are mostly look-alike digits (3, 5, 8: in 8x8
pixels they share most strokes with a 9), like a slide full of tumour mimics.

Every bag carries instance labels (1 = the target digit), so per-patch scores can be checked
(:mod:`tdamil.train.instance_metrics`).

:func:`make_digits_sites` splits the digits between simulated hospitals with different label
balance and bag sizes (non-IID), each with its own train/val/test, plus a held-out cohort from images
no site has, for server-side evaluation; optionally with per-site training-set sizes and a per-site
scanner / stain shift of the features (the held-out cohort being one more hospital).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from tdamil.data.bags import InMemoryBagDataset

logger = logging.getLogger(__name__)

__all__ = ["DigitsBagsConfig", "DigitsBags", "SiteSplits", "DigitsSites", "make_digits_bags", "make_digits_sites", "load_digit_images"]


@dataclass
class DigitsBagsConfig:
    """Settings of the digits MIL bags (the ``digits:`` section of a YAML).

    target_digit:       digit that makes a bag positive (9, as in MNIST-bags).
    mean_bag_size:      mean number of images per bag (10).
    std_bag_size:       standard deviation of the bag size (2).
    min_bag_size:       smallest bag (2).
    num_train_bags:     training bags (100).
    num_val_bags:       validation bags, for early stopping / model selection (100).
    num_test_bags:      test bags (1000).
    positive_fraction:  share of positive bags (0.5).
    positives_per_bag:  ``[lo, hi]`` target images in a positive bag (inclusive); ``null`` = natural rate.
    test_pool_fraction: share of the images reserved for test bags (0.5).
    val_pool_fraction:  share of the remaining images reserved for validation bags (0.2).
    distractor_digits:  digits over-represented among a bag's non-target images ([]: none).
    distractor_share:   share of the non-target images drawn from ``distractor_digits`` (0.0; the
                        rest from all non-target digits).
    seed:               seed for the pools and the bags (0).
    """

    target_digit: int = 9
    mean_bag_size: float = 10.0
    std_bag_size: float = 2.0
    min_bag_size: int = 2
    num_train_bags: int = 100
    num_val_bags: int = 100
    num_test_bags: int = 1000
    positive_fraction: float = 0.5
    positives_per_bag: Optional[list[int]] = None
    test_pool_fraction: float = 0.5
    val_pool_fraction: float = 0.2
    distractor_digits: list[int] = field(default_factory=list)
    distractor_share: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0 <= self.target_digit <= 9:
            raise ValueError(f"target_digit must be 0..9, got {self.target_digit}")
        if self.mean_bag_size < 1 or self.std_bag_size < 0 or self.min_bag_size < 1:
            raise ValueError("mean_bag_size >= 1, std_bag_size >= 0 and min_bag_size >= 1 are required")
        if not 0 <= self.positive_fraction <= 1:
            raise ValueError(f"positive_fraction must be in [0, 1], got {self.positive_fraction}")
        if min(self.num_train_bags, self.num_val_bags, self.num_test_bags) < 0:
            raise ValueError("bag counts must be >= 0")
        if not (0 < self.test_pool_fraction < 1 and 0 <= self.val_pool_fraction < 1):
            raise ValueError("test_pool_fraction must be in (0, 1) and val_pool_fraction in [0, 1)")
        if not 0.0 <= self.distractor_share <= 1.0:
            raise ValueError(f"distractor_share must be in [0, 1], got {self.distractor_share}")
        if self.target_digit in self.distractor_digits or not all(0 <= d <= 9 for d in self.distractor_digits):
            raise ValueError(f"distractor_digits must be digits 0..9 other than the target, got {self.distractor_digits}")
        if self.distractor_share > 0 and not self.distractor_digits:
            raise ValueError("distractor_share > 0 needs distractor_digits (e.g. [3, 5, 8])")
        if self.positives_per_bag is not None:
            lo_hi = list(self.positives_per_bag)
            if len(lo_hi) != 2 or not (1 <= lo_hi[0] <= lo_hi[1]):
                raise ValueError(f"positives_per_bag must be [lo, hi] with 1 <= lo <= hi, got {self.positives_per_bag}")
            if lo_hi[1] > self.min_bag_size:
                # a bag must be able to hold hi positives
                self.min_bag_size = int(lo_hi[1])

    @classmethod
    def wsi_like(cls, **overrides: object) -> "DigitsBagsConfig":
        """Harder, slide-like variant: bags of ~100 images (sd 10) of which only 1-3 are positive."""
        base = dict(mean_bag_size=100.0, std_bag_size=10.0, min_bag_size=20, positives_per_bag=[1, 3])
        base.update(overrides)
        return cls(**base)  # type: ignore[arg-type]

    @classmethod
    def distractor(cls, **overrides: object) -> "DigitsBagsConfig":
        """Look-alike variant: bags of ~20 (sd 4) with 1-2 positives; 70 % of the other images are
        3, 5 or 8, which share most of a 9's strokes, so a model must find the one 9."""
        base = dict(mean_bag_size=20.0, std_bag_size=4.0, min_bag_size=5, positives_per_bag=[1, 2],
                    distractor_digits=[3, 5, 8], distractor_share=0.7)
        base.update(overrides)
        return cls(**base)  # type: ignore[arg-type]


@dataclass
class DigitsBags:
    """Train / validation / test bags from disjoint image pools."""

    train: InMemoryBagDataset
    val: InMemoryBagDataset
    test: InMemoryBagDataset


@dataclass
class SiteSplits:
    """One simulated site's bags."""

    train: InMemoryBagDataset
    val: InMemoryBagDataset
    test: InMemoryBagDataset
    info: dict = field(default_factory=dict)


class DigitsSites(dict):
    """``{site_name: SiteSplits}`` plus ``held_out``: a cohort from images no site has seen."""

    held_out: InMemoryBagDataset

    def __init__(self, sites: dict[str, SiteSplits], held_out: InMemoryBagDataset) -> None:
        super().__init__(sites)
        self.held_out = held_out


def load_digit_images() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits: images as float32 ``[1797, 64]`` in [0, 1] and digit labels ``[1797]``."""
    from sklearn.datasets import load_digits

    d = load_digits()
    return (d.data / 16.0).astype(np.float32), d.target.astype(np.int64)


def _stratified_pools(digits: np.ndarray, fractions: list[float], rng: np.random.Generator) -> list[np.ndarray]:
    """Split image indices into disjoint pools with the given shares, stratified by digit."""
    pools: list[list[int]] = [[] for _ in fractions]
    cum = np.cumsum([0.0] + list(fractions))
    cum = cum / cum[-1]
    for d in np.unique(digits):
        idx = rng.permutation(np.flatnonzero(digits == d))
        cuts = np.round(cum * len(idx)).astype(int)
        for k in range(len(fractions)):
            pools[k].extend(idx[cuts[k] : cuts[k + 1]].tolist())
    return [np.sort(np.asarray(p, dtype=np.int64)) for p in pools]


def _draw_bags(
    images: np.ndarray,
    digits: np.ndarray,
    pool: np.ndarray,
    num_bags: int,
    cfg: DigitsBagsConfig,
    rng: np.random.Generator,
    prefix: str,
    mean_bag_size: Optional[float] = None,
    positive_fraction: Optional[float] = None,
) -> InMemoryBagDataset:
    mean = cfg.mean_bag_size if mean_bag_size is None else mean_bag_size
    pos_frac = cfg.positive_fraction if positive_fraction is None else positive_fraction
    is_target = digits[pool] == cfg.target_digit
    pos_pool, neg_pool = pool[is_target], pool[~is_target]
    if len(pos_pool) == 0 or len(neg_pool) == 0:
        raise ValueError(f"image pool for {prefix} bags lacks target or non-target images; use a larger pool.")
    p_natural = len(pos_pool) / len(pool)
    n_pos_bags = int(round(pos_frac * num_bags))
    bag_labels = np.zeros(num_bags, dtype=np.int64)
    bag_labels[:n_pos_bags] = 1
    bag_labels = rng.permutation(bag_labels)
    feats, labels, ids, inst = [], [], [], []
    for b in range(num_bags):
        n = max(cfg.min_bag_size, int(round(rng.normal(mean, cfg.std_bag_size))))
        if bag_labels[b] == 1:
            if cfg.positives_per_bag is not None:
                lo, hi = cfg.positives_per_bag
                k = int(rng.integers(lo, hi + 1))
            else:
                k = 1 + int(rng.binomial(n - 1, p_natural))
            k = min(k, n)
        else:
            k = 0
        chosen = np.concatenate([rng.choice(pos_pool, size=k, replace=True), _negatives(neg_pool, digits, n - k, cfg, rng)])
        chosen = rng.permutation(chosen)
        inst_lab = (digits[chosen] == cfg.target_digit).astype(np.int64)
        feats.append(images[chosen])
        labels.append(int(inst_lab.max()))  # the MIL rule: positive iff it holds the target digit
        ids.append(f"{prefix}_{b:04d}")
        inst.append(inst_lab)
    return InMemoryBagDataset(feats, labels, ids, num_classes=2, instance_labels=inst)


def _negatives(neg_pool: np.ndarray, digits: np.ndarray, size: int, cfg: DigitsBagsConfig, rng: np.random.Generator) -> np.ndarray:
    """``size`` non-target images; ``distractor_share`` of them (binomially) from the distractor digits."""
    if cfg.distractor_share == 0:  # the original protocol's draw (same random stream, same bags)
        return rng.choice(neg_pool, size=size, replace=True)
    look_alike = neg_pool[np.isin(digits[neg_pool], cfg.distractor_digits)]
    k = int(rng.binomial(size, cfg.distractor_share)) if len(look_alike) else 0
    return np.concatenate([rng.choice(look_alike, size=k, replace=True), rng.choice(neg_pool, size=size - k, replace=True)]).astype(np.int64)


def make_digits_bags(cfg: Optional[DigitsBagsConfig] = None) -> DigitsBags:
    """Train/val/test bags from disjoint image pools (see the module docstring)."""
    cfg = cfg or DigitsBagsConfig()
    images, digits = load_digit_images()
    rng = np.random.default_rng(cfg.seed)
    rest = 1.0 - cfg.test_pool_fraction
    train_pool, val_pool, test_pool = _stratified_pools(
        digits, [rest * (1 - cfg.val_pool_fraction), rest * cfg.val_pool_fraction, cfg.test_pool_fraction], rng
    )
    if cfg.num_val_bags > 0 and len(val_pool) == 0:
        raise ValueError("val_pool_fraction is 0 but num_val_bags > 0; set one of them.")
    out = DigitsBags(
        train=_draw_bags(images, digits, train_pool, cfg.num_train_bags, cfg, rng, "train"),
        val=_draw_bags(images, digits, val_pool, cfg.num_val_bags, cfg, rng, "val") if cfg.num_val_bags else _empty(),
        test=_draw_bags(images, digits, test_pool, cfg.num_test_bags, cfg, rng, "test"),
    )
    logger.info(
        "Digits bags (target %d, seed %d): %d train / %d val / %d test bags from pools of %d / %d / %d images",
        cfg.target_digit, cfg.seed, len(out.train), len(out.val), len(out.test), len(train_pool), len(val_pool), len(test_pool),
    )
    return out


def _empty() -> InMemoryBagDataset:
    return InMemoryBagDataset([], [], [], num_classes=2)


def make_digits_sites(
    cfg: Optional[DigitsBagsConfig] = None,
    num_sites: int = 3,
    *,
    label_skew: float = 0.25,
    size_skew: float = 0.4,
    site_test_bags: int = 200,
    held_out_fraction: float = 0.3,
    site_names: Optional[list[str]] = None,
    site_train_bags: Optional[list[int]] = None,
    site_positive_fractions: Optional[list[float]] = None,
    site_mean_bag_sizes: Optional[list[float]] = None,
    feature_offset: float = 0.0,
    feature_scale: float = 0.0,
    site_split: tuple[float, float, float] = (0.6, 0.2, 0.2),
) -> DigitsSites:
    """Non-IID simulated sites for federated training, plus a held-out cohort.

    The digit images are split (stratified, seeded by ``cfg.seed``) into a held-out pool
    (``held_out_fraction``) and one disjoint pool per site; each site's pool is split again into
    train / val / test pools (``site_split``, 60 / 20 / 20 by default), so no image appears at two
    sites or in two parts.

    Sites differ (linearly from the first to the last site):

    * label balance: positive share ``cfg.positive_fraction`` +- ``label_skew``;
    * bag size: mean ``cfg.mean_bag_size`` * (1 +- ``size_skew``).

    Each site has ``cfg.num_train_bags`` train, ``cfg.num_val_bags`` val and ``site_test_bags`` test
    bags; the held-out cohort has ``cfg.num_test_bags`` bags with the base settings. Site names are
    ``site_a``, ``site_b``, ... unless given.

    Options that make sites differ the way hospitals do (their defaults keep the sites above, bag
    for bag):

    * ``site_train_bags``: training bags per site (one number per site) instead of ``cfg.num_train_bags``;
    * ``site_positive_fractions`` / ``site_mean_bag_sizes``: each site's positive share and mean bag
      size, given outright instead of through ``label_skew`` / ``size_skew``;
    * ``feature_offset`` / ``feature_scale``: a scanner / stain shift. Each site, and the held-out
      cohort as one more hospital, gets its own affine map of the 64 features,
      ``x -> x * exp(a) + b`` with ``a ~ N(0, feature_scale)`` and ``b ~ N(0, feature_offset)`` per
      feature, applied to all its bags (train, val and test alike). The maps come from their own
      random stream, so the bags' images are the same with and without a shift;
    * ``site_split``: the shares of a site's images for its train / val / test pools. A site's test
      bags reuse its test pool's few target images (about 8 with the default split of 3 sites), so
      a larger test share makes a site's test figures depend less on which images it drew.

    Returns:
        :class:`DigitsSites`: a dict ``{site: SiteSplits}`` with a ``held_out`` attribute.
    """
    cfg = cfg or DigitsBagsConfig()
    if num_sites < 1:
        raise ValueError(f"num_sites must be >= 1, got {num_sites}")
    names = list(site_names) if site_names is not None else [f"site_{chr(ord('a') + i)}" for i in range(num_sites)]
    if len(names) != num_sites or len(set(names)) != num_sites:
        raise ValueError(f"site_names must hold {num_sites} distinct names, got {names}")
    if not 0 < held_out_fraction < 1:
        raise ValueError("held_out_fraction must be in (0, 1)")
    per_site = {"site_train_bags": site_train_bags, "site_positive_fractions": site_positive_fractions,
                "site_mean_bag_sizes": site_mean_bag_sizes}
    for key, values in per_site.items():
        if values is not None and len(values) != num_sites:
            raise ValueError(f"{key} must hold one value per site ({num_sites}), got {list(values)}")
    if site_train_bags is not None and min(site_train_bags) < 1:
        raise ValueError(f"site_train_bags must be >= 1 each, got {list(site_train_bags)}")
    if site_positive_fractions is not None and not all(0 < f < 1 for f in site_positive_fractions):
        raise ValueError(f"site_positive_fractions must be in (0, 1) each, got {list(site_positive_fractions)}")
    if feature_offset < 0 or feature_scale < 0:
        raise ValueError("feature_offset and feature_scale must be >= 0")
    if len(site_split) != 3 or min(site_split) <= 0:
        raise ValueError(f"site_split must be three positive shares (train, val, test), got {list(site_split)}")
    images, digits = load_digit_images()
    rng = np.random.default_rng(cfg.seed)
    shifts = _site_shifts(num_sites + 1, images.shape[1], feature_offset, feature_scale, cfg.seed)
    share = (1.0 - held_out_fraction) / num_sites
    pools = _stratified_pools(digits, [held_out_fraction] + [share] * num_sites, rng)
    held_pool, site_pools = pools[0], pools[1:]
    sites: dict[str, SiteSplits] = {}
    for i, (name, pool) in enumerate(zip(names, site_pools)):
        t = 0.0 if num_sites == 1 else (2.0 * i / (num_sites - 1) - 1.0)  # -1 .. +1
        pos_frac = float(np.clip(cfg.positive_fraction + label_skew * t, 0.05, 0.95))
        mean_size = max(float(cfg.min_bag_size), cfg.mean_bag_size * (1.0 + size_skew * t))
        if site_positive_fractions is not None:
            pos_frac = float(site_positive_fractions[i])
        if site_mean_bag_sizes is not None:
            mean_size = max(float(cfg.min_bag_size), float(site_mean_bag_sizes[i]))
        n_train = cfg.num_train_bags if site_train_bags is None else int(site_train_bags[i])
        seen = _shifted(images, shifts, i)
        sub = _stratified_pools(digits[pool], [float(x) for x in site_split], rng)
        tr_pool, va_pool, te_pool = (pool[s] for s in sub)
        kw = dict(mean_bag_size=mean_size, positive_fraction=pos_frac)
        sites[name] = SiteSplits(
            train=_draw_bags(seen, digits, tr_pool, n_train, cfg, rng, f"{name}_train", **kw),
            val=_draw_bags(seen, digits, va_pool, cfg.num_val_bags, cfg, rng, f"{name}_val", **kw) if cfg.num_val_bags else _empty(),
            test=_draw_bags(seen, digits, te_pool, site_test_bags, cfg, rng, f"{name}_test", **kw),
            info={"positive_fraction": pos_frac, "mean_bag_size": mean_size, "images": int(len(pool)),
                  "train_bags": n_train},
        )
        logger.info("Digits site %s: %d train bags, positive share %.2f, mean bag size %.1f, %d images",
                    name, n_train, pos_frac, mean_size, len(pool))
    held = _draw_bags(_shifted(images, shifts, num_sites), digits, held_pool, cfg.num_test_bags, cfg, rng, "held_out")
    return DigitsSites(sites, held)


def _site_shifts(n: int, dim: int, offset: float, scale: float, seed: int) -> Optional[tuple[np.ndarray, np.ndarray]]:
    """Per-hospital log-scales and offsets ``[n, dim]`` (None without a shift), from a stream of
    their own so that the bags' random draws do not depend on them."""
    if offset == 0 and scale == 0:
        return None
    rng = np.random.default_rng([int(seed), 0x5CA1E])
    return rng.normal(0.0, scale, size=(n, dim)), rng.normal(0.0, offset, size=(n, dim))


def _shifted(images: np.ndarray, shifts: Optional[tuple[np.ndarray, np.ndarray]], k: int) -> np.ndarray:
    """Hospital ``k``'s view of the images: ``x * exp(a_k) + b_k`` per feature."""
    if shifts is None:
        return images
    log_scale, offset = shifts
    return (images * np.exp(log_scale[k]) + offset[k]).astype(np.float32)
