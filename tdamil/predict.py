"""Apply a trained model to a site's slides: per-slide predictions and relevance heatmaps.

    tdamil-predict --checkpoint runs/federation/checkpoints/best.pt --site site_a
    tdamil-predict --checkpoint runs/train_digits/best.pt --config site.yaml --slides S1 S2 --out preds/

This is the last step of the data flow (slide -> patches -> features -> bags -> model): it reads the
site's manifest and cached features, runs the model (the federation's global checkpoint or a
``tdamil-train`` checkpoint), and writes into ``--out``:

* ``predictions.csv``: slide_id, true label, predicted class and one probability column per class
  (:meth:`~tdamil.train.engine.EvalResult.predictions_table`);
* ``metrics.json``: AUROC, balanced accuracy, F1, ... over these slides, with 95 % CIs (stratified
  bootstrap over patients, :mod:`tdamil.stats`; undefined values are null);
* ``heatmaps/<slide_id>.png``: the model's per-patch scores (TDA-MIL's task relevance ``s_i``,
  ABMIL's attention) painted over the slide thumbnail, where the slide file can be found;
* ``qupath/<slide_id>.geojson``: the same scores for QuPath (File > Import objects): tissue
  contours and one tile per patch with measurements ``patch score`` and ``P(<class>)``.

Everything stays on the site's machine.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

from torch import nn

from tdamil.atomic import atomic_path
from tdamil.checkpoint import CheckpointError, load_checkpoint
from tdamil.config import ConfigError, json_safe
from tdamil.data.config import DataConfig

logger = logging.getLogger(__name__)

__all__ = ["TrainedModel", "load_trained_model", "predict_site", "main"]


class PredictError(ValueError):
    """A checkpoint or the data do not fit; the message names the file and the fix."""


@dataclass
class TrainedModel:
    """A model rebuilt from a checkpoint, with what it expects."""

    model: nn.Module
    model_config: dict[str, Any]
    in_dim: int
    num_classes: int
    origin: str  # e.g. "federated round 12" or "training epoch 30"


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
    return TrainedModel(model, dict(model_cfg), int(in_dim), int(num_classes), origin)


def predict_site(
    trained: TrainedModel,
    data_cfg: DataConfig,
    out_dir: str | Path,
    *,
    slide_ids: Optional[Sequence[str]] = None,
    heatmaps: bool = True,
    slide_extensions: Optional[Sequence[str]] = None,
    device: Optional[str] = None,
) -> "Any":
    """Predict every slide of the site's manifest (or ``slide_ids``); returns the predictions table.

    Heatmaps need the slide files (``data.slides_dir`` or the manifest's ``slide_path``); slides
    that cannot be found get predictions but no picture (logged).
    """
    from tdamil.data.bags import FeatureBagDataset
    from tdamil.data.manifest import load_manifest
    from tdamil.train.engine import evaluate
    from tdamil.stats import bootstrap_ci, interval_columns

    out = Path(out_dir)
    df = load_manifest(data_cfg.manifest, classes=data_cfg.classes)
    classes = list(df.attrs.get("classes") or range(trained.num_classes))
    if len(classes) != trained.num_classes:
        raise PredictError(
            f"{data_cfg.manifest}: {len(classes)} classes ({', '.join(map(str, classes))}) but the model predicts "
            f"{trained.num_classes}. Set data.classes in the site YAML to the classes the model was trained on."
        )
    if slide_ids:
        unknown = sorted(set(slide_ids) - set(df["slide_id"]))
        if unknown:
            raise PredictError(f"{data_cfg.manifest}: slides not in the manifest: {', '.join(unknown)}.")
        df = df[df["slide_id"].isin(slide_ids)]
    dataset = FeatureBagDataset.from_manifest(df, data_cfg.features_dir, suffix=data_cfg.features_suffix)
    if dataset.in_dim != trained.in_dim:
        raise PredictError(
            f"{data_cfg.features_dir}: features have {dataset.in_dim} dims but the model expects {trained.in_dim}; "
            "extract them with the encoder the model was trained on."
        )
    logger.info("Predicting %d slides with the model of %s", len(dataset), trained.origin)
    result = evaluate(trained.model, dataset, device=device)

    table = result.predictions_table(classes)
    with atomic_path(out / "predictions.csv") as tmp:
        table.to_csv(tmp, index=False)
    with atomic_path(out / "metrics.json") as tmp:
        ci = interval_columns(bootstrap_ci(result.labels, result.probs, dataset.patient_ids))
        tmp.write_text(json.dumps(json_safe(result.metrics | ci | (result.instance_metrics or {})), indent=2))
    logger.info("Wrote %s and %s", out / "predictions.csv", out / "metrics.json")

    if heatmaps:
        # s_i on the fixed [0, 1] scale; attention weights (sum 1 per slide) ranked and labelled as such
        name = getattr(getattr(trained.model, "cfg", None), "name", "")
        style = {} if name == "tdamil" else {"normalize": True, "label": "attention (rank within slide)"}
        _write_heatmaps(result, table, classes, dataset, data_cfg, out / "heatmaps", slide_extensions, style)
    return table


def _write_heatmaps(result: Any, table: Any, classes: list, dataset: Any, data_cfg: DataConfig, folder: Path,
                    slide_extensions: Optional[Sequence[str]], style: dict) -> None:
    from tdamil.wsi.extract import ExtractionConfig, plan_jobs
    from tdamil.wsi.geojson import geojson_for_slide
    from tdamil.wsi.heatmap import heatmap_for_slide

    if all(s is None for s in result.scores):
        logger.warning("This model gives no per-patch scores (e.g. transmil, transformer_mil): no heatmaps.")
        return
    ext_cfg = ExtractionConfig(encoder="tiny")
    if slide_extensions:
        ext_cfg.slide_extensions = list(slide_extensions)
    jobs = {job.slide_id: job for job in plan_jobs(data_cfg, ext_cfg, list(result.slide_ids))}
    positive = classes[-1]
    for i, slide_id in enumerate(result.slide_ids):
        job = jobs.get(slide_id)
        if job is None or job.path is None or not Path(job.path).exists():
            logger.info("%s: slide file not found, prediction only (set data.slides_dir to get its heatmap)", slide_id)
            continue
        title = f"{slide_id}: P({positive}) = {table.loc[i, f'prob_{positive}']:.2f} (label {table.loc[i, 'label']})"
        try:
            png = heatmap_for_slide(folder / f"{slide_id}.png", job.path, dataset.path(slide_id), result.scores[i],
                                    mpp_override=job.mpp_override, title=title, **style)
        except Exception as exc:  # noqa: BLE001 - one unreadable slide must not stop the others
            logger.warning("%s: no heatmap (%s)", slide_id, exc)
            continue
        logger.info("%s: heatmap %s", slide_id, png)
        probs = {f"P({c})": float(table.loc[i, f"prob_{c}"]) for c in classes}
        try:  # QuPath objects: tissue contours and patches with their scores and the slide's prediction
            gj = geojson_for_slide(folder.parent / "qupath" / f"{slide_id}.geojson", job.path, dataset.path(slide_id),
                                   result.scores[i], slide_measurements=probs, mpp_override=job.mpp_override)
        except Exception as exc:  # noqa: BLE001 - one unreadable slide must not stop the others
            logger.warning("%s: no QuPath GeoJSON (%s)", slide_id, exc)
            continue
        logger.info("%s: QuPath objects %s", slide_id, gj)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tdamil-predict", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", type=Path, required=True, help="best.pt / last.pt / round_XXXX.pt of a run")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--config", type=Path, help="site YAML (its site and data sections are read)")
    src.add_argument("--site", help="site name: reads configs/sites/<site>.yaml under --configs-dir")
    p.add_argument("--configs-dir", type=Path, default=Path("configs/sites"))
    p.add_argument("--slides", nargs="+", metavar="SLIDE_ID", help="only these slides (default: the whole manifest)")
    p.add_argument("--out", type=Path, help="output folder (default: predictions/<site> next to the checkpoint's run)")
    p.add_argument("--no-heatmaps", action="store_true", help="predictions only")
    p.add_argument("--device", help="cpu, cuda, cuda:1 (default: cuda when available)")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    from tdamil.logs import setup_logging
    from tdamil.wsi.cli import load_extraction_sections

    args = _parser().parse_args(argv)
    setup_logging()
    config = args.config or args.configs_dir / f"{args.site}.yaml"
    try:
        site, data_cfg, ext_cfg = load_extraction_sections(config)
        trained = load_trained_model(args.checkpoint)
        out = args.out or args.checkpoint.resolve().parent.parent / "predictions" / site
        predict_site(trained, data_cfg, out, slide_ids=args.slides, heatmaps=not args.no_heatmaps,
                     slide_extensions=ext_cfg.slide_extensions, device=args.device)
    except (ConfigError, PredictError, ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"Predictions for {site} in {out.resolve()}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
