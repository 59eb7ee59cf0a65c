"""Apply a trained model to a site's slides: per-slide predictions and relevance heatmaps.

    tdamil-predict --checkpoint runs/federation/checkpoints/best.pt --site site_a
    tdamil-predict --checkpoint runs/train_digits/best.pt --config site.yaml --slides S1 S2 --out preds/

This is the last step of the data flow (slide -> patches -> features -> bags -> model). New slides
have no label yet, so none is needed: the slides come from the site's manifest (only ``slide_id``
is required) or, without ``data.manifest``, from every slide file in ``data.slides_dir``. Slides
without cached features are extracted first (the site YAML's ``extraction`` section, as
``tdamil-client`` does). The model (the federation's global checkpoint or a ``tdamil-train``
checkpoint) then writes into ``--out``:

* ``predictions.csv``: slide_id, the true label where the manifest has labels, the predicted class,
  one probability column per class, and the decision threshold with where it came from (two
  classes: calibrated on the checkpoint's validation predictions when it carries them, else 0.5);
* ``metrics.json`` (labelled slides only): AUROC, balanced accuracy, F1, ... with 95 % CIs
  (stratified bootstrap over patients, :mod:`tdamil.stats`; undefined values are null);
* ``heatmaps/<slide_id>.png``: the model's per-patch scores (TDA-MIL's task relevance ``s_i``,
  ABMIL's attention) painted over the slide thumbnail, where the slide file can be found;
* ``qupath/<slide_id>.geojson``: the same scores for QuPath (File > Import objects): tissue
  contours and one tile per patch with measurements ``patch score`` and ``P(<class>)``.

Everything stays on the site's machine. Exit status: 0 every slide predicted, 1 some slides could
not be (listed with the reason and fix), 2 the configuration, checkpoint or data do not fit (one line).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
from torch import nn

from tdamil.atomic import atomic_path
from tdamil.checkpoint import CheckpointError, load_checkpoint
from tdamil.config import ConfigError, json_safe
from tdamil.data.config import DataConfig

logger = logging.getLogger(__name__)

__all__ = ["TrainedModel", "SlideSet", "PredictOutcome", "load_trained_model", "decision_threshold",
           "slides_to_predict", "open_features", "predict_site", "main"]

DEFAULT_THRESHOLD = 0.5


class PredictError(ValueError):
    """A checkpoint or the data do not fit; the message names the file and the fix."""


@dataclass
class TrainedModel:
    """A model rebuilt from a checkpoint, with what it expects and its decision threshold."""

    model: nn.Module
    model_config: dict[str, Any]
    in_dim: int
    num_classes: int
    origin: str  # e.g. "federated round 12" or "training epoch 30"
    threshold: Optional[float] = DEFAULT_THRESHOLD  # P(last class) >= threshold -> last class; None: argmax
    threshold_source: str = "default 0.5: the checkpoint carries no validation predictions"
    feature_contract: Optional[dict[str, Any]] = None  # the features it was trained on (tdamil.data.contract)
    path: Optional[Path] = None  # the checkpoint file


def load_trained_model(path: str | Path) -> TrainedModel:
    """Rebuild the model of a federation checkpoint (``round_*.pt``, ``last.pt``, ``best.pt`` of
    ``flwr-server`` / ``tdamil-simulate``) or of a ``tdamil-train`` checkpoint, weights loaded strictly."""
    from tdamil.models import create_model, model_config_from_dict

    path = Path(path)
    try:
        ckpt = load_checkpoint(path)
    except CheckpointError as exc:
        raise PredictError(str(exc)) from None
    model_cfg, in_dim, num_classes = ckpt.get("model_config"), ckpt.get("in_dim"), ckpt.get("num_classes")
    if not model_cfg or in_dim is None or num_classes is None:
        raise PredictError(
            f"{path}: this training checkpoint does not record its model (model_config, in_dim, "
            "num_classes); it predates tdamil-predict. Train again to get a self-describing checkpoint."
        )
    if ckpt["kind"] == "federated":
        origin = f"federated round {ckpt.get('round', '?')}"
    else:
        epoch = ckpt.get("epoch")
        origin = "training" + (f" epoch {epoch}" if epoch is not None else " checkpoint")
    state = ckpt["model_state"]
    try:
        model = create_model(model_config_from_dict(dict(model_cfg), source=str(path)), in_dim=int(in_dim),
                             num_classes=int(num_classes))
        model.load_state_dict(state, strict=True)
    except (RuntimeError, ConfigError) as exc:
        raise PredictError(f"{path}: the weights do not fit the recorded model ({str(exc).splitlines()[0]}).") from None
    model.eval()
    threshold, source = decision_threshold(ckpt, int(num_classes))
    return TrainedModel(model, dict(model_cfg), int(in_dim), int(num_classes), origin, threshold, source,
                        ckpt.get("feature_contract"), path)


def decision_threshold(ckpt: dict[str, Any], num_classes: int) -> tuple[Optional[float], str]:
    """``(threshold on P(last class), where it came from)`` for a checkpoint.

    Two classes: the checkpoint's own ``threshold`` (top level or in ``extra``) when it has one;
    else Youden's J on its validation predictions (``val_predictions = {"labels": [n], "probs":
    [n] or [n, 2]}``, top level or in ``extra``); else 0.5, and the source says so. More classes:
    None (the most probable class is predicted).
    """
    if num_classes != 2:
        return None, "argmax: more than two classes"
    holders = [ckpt] + ([ckpt["extra"]] if isinstance(ckpt.get("extra"), dict) else [])
    for holder in holders:
        value = holder.get("threshold")
        if isinstance(value, (int, float)) and not isinstance(value, bool) and 0.0 < float(value) < 1.0:
            return float(value), "the checkpoint's threshold"
    reason = "the checkpoint carries no validation predictions"
    for holder in holders:
        val = holder.get("val_predictions")
        if not isinstance(val, dict) or "labels" not in val or "probs" not in val:
            continue
        labels = np.asarray(val["labels"]).astype(int).reshape(-1)
        probs = np.asarray(val["probs"], dtype=np.float64)
        probs = probs[:, -1] if probs.ndim == 2 else probs.reshape(-1)
        if len(labels) != len(probs) or len(np.unique(labels)) < 2:
            reason = "its validation predictions hold one class or do not match their labels"
            break
        return _youden(labels, probs), f"calibrated on the checkpoint's {len(labels)} validation slides (Youden's J)"
    return DEFAULT_THRESHOLD, f"default 0.5: {reason}"


def _youden(labels: np.ndarray, probs: np.ndarray) -> float:
    """The threshold that maximises sensitivity + specificity - 1 on these predictions."""
    from sklearn.metrics import roc_curve

    fpr, tpr, thresholds = roc_curve(labels, probs)
    finite = np.isfinite(thresholds)
    best = int(np.argmax(np.where(finite, tpr - fpr, -np.inf)))
    return float(np.clip(thresholds[best], 0.0, 1.0))


@dataclass
class SlideSet:
    """The slides to predict: ids, patients, class names and, where the manifest has them, labels."""

    ids: list[str]
    patients: list[str]
    classes: list[str]
    source: str  # the manifest or the slides folder they were listed from
    labels: Optional[list[int]] = None  # class indices; None: the slides are unlabelled

    @property
    def labelled(self) -> bool:
        return self.labels is not None

    def only(self, slide_ids: Sequence[str]) -> "SlideSet":
        """These slides only, in this set's order."""
        wanted = set(slide_ids)
        keep = [i for i, s in enumerate(self.ids) if s in wanted]
        return SlideSet([self.ids[i] for i in keep], [self.patients[i] for i in keep], self.classes, self.source,
                        None if self.labels is None else [self.labels[i] for i in keep])


