"""Evaluation of a MIL model on a bag dataset: slide probabilities, patch scores, metrics.

:func:`evaluate` returns an :class:`EvalResult`; bag metrics come from :mod:`tdamil.train.metrics`,
patch-level metrics from :mod:`tdamil.train.instance_metrics` where bags carry instance labels.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

import numpy as np
import torch
from torch import nn

from tdamil.data.bags import BagDataset
from tdamil.train.instance_metrics import instance_metrics
from tdamil.train.metrics import classification_metrics, nan_metrics
from tdamil.train.runtime import autocast, logits_of, model_device, resolve_device
from tdamil.train.runtime import progress as progress_bar

__all__ = ["EvalResult", "evaluate"]


@dataclass
class EvalResult:
    """Outcome of :func:`evaluate`.

    metrics:   every key of :data:`~tdamil.train.metrics.METRIC_KEYS`.
    probs:     ``[n, C]`` class probabilities per slide.
    labels:    ``[n]`` true labels.
    slide_ids: slide names, in dataset order.
    scores:    per-slide patch relevance ``[n_i]`` (TDA-MIL's s_i, ABMIL's attention) or None
               (meaning per model: :mod:`tdamil.models.output`).
    instance_metrics: :func:`~tdamil.train.instance_metrics.instance_metrics` of the scores where the
               bags carry instance labels and the model gives scores, else None.
    """

    metrics: dict[str, float]
    probs: np.ndarray
    labels: np.ndarray
    slide_ids: list[str]
    scores: list[Optional[np.ndarray]]
    instance_metrics: Optional[dict[str, float]] = None

    def predictions_table(self, classes: Optional[Sequence[Any]] = None) -> Any:
        """One row per slide: ``slide_id``, ``label``, ``prediction`` and ``prob_<class>`` columns
        (a pandas DataFrame). ``classes`` names the classes; by default they are 0, 1, ..."""
        import pandas as pd

        names = list(classes) if classes is not None else list(range(self.probs.shape[1]))
        table = pd.DataFrame({"slide_id": list(self.slide_ids)})
        table["label"] = [names[int(i)] for i in self.labels]
        table["prediction"] = [names[int(i)] for i in self.probs.argmax(axis=1)]
        for c, name in enumerate(names):
            table[f"prob_{name}"] = self.probs[:, c]
        return table


@torch.no_grad()
def evaluate(model: nn.Module, dataset: BagDataset, device: str | torch.device | None = None, *, progress: bool = False, mixed_precision: bool = True) -> EvalResult:
    """Predict every bag of ``dataset``; metrics, probabilities and patch scores.

    ``device`` defaults to the model's device. The model's train/eval mode is restored afterwards.
    """
    dev = model_device(model) if device is None else resolve_device(device)
    if dev != model_device(model):
        model.to(dev)
    was_training = model.training
    model.eval()
    probs, labels, ids, scores, ranking, inst_labels = [], [], [], [], [], []
    aux_total, aux_bags = 0.0, 0
    aux_fn = getattr(model, "auxiliary_loss", None)
    try:
        for i in progress_bar(range(len(dataset)), progress, desc="evaluate", leave=False, unit="bag"):
            bag = dataset[i]
            with autocast(dev, mixed_precision):
                out = model(bag.features.to(dev).unsqueeze(0))
            logits = logits_of(out).float()
            aux = aux_fn(out, torch.tensor([int(bag.label)], device=dev)) if aux_fn is not None else None
            if aux is not None:
                aux_total, aux_bags = aux_total + float(aux), aux_bags + 1
            probs.append(torch.softmax(logits, dim=1)[0].cpu().numpy())
            labels.append(int(bag.label))
            ids.append(bag.slide_id)
            s = getattr(out, "scores", None)
            scores.append(None if s is None else s[0].float().cpu().numpy())
            r = getattr(out, "instance_logits", None)
            ranking.append(None if r is None else r[0].float().cpu().numpy())
            inst_labels.append(None if bag.instance_labels is None else np.asarray(bag.instance_labels))
    finally:
        model.train(was_training)
    c = dataset.num_classes
    p = np.stack(probs).astype(np.float64) if probs else np.zeros((0, c))
    y = np.asarray(labels, dtype=np.int64)
    metrics = classification_metrics(y, p, num_classes=c) if len(y) else nan_metrics(0)
    if aux_bags:  # the training objective on these slides: cross-entropy + the model's auxiliary term
        metrics["objective"] = metrics["loss"] + aux_total / aux_bags
    inst = instance_metrics(scores, inst_labels, y.tolist(), [r if r is not None else s for r, s in zip(ranking, scores)])
    return EvalResult(metrics=metrics, probs=p, labels=y, slide_ids=ids, scores=scores, instance_metrics=inst)
