"""The sites of one fold of federated k-fold cross-validation (``folds: k`` in the simulation YAML).

Each site's slides are pooled and cut into ``k`` folds by patient, stratified by label, within the
site (:func:`tdamil.data.splits.patient_kfold`; a manifest ``fold`` column, when present, fixes
them instead). In fold ``f`` a site tests on its fold ``f`` and trains on the rest, of which
``val_fraction`` of the patients validate (:func:`tdamil.data.splits.patient_split`). Held-out
cohorts are never split: every fold evaluates them whole.

* digits sites: a site's train, val and test bags form its pool (a bag is its own patient); the
  validation share is the site's val / (train + val) bags. The hospital options (scanner shift,
  per-site positive share and bag size, ``site_split``) shape the pooled bags as in a single run;
  ``site_train_bags`` is refused (``simulation.config``): the folds re-cut the whole pool, so a
  site's training size follows its pool, not that option;
* manifest sites: a site's pool is its cohort's rows; ``val_fraction`` and ``split_seed`` come from
  ``data.manifest``; a fixed ``split`` column cannot be combined with folds.

The same config and fold give the same sites in every process (the Ray engine rebuilds them).
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from tdamil.config import ConfigError
from tdamil.data.bags import FeatureBagDataset, InMemoryBagDataset
from tdamil.data.splits import folds_from_column, patient_kfold, patient_split
from tdamil.federation.data import cohort_datasets, load_manifest_frame
from tdamil.federation.task import SiteData
from tdamil.simulation.config import SimConfig

logger = logging.getLogger(__name__)

__all__ = ["fold_datasets"]


def _pool(parts: list[Any]) -> InMemoryBagDataset:
    """One in-memory dataset of all bags of ``parts`` (patients and instance labels kept)."""
    bags = [ds[i] for ds in parts if ds is not None for i in range(len(ds))]
    patients = [p for ds in parts if ds is not None for p in ds.patient_ids]
    return InMemoryBagDataset([b.features for b in bags], [b.label for b in bags], [b.slide_id for b in bags],
                              num_classes=parts[0].num_classes, instance_labels=[b.instance_labels for b in bags],
                              patient_ids=patients)


def _digits_pools(cfg: SimConfig) -> tuple[dict[str, Any], dict[str, Any], float, int]:
    from tdamil.data.digits import make_digits_sites  # noqa: PLC0415

    d = cfg.data.digits
    made = make_digits_sites(d.bags, d.num_sites, label_skew=d.label_skew, size_skew=d.size_skew,
                             site_test_bags=d.site_test_bags, held_out_fraction=d.held_out_fraction,
                             site_positive_fractions=d.site_positive_fractions, site_mean_bag_sizes=d.site_mean_bag_sizes,
                             feature_offset=d.feature_offset, feature_scale=d.feature_scale,
                             site_split=tuple(d.site_split))
    pools = {name: _pool([s.train, s.val, s.test]) for name, s in made.items()}
    val_share = d.bags.num_val_bags / max(1, d.bags.num_train_bags + d.bags.num_val_bags)
    return pools, {"held_out": made.held_out}, val_share, d.bags.seed


def _manifest_pools(cfg: SimConfig) -> tuple[dict[str, Any], dict[str, Any], dict[str, list], float, int]:
    m = cfg.data.manifest
    df = load_manifest_frame(m.data)
    where = m.data.manifest
    if "cohort" not in df.columns:
        raise ConfigError(f"{where}: dataset-as-site simulation needs a 'cohort' column in the manifest.")
    if "split" in df.columns and (df["split"].astype(str).str.len() > 0).any():
        raise ConfigError(f"{where}: a fixed 'split' column cannot be combined with folds: {cfg.folds}. Remove the "
                          "column, or set folds: 0 to use it.")
    cohorts = sorted(df["cohort"].unique())
    unknown = [c for c in list(m.held_out) + list(m.sites or []) if c not in cohorts]
    if unknown:
        raise ConfigError(f"{where}: cohorts {unknown} not in the manifest (it has {cohorts}).")
    names = list(m.sites) if m.sites else [c for c in cohorts if c not in m.held_out]
    classes = df.attrs.get("classes") or sorted(df["label"].unique())
    pools, fixed = {}, {}
    for name in names:
        sub = df[df["cohort"] == name].reset_index(drop=True)
        pools[name] = FeatureBagDataset(m.data.features_dir, sub["slide_id"].tolist(), sub["label_index"].tolist(),
                                        len(classes), patient_ids=sub["patient_id"].tolist())
        if "fold" in sub.columns:
            fixed[name] = folds_from_column(sub["fold"].tolist())
    held = cohort_datasets(m.data, m.held_out) if m.held_out else {}
    return pools, held, fixed, m.val_fraction, m.split_seed


def _site_folds(name: str, pool: Any, k: int, seed: int, fixed: dict[str, list]) -> list[tuple[np.ndarray, np.ndarray]]:
    if name in fixed:
        if len(fixed[name]) != k:
            raise ConfigError(f"site {name}: the manifest's fold column has {len(fixed[name])} folds but folds: {k}. "
                              "Set folds to match the column, or remove the column.")
        return fixed[name]
    try:
        return patient_kfold(pool.patient_ids, pool.labels, k=k, seed=seed)
    except ValueError as exc:
        raise ConfigError(f"site {name}: {exc}") from None


def fold_datasets(cfg: SimConfig, fold: int) -> tuple[dict[str, SiteData], dict[str, Any], int]:
    """(sites, held-out cohorts, feature dim) of fold ``fold`` (0-based) of ``cfg.folds``."""
    k = int(cfg.folds)
    if not 0 <= fold < k:
        raise ConfigError(f"fold {fold} does not exist: folds are 0..{k - 1}.")
    if cfg.data.source == "digits":
        pools, held, val_share, seed = _digits_pools(cfg)
        fixed: dict[str, list] = {}
    else:
        pools, held, fixed, val_share, seed = _manifest_pools(cfg)
    sites = {}
    for name, pool in pools.items():
        rest, test = _site_folds(name, pool, k, seed, fixed)[fold]
        patients, labels = np.asarray(pool.patient_ids), np.asarray(pool.labels)
        if val_share > 0:
            inner = patient_split(patients[rest], labels[rest], val_fraction=val_share, test_fraction=0.0,
                                  seed=seed + 1 + fold)
            train, val = rest[inner.train], rest[inner.val]
        else:
            train, val = rest, rest[:0]
        sites[name] = SiteData(name, pool.subset(train), pool.subset(val), pool.subset(test),
                               extra={"fold": fold, "folds": k})
        logger.info("Fold %d/%d, site %s: %d train / %d val / %d test slides (%d test patients).", fold + 1, k, name,
                    len(train), len(val), len(test), len(set(patients[test])))
    in_dim = int(next(iter(sites.values())).train.in_dim)
    return sites, held, in_dim