def slides_to_predict(data_cfg: DataConfig, num_classes: int, *, slide_ids: Optional[Sequence[str]] = None,
                      slide_extensions: Optional[Sequence[str]] = None) -> SlideSet:
    """The site's slides: the manifest's rows (labelled when every row has a label) or, without a
    manifest, every slide file in ``data.slides_dir``; ``slide_ids`` keeps only those."""
    from tdamil.data.manifest import load_manifest, load_slide_list

    if data_cfg.manifest is None:
        slides = _slides_in_folder(data_cfg, num_classes, slide_extensions)
    else:
        source = str(data_cfg.manifest)
        df = load_slide_list(data_cfg.manifest)
        labels = df["label"] if "label" in df.columns else None
        if labels is not None and (labels != "").all():
            df = load_manifest(data_cfg.manifest, classes=data_cfg.classes)
            slides = SlideSet(df["slide_id"].tolist(), df["patient_id"].tolist(), list(df.attrs["classes"]), source,
                              df["label_index"].tolist())
        else:
            if labels is not None:
                logger.warning("%s: %d of %d slides have no label: predicting all of them as unlabelled (no "
                               "metrics.json).", source, int((labels == "").sum()), len(df))
            patients = df["patient_id"].tolist() if "patient_id" in df.columns else df["slide_id"].tolist()
            slides = SlideSet(df["slide_id"].tolist(), [p or s for p, s in zip(patients, df["slide_id"])],
                              _unlabelled_classes(data_cfg, num_classes), source)
    if len(slides.classes) != num_classes:
        raise PredictError(
            f"{slides.source}: {len(slides.classes)} classes ({', '.join(map(str, slides.classes))}) but the model "
            f"predicts {num_classes}. Set data.classes in the site YAML to the classes the model was trained on."
        )
    if slide_ids:
        unknown = sorted(set(slide_ids) - set(slides.ids))
        if unknown:
            raise PredictError(f"{slides.source}: slides not found there: {', '.join(unknown)}. Check --slides.")
        slides = slides.only(slide_ids)
    return slides


