"""``tdamil-train``: train and test one MIL model locally (no federation).

    tdamil-train --config configs/train_digits.yaml
    tdamil-train --config configs/train_digits.yaml --model abmil      # ablation: one flag
    tdamil-train --config configs/train_msi_example.yaml --output runs/msi

The YAML has the sections of :class:`TrainRunConfig`: ``model`` (any model of
:mod:`tdamil.models`), ``train`` (:class:`~tdamil.train.engine.TrainConfig`), ``dataset``
(``digits`` = the embedded digits bags, or ``manifest`` = a site's manifest + feature cache given
in ``data``), ``split`` and ``output_dir``.

Written to ``<output_dir>/<model name>/`` (``fold_<k>/`` inside it with k-fold CV):
``metrics.csv`` (one row per epoch), ``learning_curve.png``, ``test_metrics.json`` (with 95 % CIs),
``test_predictions.csv``, ``best.pt``, ``last.pt`` and ``config.yaml`` (the resolved settings);
with k-fold also ``cv_summary.json`` (mean and std over folds). With feature files (``dataset:
manifest``) every file must record the same extraction (:mod:`tdamil.data.contract`), and that
contract goes into ``best.pt`` / ``last.pt`` as ``feature_contract`` (``tdamil-predict`` checks it).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Literal, Optional, Sequence

import numpy as np
import yaml

from tdamil.checkpoint import CheckpointError, annotate_checkpoint
from tdamil.config import ConfigError, json_safe, load_config, to_dict
from tdamil.data.bags import (
    BagDataset,
    BagFileError,
    FeatureBagDataset,
    InMemoryBagDataset,
)
from tdamil.data.config import DataConfig
from tdamil.data.contract import (
    ContractError,
    FeatureContract,
    contract_of_files,
    feature_paths,
)
from tdamil.data.digits import DigitsBagsConfig, make_digits_bags
from tdamil.data.manifest import ManifestError, load_manifest
from tdamil.data.splits import (
    folds_from_column,
    patient_kfold,
    patient_split,
    split_from_column,
)
from tdamil.logs import one_line, setup_logging
from tdamil.stats import (
    CI_METRICS,
    Interval,
    bootstrap_ci,
    format_interval,
    interval_columns,
)
from tdamil.train.engine import TrainConfig, evaluate, fit, seed_everything
from tdamil.train.faithfulness import check_model
from tdamil.train.metrics import METRIC_KEYS
from tdamil.train.plots import plot_learning_curve

logger = logging.getLogger(__name__)

__all__ = ["SplitConfig", "TrainRunConfig", "run", "main"]


@dataclass
class SplitConfig:
    """How slides are split (manifest datasets; digits bags come with their own train/val/test).

    val_fraction:  share of patients for validation / early stopping (0.15).
    test_fraction: share of patients for the test set (0.15); ignored with k-fold.
    k_folds:       0 = one train/val/test split. k >= 2 = k-fold CV: for a manifest, each fold of
                   patients is the test set once and ``val_fraction`` of the rest validates; for
                   digits, the train+val bags are folded (each fold validates once) and the test bags
                   stay the test set. A manifest ``fold`` column, if present, defines the folds; a
                   ``split`` column, if present, fixes a single split.
    seed:          seed of the random split (0).
    """

    val_fraction: float = 0.15
    test_fraction: float = 0.15
    k_folds: int = 0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.k_folds == 1 or self.k_folds < 0:
            raise ValueError(f"k_folds must be 0 (single split) or >= 2, got {self.k_folds}")


@dataclass
class TrainRunConfig:
    """A ``tdamil-train`` YAML file.

    output_dir: results folder (``runs/train``, relative to the YAML); results go to
                ``<output_dir>/<model name>/``.
    dataset:    ``digits`` (embedded default, no download) or ``manifest`` (needs ``data``).
    model:      the model section, e.g. ``{name: tdamil, dim: 512, depth: 2}`` (see tdamil.models).
    train:      training settings (TrainConfig).
    digits:     digits bags settings when ``dataset: digits``.
    data:       manifest + feature folder when ``dataset: manifest``.
    split:      splitting settings (SplitConfig).
    log_level:  DEBUG, INFO (default) or WARNING.
    """

    output_dir: Path = Path("runs/train")
    dataset: Literal["digits", "manifest"] = "digits"
    model: dict[str, Any] = field(default_factory=lambda: {"name": "tdamil"})
    train: TrainConfig = field(default_factory=TrainConfig)
    digits: DigitsBagsConfig = field(default_factory=DigitsBagsConfig)
    data: Optional[DataConfig] = None
    split: SplitConfig = field(default_factory=SplitConfig)
    log_level: Literal["DEBUG", "INFO", "WARNING"] = "INFO"

    def __post_init__(self) -> None:
        if self.dataset == "manifest" and self.data is None:
            raise ValueError("dataset: manifest needs a data section with manifest and features_dir")


@dataclass
class _Fold:
    name: str
    train: BagDataset
    val: Optional[BagDataset]
    test: Optional[BagDataset]


def _model_section(model: dict[str, Any], override: Optional[str], source: str) -> Any:
    """The model section as a validated config; ``override`` swaps the model, keeping shared keys."""
    from tdamil.models import config_class, model_config_from_dict

    section = dict(model)
    if override is not None and override != section.get("name"):
        known = {f.name for f in fields(config_class(override))}
        dropped = sorted(k for k in section if k not in known and k != "name")
        section = {k: v for k, v in section.items() if k in known}
        section["name"] = override
        if dropped:
            logger.info("--model %s: ignoring model setting(s) %s that %s does not have.", override, ", ".join(dropped), override)
    return model_config_from_dict(section, source=f"{source}: model")


def _datasets(cfg: TrainRunConfig) -> list[_Fold]:
    """Build the train/val/test datasets (one entry per fold)."""
    if cfg.dataset == "digits":
        bags = make_digits_bags(cfg.digits)
        if cfg.split.k_folds >= 2:
            both = _concat(bags.train, bags.val)
            folds = patient_kfold(both.slide_ids, both.labels, k=cfg.split.k_folds, seed=cfg.split.seed)
            return [_Fold(f"fold_{i}", both.subset(tr), both.subset(va), bags.test) for i, (tr, va) in enumerate(folds)]
        return [_Fold("", bags.train, bags.val, bags.test)]

    assert cfg.data is not None
    df = load_manifest(cfg.data.manifest, cfg.data.classes)
    full = FeatureBagDataset.from_manifest(df, cfg.data.features_dir, suffix=cfg.data.features_suffix)
    patients, labels = df["patient_id"].tolist(), df["label_index"].tolist()
    if cfg.split.k_folds >= 2:
        if "fold" in df.columns:
            logger.info("Using the manifest's fold column (%d folds).", df["fold"].nunique())
            folds = folds_from_column(df["fold"].tolist())
        else:
            folds = patient_kfold(patients, labels, k=cfg.split.k_folds, seed=cfg.split.seed)
        out = []
        for i, (rest, test) in enumerate(folds):
            inner = patient_split([patients[j] for j in rest], [labels[j] for j in rest], val_fraction=cfg.split.val_fraction, test_fraction=0.0, seed=cfg.split.seed + i)
            out.append(_Fold(f"fold_{i}", full.subset(rest[inner.train]), full.subset(rest[inner.val]), full.subset(test)))
        return out
    if "split" in df.columns and (df["split"] != "").all():
        logger.info("Using the manifest's split column.")
        sp = split_from_column(df["split"].tolist())
    else:
        sp = patient_split(patients, labels, val_fraction=cfg.split.val_fraction, test_fraction=cfg.split.test_fraction, seed=cfg.split.seed)
    return [_Fold("", full.subset(sp.train), full.subset(sp.val), full.subset(sp.test))]


def _concat(a: InMemoryBagDataset, b: InMemoryBagDataset) -> InMemoryBagDataset:
    items = [a[i] for i in range(len(a))] + [b[i] for i in range(len(b))]
    return InMemoryBagDataset(
        [x.features for x in items], [x.label for x in items], [x.slide_id for x in items], num_classes=a.num_classes,
        instance_labels=[x.instance_labels for x in items],
    )


def _feature_contract(folds: list[_Fold]) -> Optional[FeatureContract]:
    """The extraction all of the run's feature files record (None for in-memory bags); files that
    disagree raise :class:`ContractError` before any training."""
    paths = feature_paths(ds for fold in folds for ds in (fold.train, fold.val, fold.test))
    if not paths:
        return None
    contract = contract_of_files(paths)
    logger.info("Features of %d files: %s (recorded in the checkpoints as feature_contract)", len(paths),
                contract.describe())
    return contract


def run(cfg: TrainRunConfig, *, model_override: Optional[str] = None, source: str = "<config>") -> dict[str, Any]:
    """Train and test as configured; returns ``{"model": name, "folds": [test metrics...], "out_dir": path}``."""
    from tdamil.models import create_model

    model_cfg = _model_section(cfg.model, model_override, source)
    if cfg.train.num_threads is not None:
        import torch

        torch.set_num_threads(cfg.train.num_threads)
    name = model_cfg.name
    root = Path(cfg.output_dir).resolve() / name
    root.mkdir(parents=True, exist_ok=True)
    resolved = to_dict(cfg)
    resolved["model"] = to_dict(model_cfg)
    (root / "config.yaml").write_text(yaml.safe_dump(resolved, sort_keys=False))
    folds = _datasets(cfg)
    contract = _feature_contract(folds)
    results = []
    for fold in folds:
        out = root / fold.name if fold.name else root
        logger.info(
            "%s%s: %d train / %d val / %d test bags, D=%d, %d classes -> %s",
            name, f" {fold.name}" if fold.name else "", len(fold.train), len(fold.val or []), len(fold.test or []),
            fold.train.in_dim, fold.train.num_classes, out,
        )
        seed_everything(cfg.train.seed)
        model = create_model(model_cfg, in_dim=fold.train.in_dim, num_classes=fold.train.num_classes)
        res = fit(model, fold.train, fold.val, cfg.train, out_dir=out, model_config=model_cfg)
        for ckpt in (out / "best.pt", out / "last.pt") if contract is not None else ():
            if ckpt.is_file():
                annotate_checkpoint(ckpt, feature_contract=contract.to_dict())
        plot_learning_curve(res.history, out / "learning_curve.png", monitor=cfg.train.monitor, title=f"{name} {fold.name}".strip())
        test_metrics: dict[str, float] = {}
        if fold.test is not None and len(fold.test) > 0:
            ev = evaluate(model, fold.test, mixed_precision=cfg.train.mixed_precision)
            # 95 % CIs: stratified bootstrap over the test set's patients (tdamil.stats)
            test_metrics = ev.metrics | interval_columns(bootstrap_ci(ev.labels, ev.probs, fold.test.patient_ids))
            ev.predictions_table().to_csv(out / "test_predictions.csv", index=False, float_format="%.6f")
            if ev.instance_metrics is not None:  # bags with instance labels (digits; annotated slides)
                test_metrics = test_metrics | ev.instance_metrics
                logger.info("%s test instance level: %s", name, ", ".join(f"{k} {v:.3f}" for k, v in ev.instance_metrics.items()))
        # is the relevance map faithful? label-free, on the validation bags (tdamil.train.faithfulness)
        check = check_model(model, fold.val if fold.val is not None and len(fold.val) else fold.train)
        (logger.warning if check.flagged else logger.info)("%s%s: %s.", name, f" {fold.name}" if fold.name else "",
                                                            check.sentence(f"{name}'s relevance map"))
        summary = {
            "model": name,
            "fold": fold.name or None,
            "relevance_map": {"verdict": check.verdict, "validation_bags_checked": max(check.bags, 0),
                              "deletion_gap": check.mean_gap, "sign_test_p": check.p_value},
            "best_epoch": res.best_epoch,
            "epochs_run": len(res.history),
            "stopped_early": res.stopped_early,
            f"val_{cfg.train.monitor}": res.best_value,
            "test": test_metrics,
        }
        (out / "test_metrics.json").write_text(json.dumps(json_safe(summary | {"test": test_metrics}), indent=2))
        if test_metrics:
            logger.info(
                "%s%s test (95%% CI): AUROC %s, balanced accuracy %s, F1 %s (n=%d, best epoch %d)",
                name, f" {fold.name}" if fold.name else "",
                *(format_interval(Interval(*(test_metrics[k + part] for part in ("", "_ci_low", "_ci_high"))))
                  for k in CI_METRICS),
                int(test_metrics["n"]), res.best_epoch,
            )
        results.append(test_metrics)
    if len(folds) > 1:
        cv = {}
        for k in METRIC_KEYS:
            vals = np.asarray([r.get(k, math.nan) for r in results], dtype=float)
            cv[k] = {"mean": float(np.nanmean(vals)) if np.isfinite(vals).any() else None, "std": float(np.nanstd(vals)) if np.isfinite(vals).any() else None, "folds": json_safe([float(v) for v in vals])}
        (root / "cv_summary.json").write_text(json.dumps({"model": name, "k_folds": len(folds), "test": cv}, indent=2))
        logger.info("%s %d-fold CV test AUROC %.4f +- %.4f", name, len(folds), cv["auroc"]["mean"] or math.nan, cv["auroc"]["std"] or math.nan)
    return {"model": name, "folds": results, "out_dir": root}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tdamil-train", description="Train and test a MIL model on one site's data (or the embedded digits bags).")
    p.add_argument("--config", required=True, type=Path, help="training YAML, e.g. configs/train_digits.yaml")
    p.add_argument("--model", default=None, help="model name overriding the YAML's model.name (tdamil, transformer_mil, transmil, abmil, gated_abmil, mean_pool)")
    p.add_argument("--output", type=Path, default=None, help="results folder (overrides output_dir)")
    p.add_argument("--epochs", type=int, default=None, help="override train.epochs")
    p.add_argument("--seed", type=int, default=None, help="override train.seed (and digits.seed)")
    p.add_argument("--device", default=None, help="override train.device (auto, cpu, cuda)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (for log files)")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    overrides: dict[str, Any] = {}
    if args.epochs is not None:
        overrides["train.epochs"] = args.epochs
    if args.seed is not None:
        overrides["train.seed"] = args.seed
        overrides["digits.seed"] = args.seed
    if args.device is not None:
        overrides["train.device"] = args.device
    if args.no_progress:
        overrides["train.progress"] = False
    try:
        from tdamil.models import MODEL_NAMES

        if args.model is not None and args.model not in MODEL_NAMES:
            raise ConfigError(f"--model {args.model!r} is not a model; choose one of {', '.join(MODEL_NAMES)}.")
        cfg = load_config(args.config, TrainRunConfig, overrides=overrides)
        if args.output is not None:
            cfg = replace(cfg, output_dir=args.output)
        setup_logging(level=cfg.log_level)
        out = run(cfg, model_override=args.model, source=str(args.config))
    except (ConfigError, ManifestError, BagFileError, CheckpointError, ContractError, ValueError) as exc:
        print(f"tdamil-train: error: {one_line(exc)}", file=sys.stderr)  # once, on one line; not logged as well
        return 2
    except FloatingPointError as exc:
        print(f"tdamil-train: training diverged: {exc}", file=sys.stderr)
        return 1
    print(f"Results in {out['out_dir']}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