def _slides_in_folder(data_cfg: DataConfig, num_classes: int, slide_extensions: Optional[Sequence[str]]) -> SlideSet:
    from tdamil.wsi.extract_config import SLIDE_EXTENSIONS
    from tdamil.wsi.jobs import index_slides_dir

    folder = Path(data_cfg.slides_dir) if data_cfg.slides_dir is not None else None
    if folder is None or not folder.is_dir():
        raise PredictError(f"data.slides_dir {folder} is not a folder; fix the path in the site YAML or set "
                           "data.manifest (a CSV with a slide_id column).")
    exts = list(slide_extensions or SLIDE_EXTENSIONS)
    ids = sorted(index_slides_dir(folder, exts))
    if not ids:
        raise PredictError(f"{folder}: no slide files ({', '.join(exts)}) in data.slides_dir; put the slides there "
                           "or fix the path in the site YAML.")
    return SlideSet(ids, list(ids), _unlabelled_classes(data_cfg, num_classes), str(folder))


def _unlabelled_classes(data_cfg: DataConfig, num_classes: int) -> list[str]:
    if data_cfg.classes:
        return [str(c) for c in data_cfg.classes]
    logger.info("data.classes is not set and the slides have no labels: the classes are named 0..%d (set "
                "data.classes in the site YAML to the model's class names).", num_classes - 1)
    return [str(i) for i in range(num_classes)]


def feature_path(data_cfg: DataConfig, slide_id: str) -> Path:
    """Where a slide's cached features are (``<features_dir>/<slide_id><features_suffix>``)."""
    return Path(data_cfg.features_dir) / f"{slide_id}{data_cfg.features_suffix}"


def extract_missing(data_cfg: DataConfig, ext_cfg: Any, slides: SlideSet) -> Optional[Any]:
    """Extract the features of slides that have none yet (:func:`tdamil.wsi.extract.extract_site`,
    as ``tdamil-client`` does); returns the extraction summary, or None when nothing was missing."""
    missing = [s for s in slides.ids if not feature_path(data_cfg, s).is_file()]
    if not missing:
        return None
    shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
    if ext_cfg is None:
        raise PredictError(f"{data_cfg.features_dir}: no features for {len(missing)} of {len(slides.ids)} slides "
                           f"({shown}). Add an extraction section (encoder, weights) to the site YAML so that "
                           "tdamil-predict extracts them, or run tdamil-extract first.")
    if data_cfg.features_suffix not in (".h5", ".hdf5"):
        raise PredictError(f"{data_cfg.features_dir}: no {data_cfg.features_suffix} features for {shown}; extraction "
                           "writes .h5. Set data.features_suffix: .h5 or convert those slides' features first.")
    from tdamil.wsi.extract import extract_site

    logger.info("Extracting the features of %d slides (%s) with %s", len(missing), shown, ext_cfg.encoder)
    summary = extract_site(data_cfg, ext_cfg, slide_ids=missing)
    summary.from_folder = data_cfg.manifest is None
    return summary


def open_features(data_cfg: DataConfig, slides: SlideSet, trained: TrainedModel) -> Any:
    """The one place tdamil-predict opens feature files: a lazy dataset of ``slides`` whose features
    fit ``trained`` (their dimension, and the checkpoint's ``feature_contract`` where it has one).
    Raises :class:`PredictError` naming the folder and the fix."""
    from tdamil.data.bags import FeatureBagDataset

    labels = slides.labels if slides.labels is not None else [0] * len(slides.ids)  # unlabelled: unused
    dataset = FeatureBagDataset(data_cfg.features_dir, slides.ids, labels, len(slides.classes),
                                patient_ids=slides.patients, suffix=data_cfg.features_suffix)
    if trained.feature_contract:  # encoder, weights, magnification, patch size: attrs only, every file
        from tdamil.data.contract import ContractError, FeatureContract, check_features, checkpoint_origin, feature_paths

        try:  # files without the attrs (CLAM/TRIDENT) are taken on trust here, with a loud warning
            check_features(feature_paths([dataset]), FeatureContract.from_dict(trained.feature_contract), site=None,
                           allow_unlabelled_attrs=True, origin=checkpoint_origin(trained.path or "the checkpoint"))
        except ContractError as exc:
            raise PredictError(str(exc)) from None
    if dataset.in_dim != trained.in_dim:
        raise PredictError(
            f"{data_cfg.features_dir}: features have {dataset.in_dim} dims but the model expects {trained.in_dim}; "
            "extract them with the encoder the model was trained on."
        )
    return dataset


@dataclass
class PredictOutcome:
    """What :func:`predict_site` did: the predictions table and the slides it could not predict."""

    table: Any  # pandas DataFrame, as written to predictions.csv
    not_predicted: list[str] = field(default_factory=list)
    extraction: Optional[Any] = None  # the extraction summary when features were extracted


def predict_site(
    trained: TrainedModel,
    data_cfg: DataConfig,
    out_dir: str | Path,
    *,
    slide_ids: Optional[Sequence[str]] = None,
    heatmaps: bool = True,
    extraction: Optional[Any] = None,
    device: Optional[str] = None,
) -> PredictOutcome:
    """Predict every slide of the site (or ``slide_ids``), extracting missing features with
    ``extraction`` (an :class:`~tdamil.wsi.extract_config.ExtractionConfig`; None: no extraction).

    Heatmaps need the slide files (``data.slides_dir`` or the manifest's ``slide_path``); slides
    that cannot be found get predictions but no picture (logged).
    """
    from tdamil.train.evaluate import evaluate

    out = Path(out_dir)
    slides = slides_to_predict(data_cfg, trained.num_classes, slide_ids=slide_ids,
                               slide_extensions=None if extraction is None else extraction.slide_extensions)
    summary = extract_missing(data_cfg, extraction, slides)
    if summary is not None and not summary.ok:
        summary.print()  # each slide that could not be extracted, with its reason and fix
    ready = [s for s in slides.ids if feature_path(data_cfg, s).is_file()]
    not_predicted = [s for s in slides.ids if s not in set(ready)]
    if not ready:
        raise PredictError(f"{data_cfg.features_dir}: no slide has features, so there is nothing to predict; "
                           "the extraction summary above gives each slide's reason and fix.")
    slides = slides.only(ready)
    dataset = open_features(data_cfg, slides, trained)
    logger.info("Predicting %d slides with the model of %s; decision threshold %s (%s)", len(dataset), trained.origin,
                "argmax" if trained.threshold is None else f"{trained.threshold:.3f}", trained.threshold_source)
    result = evaluate(trained.model, dataset, device=device)
    table = _predictions_table(result, slides, trained)
    _check_maps(trained, dataset, result, table)
    with atomic_path(out / "predictions.csv") as tmp:
        table.to_csv(tmp, index=False)
    logger.info("Wrote %s", out / "predictions.csv")
    _write_metrics(out / "metrics.json", result, slides, dataset, trained)
    if heatmaps:
        _write_pictures(result, table, slides, dataset, data_cfg, extraction, out, _score_style(trained))
    return PredictOutcome(table, not_predicted, summary)


def _predictions_table(result: Any, slides: SlideSet, trained: TrainedModel) -> Any:
    table = result.predictions_table(slides.classes)
    if not slides.labelled:
        table = table.drop(columns=["label"])
    if trained.threshold is not None:
        positive = result.probs[:, -1] >= trained.threshold
        table["prediction"] = [slides.classes[-1] if p else slides.classes[0] for p in positive]
    table["threshold"] = trained.threshold if trained.threshold is not None else np.nan
    table["threshold_source"] = trained.threshold_source
    return table


def _check_maps(trained: TrainedModel, dataset: Any, result: Any, table: Any) -> None:
    """Is each positive slide's relevance map faithful? The label-free deletion check of
    :mod:`tdamil.train.faithfulness` (its top patches removed vs as many random ones), per slide
    (``map_deletion_gap``, ``map_check``) and over the slides in the log."""
    from tdamil.train.faithfulness import MIN_GAP, check_bag, summarise

    gaps: list[float] = []
    checks: list[str] = []
    deletions = []
    for i in range(len(dataset)):  # the scores and probabilities of the prediction pass: no forward pass again
        scores = result.scores[i]
        curve = None if scores is None else check_bag(trained.model, dataset[i].features, scores,
                                                      p0=float(result.probs[i, 1]), positive_only=True, seed=i)
        if curve is None:
            gaps.append(np.nan)
            checks.append("n/a (no per-patch scores)")
        elif not curve.ks:
            gaps.append(np.nan)
            checks.append("n/a (predicted negative)")
        else:
            deletions.append(curve)
            gaps.append(curve.gap)
            checks.append("faithful" if curve.gap >= MIN_GAP else "NOT faithful")
    table["map_deletion_gap"] = gaps
    table["map_check"] = checks
    if deletions:
        verdict = summarise(deletions)
        (logger.warning if verdict.flagged else logger.info)("%s.", verdict.sentence("The relevance map"))


def _write_metrics(path: Path, result: Any, slides: SlideSet, dataset: Any, trained: TrainedModel) -> None:
    from tdamil.stats import bootstrap_ci, interval_columns

    if not slides.labelled:
        if path.exists():  # a metrics.json of an earlier, labelled run would describe other slides
            path.unlink()
        logger.info("The slides have no labels: no metrics.json (add a label column to the manifest to get one).")
        return
    ci = interval_columns(bootstrap_ci(result.labels, result.probs, dataset.patient_ids))
    threshold = {"decision_threshold": trained.threshold, "threshold_source": trained.threshold_source}
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(json_safe(result.metrics | ci | (result.instance_metrics or {}) | threshold),
                                  indent=2))
    logger.info("Wrote %s", path)


def _score_style(trained: TrainedModel) -> dict[str, Any]:
    """TDA-MIL's ``s_i`` on its fixed [0, 1] scale; attention weights (which sum to 1 over a slide,
    so their scale shrinks with its size) by rank within the slide."""
    name = getattr(getattr(trained.model, "cfg", None), "name", "")
    return {} if name == "tdamil" else {"normalize": True, "label": "attention"}


def _write_pictures(result: Any, table: Any, slides: SlideSet, dataset: Any, data_cfg: DataConfig,
                    extraction: Optional[Any], out: Path, style: dict[str, Any]) -> None:
    """A heatmap and QuPath objects per slide whose file can be found; one bad slide never stops the others."""
    from tdamil.wsi.extract import ExtractionConfig, plan_jobs
    from tdamil.wsi.geojson import geojson_for_slide
    from tdamil.wsi.heatmap import heatmap_for_slide

    if all(s is None for s in result.scores):
        logger.warning("This model gives no per-patch scores (e.g. transmil, transformer_mil): no heatmaps.")
        return
    locator = extraction if extraction is not None else ExtractionConfig(encoder="tiny")  # only where slides are
    jobs = {job.slide_id: job for job in plan_jobs(data_cfg, locator, list(result.slide_ids))}
    positive = slides.classes[-1]
    for i, slide_id in enumerate(result.slide_ids):
        job = jobs.get(slide_id)
        if job is None or job.path is None or not Path(job.path).exists():
            logger.info("%s: slide file not found, prediction only (set data.slides_dir to get its heatmap)", slide_id)
            continue
        label = f" (label {table.loc[i, 'label']})" if slides.labelled else ""
        title = f"{slide_id}: P({positive}) = {table.loc[i, f'prob_{positive}']:.2f}{label}"
        if table.loc[i, "map_check"] == "NOT faithful":
            title += ("\nMAP NOT FAITHFUL: deleting its top patches changes the prediction no more than "
                      "deleting random ones")
        probs = {f"P({c})": float(table.loc[i, f"prob_{c}"]) for c in slides.classes}
        features = dataset.path(slide_id)
        for what, write in (
            ("heatmap", lambda: heatmap_for_slide(out / "heatmaps" / f"{slide_id}.png", job.path, features,
                                                  result.scores[i], mpp_override=job.mpp_override, title=title,
                                                  **style)),
            ("QuPath objects", lambda: geojson_for_slide(out / "qupath" / f"{slide_id}.geojson", job.path, features,
                                                         result.scores[i], slide_measurements=probs,
                                                         mpp_override=job.mpp_override)),
        ):
            try:
                logger.info("%s: %s %s", slide_id, what, write())
            except Exception as exc:  # noqa: BLE001 - one unreadable slide must not stop the others
                logger.warning("%s: no %s (%s)", slide_id, what, exc)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tdamil-predict", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", type=Path, required=True, help="best.pt / last.pt / round_XXXX.pt of a run")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--config", type=Path, help="site YAML (its site, data and extraction sections are read)")
    src.add_argument("--site", help="site name: reads configs/sites/<site>.yaml under --configs-dir")
    p.add_argument("--configs-dir", type=Path, default=Path("configs/sites"))
    p.add_argument("--slides", nargs="+", metavar="SLIDE_ID", help="only these slides (default: all of the site's)")
    p.add_argument("--out", type=Path, help="output folder (default: predictions/<site> next to the checkpoint's run)")
    p.add_argument("--no-heatmaps", action="store_true", help="predictions only")
    p.add_argument("--no-extract", action="store_true", help="do not extract missing features (they are then an error)")
    p.add_argument("--device", help="cpu, cuda, cuda:1 (default: cuda when available)")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    from tdamil.logs import one_line, setup_logging
    from tdamil.wsi.cli import load_extraction_sections
    from tdamil.wsi.extract_config import ExtractionError

    args = _parser().parse_args(argv)
    setup_logging()
    config = args.config or args.configs_dir / f"{args.site}.yaml"
    try:
        site, data_cfg, ext_cfg = load_extraction_sections(config, extraction_required=False)
        if args.site is not None and site != args.site:
            raise ConfigError(f"{config}: says site: {site}, but --site {args.site} was given; fix one of them.")
        trained = load_trained_model(args.checkpoint)
        out = args.out or args.checkpoint.resolve().parent.parent / "predictions" / site
        outcome = predict_site(trained, data_cfg, out, slide_ids=args.slides, heatmaps=not args.no_heatmaps,
                               extraction=None if args.no_extract else ext_cfg, device=args.device)
    except (ConfigError, PredictError, ExtractionError, ValueError, OSError) as exc:
        print(f"error: {one_line(exc)}", file=sys.stderr)
        return 2
    print(f"Predictions for {len(outcome.table)} slides of {site} in {out.resolve()}")
    if outcome.not_predicted:
        print(f"Not predicted (no features): {', '.join(outcome.not_predicted)}; see the reasons above.",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
