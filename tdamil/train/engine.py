"""Local training and evaluation of a MIL model, one bag (slide) per step.

* :class:`TrainConfig`      the ``train:`` section of a YAML, with documented defaults.
* :func:`train_one_epoch`   one pass over a dataset (optionally with the FedProx proximal term).
* :func:`evaluate`          slide probabilities, patch scores and :mod:`metrics <tdamil.train.metrics>`.
* :func:`fit`               epochs with validation, early stopping, best/last checkpoints
                            (:mod:`tdamil.checkpoint`), history.

Bags differ in size (a slide has 5k-100k patches), so each step sees one bag (batch 1, as in the
TDA-MIL paper); ``grad_accum_steps`` bags are accumulated per optimizer step, and the accumulated
gradient is the MEAN over those bags. Mixed precision (bf16 autocast) is used on CUDA only.
"""

from __future__ import annotations

import contextlib
import csv
import logging
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Literal, Mapping, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.lr_scheduler import CosineAnnealingLR, LinearLR, LRScheduler, SequentialLR

from tdamil.atomic import atomic_path
from tdamil.checkpoint import save_checkpoint
from tdamil.data.bags import BagDataset, class_counts
from tdamil.train.instance_metrics import instance_metrics
from tdamil.train.metrics import classification_metrics, higher_is_better, nan_metrics

logger = logging.getLogger(__name__)

__all__ = [
    "TrainConfig",
    "EvalResult",
    "FitResult",
    "resolve_device",
    "seed_everything",
    "make_optimizer",
    "make_lr_scheduler",
    "train_one_epoch",
    "evaluate",
    "fit",
]

MonitorKey = Literal["auroc", "balanced_accuracy", "f1", "accuracy", "loss"]


@dataclass
class TrainConfig:
    """Training settings (the ``train:`` section). Defaults follow the TDA-MIL paper where it says.

    epochs:                  maximum number of epochs (50). In a federation: local epochs per round
                             are set by the federation config, not here.
    lr:                      AdamW learning rate (1e-5, the paper's value for UNI features).
    weight_decay:            AdamW weight decay (1e-2, the paper's value).
    betas:                   AdamW betas ([0.9, 0.999]).
    grad_accum_steps:        bags per optimizer step; the gradient is the mean over them (1 = the
                             paper's batch 1).
    max_grad_norm:           clip the gradient norm to this value before each step (null = off).
    max_instances:           during training only, use a random subset of at most this many patches
                             per bag (augmentation and a memory bound; null = all patches).
    class_weighting:         ``none`` or ``balanced`` (cross-entropy weighted by inverse class
                             frequency of the training bags, for skewed sites).
    lr_schedule:             ``constant`` or ``cosine`` (decay to 0 over ``epochs`` after warm-up).
    warmup_epochs:           linear warm-up epochs (0).
    early_stopping_patience: stop after this many epochs without a better validation value (10;
                             0 = never stop early).
    monitor:                 validation metric for early stopping and the best checkpoint (``auroc``;
                             ``loss`` is minimised, the others maximised).
    min_epochs:              never stop before this many epochs (1).
    mixed_precision:         bf16 autocast on CUDA (true); ignored on CPU.
    device:                  ``auto`` (CUDA if available, else CPU), ``cpu``, ``cuda``, ``cuda:1``...
    seed:                    seed for initial shuffling, patch subsampling and dropout (0).
    progress:                show tqdm progress bars (true).
    num_threads:             CPU threads for torch, set by the commands (``tdamil-train``) at start
                             (null = torch's default). 1 is fastest for small bags on a busy machine.
    """

    epochs: int = 50
    lr: float = 1e-5
    weight_decay: float = 1e-2
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    grad_accum_steps: int = 1
    max_grad_norm: Optional[float] = None
    max_instances: Optional[int] = None
    class_weighting: Literal["none", "balanced"] = "none"
    lr_schedule: Literal["constant", "cosine"] = "constant"
    warmup_epochs: int = 0
    early_stopping_patience: int = 10
    monitor: MonitorKey = "auroc"
    min_epochs: int = 1
    mixed_precision: bool = True
    device: str = "auto"
    seed: int = 0
    progress: bool = True
    num_threads: Optional[int] = None

    def __post_init__(self) -> None:
        if self.epochs < 0:
            raise ValueError(f"epochs must be >= 0, got {self.epochs}")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if self.grad_accum_steps < 1:
            raise ValueError(f"grad_accum_steps must be >= 1, got {self.grad_accum_steps}")
        if self.max_grad_norm is not None and self.max_grad_norm <= 0:
            raise ValueError("max_grad_norm must be > 0 (or null to turn clipping off)")
        if self.max_instances is not None and self.max_instances < 1:
            raise ValueError("max_instances must be >= 1 (or null for all patches)")
        if len(self.betas) != 2:
            raise ValueError(f"betas must be two numbers, got {self.betas}")
        if self.num_threads is not None and self.num_threads < 1:
            raise ValueError("num_threads must be >= 1 (or null for torch's default)")
        if self.early_stopping_patience < 0 or self.warmup_epochs < 0 or self.min_epochs < 0:
            raise ValueError("early_stopping_patience, warmup_epochs and min_epochs must be >= 0")


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


@dataclass
class FitResult:
    """Outcome of :func:`fit`: per-epoch history and where the best epoch was."""

    history: list[dict[str, float]]
    best_epoch: int
    best_value: float
    best_metrics: dict[str, float]
    stopped_early: bool
    best_checkpoint: Optional[Path] = None
    last_checkpoint: Optional[Path] = None


# --------------------------------------------------------------------------------------------
def resolve_device(spec: str | torch.device | None = "auto") -> torch.device:
    """``auto`` -> CUDA when available, else CPU; otherwise ``torch.device(spec)`` (checked)."""
    if isinstance(spec, torch.device):
        return spec
    if spec is None or spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(spec)
    except RuntimeError:
        raise ValueError(f"device '{spec}' is not understood; use auto, cpu, cuda or cuda:N.") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device '{spec}' requested but no CUDA GPU is available here; use device: auto or cpu.")
    return dev


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA)."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def model_device(model: nn.Module) -> torch.device:
    """Device of the model's first parameter (CPU for a parameterless model)."""
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters with ``cfg.lr`` and ``cfg.weight_decay``."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters.")
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=tuple(cfg.betas))


def _autocast(device: torch.device, enabled: bool):
    use = enabled and device.type == "cuda" and torch.cuda.is_bf16_supported()
    return torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=True) if use else contextlib.nullcontext()


def _logits(out: Any) -> torch.Tensor:
    return out.logits if hasattr(out, "logits") else out


def _class_weights(dataset: BagDataset, cfg: TrainConfig, device: torch.device) -> Optional[torch.Tensor]:
    if cfg.class_weighting == "none":
        return None
    counts = np.asarray(class_counts(dataset), dtype=np.float64)
    present = counts > 0
    w = np.zeros_like(counts)
    w[present] = counts.sum() / (present.sum() * counts[present])
    return torch.as_tensor(w, dtype=torch.float32, device=device)


def _prox_pairs(model: nn.Module, prox_ref: Any) -> list[tuple[torch.nn.Parameter, torch.Tensor]]:
    """Match trainable parameters with reference tensors (mapping by name, or sequence in order)."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if isinstance(prox_ref, nn.Module):
        prox_ref = dict(prox_ref.named_parameters())
    if isinstance(prox_ref, Mapping):
        missing = [n for n, _ in named if n not in prox_ref]
        if missing:
            raise ValueError(f"prox_ref lacks parameter(s) {missing[:3]}; pass the global model's state_dict().")
        refs = [prox_ref[n] for n, _ in named]
    else:
        refs = list(prox_ref)
        if len(refs) != len(named):
            raise ValueError(f"prox_ref has {len(refs)} tensors but the model has {len(named)} trainable parameters.")
    pairs = []
    for (n, p), r in zip(named, refs):
        r = torch.as_tensor(r).to(device=p.device, dtype=p.dtype)
        if r.shape != p.shape:
            raise ValueError(f"prox_ref['{n}'] has shape {tuple(r.shape)}, the model's is {tuple(p.shape)}.")
        pairs.append((p, r.detach()))
    return pairs


def _progress(iterable: Iterable, enabled: bool, **kw: Any) -> Iterable:
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, **kw)


# --------------------------------------------------------------------------------------------
def train_one_epoch(
    model: nn.Module,
    dataset: BagDataset,
    optimizer: torch.optim.Optimizer,
    cfg: TrainConfig,
    *,
    prox_mu: float = 0.0,
    prox_ref: Any = None,
    epoch: int = 0,
) -> dict[str, float]:
    """One pass over ``dataset`` in a seeded random order, one bag per forward pass.

    Every ``cfg.grad_accum_steps`` bags (and once for the remainder) the optimizer steps on the
    mean gradient of those bags. With ``prox_mu > 0`` the FedProx term ``prox_mu / 2 *
    ||w - w_ref||^2`` is added to the objective (its gradient ``prox_mu * (w - w_ref)`` once per
    step); ``prox_ref`` is the round's global model: a ``state_dict``-like mapping by parameter name,
    a module, or tensors in ``model.parameters()`` order.

    Returns:
        ``{"loss": mean training objective (cross-entropy plus the model's ``auxiliary_loss``, if it
        has one), "accuracy": train accuracy, "n": bags, "steps": optimizer steps, "prox": proximal
        term at the end of the epoch (0 without FedProx)}``.
    """
    device = model_device(model)
    n = len(dataset)
    if n == 0:
        logger.warning("train_one_epoch: empty training set, nothing to do.")
        return {"loss": float("nan"), "accuracy": float("nan"), "n": 0.0, "steps": 0.0, "prox": 0.0}
    if prox_mu < 0:
        raise ValueError(f"prox_mu must be >= 0, got {prox_mu}")
    if prox_mu > 0 and prox_ref is None:
        raise ValueError("prox_mu > 0 needs prox_ref (the global model's weights).")
    pairs = _prox_pairs(model, prox_ref) if prox_mu > 0 else []
    weights = _class_weights(dataset, cfg, device)
    gen = torch.Generator().manual_seed(int(cfg.seed) * 100_003 + int(epoch))
    order = torch.randperm(n, generator=gen).tolist()
    k = cfg.grad_accum_steps
    model.train()
    optimizer.zero_grad(set_to_none=True)
    total_loss, correct, steps = 0.0, 0, 0
    bar = _progress(range(n), cfg.progress and n >= 500, desc=f"epoch {epoch} train", leave=False, unit="bag")
    for j in bar:
        bag = dataset[order[j]]
        x = bag.features
        if cfg.max_instances is not None and x.shape[0] > cfg.max_instances:
            keep = torch.randperm(x.shape[0], generator=gen)[: cfg.max_instances]
            x = x[keep]
        x = x.to(device, non_blocking=True).unsqueeze(0)
        y = torch.tensor([bag.label], device=device)
        group_start = (j // k) * k
        group_size = min(k, n - group_start)
        with _autocast(device, cfg.mixed_precision):
            out = model(x)
        logits = _logits(out)
        loss = F.cross_entropy(logits.float(), y, weight=weights)
        aux = model.auxiliary_loss(out, y) if hasattr(model, "auxiliary_loss") else None
        if aux is not None:  # e.g. TDA-MIL's selection objective (TDAMILConfig.selection_loss_weight)
            loss = loss + aux
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"training loss is {loss.item()} at slide '{bag.slide_id}' (epoch {epoch}). Lower train.lr, set "
                f"train.max_grad_norm, or check that slide's features for NaN/inf values."
            )
        (loss / group_size).backward()
        total_loss += float(loss.detach())
        correct += int(int(logits.argmax(dim=1).item()) == bag.label)
        if j == group_start + group_size - 1:
            if pairs:
                with torch.no_grad():
                    for p, r in pairs:
                        if p.grad is None:
                            p.grad = torch.zeros_like(p)
                        p.grad.add_(p.detach() - r, alpha=prox_mu)
            if cfg.max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            steps += 1
    prox = 0.0
    if pairs:
        with torch.no_grad():
            prox = float(0.5 * prox_mu * sum(float(((p - r) ** 2).sum()) for p, r in pairs))
    return {"loss": total_loss / n, "accuracy": correct / n, "n": float(n), "steps": float(steps), "prox": prox}


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
    try:
        for i in _progress(range(len(dataset)), progress, desc="evaluate", leave=False, unit="bag"):
            bag = dataset[i]
            with _autocast(dev, mixed_precision):
                out = model(bag.features.to(dev).unsqueeze(0))
            logits = _logits(out).float()
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
    inst = instance_metrics(scores, inst_labels, y.tolist(), [r if r is not None else s for r, s in zip(ranking, scores)])
    return EvalResult(metrics=metrics, probs=p, labels=y, slide_ids=ids, scores=scores, instance_metrics=inst)


# --------------------------------------------------------------------------------------------
def make_lr_scheduler(opt: torch.optim.Optimizer, cfg: TrainConfig) -> Optional[LRScheduler]:
    """The epoch-wise lr schedule of ``cfg`` (stepped once after each epoch), None when lr is constant.

    Warm-up (``warmup_epochs`` = W > 0): lr * (e + 1) / (W + 1) in epoch e < W, reaching lr at
    epoch W (``LinearLR``). ``cosine``: then lr * (1 + cos(pi * (e - W) / (epochs - W))) / 2, decaying
    towards 0 at ``epochs`` (``CosineAnnealingLR``); ``constant``: lr from epoch W on.
    """
    w = cfg.warmup_epochs
    parts: list[LRScheduler] = []
    if w > 0:
        parts.append(LinearLR(opt, start_factor=1 / (w + 1), end_factor=1.0, total_iters=w))
    if cfg.lr_schedule == "cosine" and cfg.epochs > w:
        parts.append(CosineAnnealingLR(opt, T_max=cfg.epochs - w))
    if len(parts) == 2:
        return SequentialLR(opt, parts, milestones=[w])
    return parts[0] if parts else None


def _improved(value: float, best: float, maximise: bool, loss: float = math.nan, best_loss: float = math.nan) -> bool:
    """A strictly better monitored value, or an equal one with a strictly lower validation loss.

    The tie-break matters because small validation sets saturate: once val AUROC is 1.0 every later
    epoch ties, and without it selection would freeze on the first such epoch.
    """
    if math.isnan(value):
        return False
    if math.isnan(best):
        return True
    if value == best:
        return not math.isnan(loss) and (math.isnan(best_loss) or loss < best_loss)
    return value > best if maximise else value < best


def _write_history_csv(path: Path, history: Sequence[Mapping[str, float]]) -> None:
    keys: list[str] = []
    for row in history:
        keys += [k for k in row if k not in keys]
    with atomic_path(path) as tmp, tmp.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=keys)
        w.writeheader()
        w.writerows(history)


def fit(
    model: nn.Module,
    train_ds: BagDataset,
    val_ds: Optional[BagDataset],
    cfg: TrainConfig,
    *,
    out_dir: str | Path | None = None,
    model_config: Any = None,
    optimizer: Optional[torch.optim.Optimizer] = None,
    restore_best: bool = True,
) -> FitResult:
    """Train for up to ``cfg.epochs`` epochs with validation after each.

    The best epoch by ``cfg.monitor`` on ``val_ds`` is kept (the last epoch when there is no
    validation set): a new best needs a strictly better value, or an equal value with a strictly
    lower validation loss (ties broken by loss; with ``monitor: loss`` plain minimisation).
    Training stops after ``cfg.early_stopping_patience`` epochs without improvement.
    With ``out_dir``: ``best.pt`` and ``last.pt`` (weights + configs + metrics, written atomically)
    and ``metrics.csv`` (one row per epoch, rewritten after every epoch so an interrupted run keeps
    its history). With ``restore_best`` the model ends with the best epoch's weights.
    """
    seed_everything(cfg.seed)
    device = resolve_device(cfg.device)
    model.to(device)
    opt = optimizer or make_optimizer(model, cfg)
    schedule = make_lr_scheduler(opt, cfg)
    maximise = higher_is_better(cfg.monitor)
    has_val = val_ds is not None and len(val_ds) > 0
    out = Path(out_dir) if out_dir is not None else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    logger.info(
        "Training %s on %s: %d train bags, %d val bags, up to %d epochs, lr %.2g, monitor val %s",
        type(model).__name__, device, len(train_ds), len(val_ds) if val_ds is not None else 0, cfg.epochs, cfg.lr, cfg.monitor,
    )
    history: list[dict[str, float]] = []
    best_value, best_epoch, best_metrics = float("nan"), -1, nan_metrics(0)
    best_state: Optional[dict[str, torch.Tensor]] = None
    since_best, stopped = 0, False
    warned_nan = False
    bar = _progress(range(cfg.epochs), cfg.progress, desc="epochs", unit="epoch")
    for epoch in bar:
        t0 = time.perf_counter()
        lr = opt.param_groups[0]["lr"]
        tr = train_one_epoch(model, train_ds, opt, cfg, epoch=epoch)
        if schedule is not None:
            schedule.step()
        row: dict[str, float] = {"epoch": float(epoch + 1), "lr": lr, "train_loss": tr["loss"], "train_accuracy": tr["accuracy"]}
        if has_val:
            vm = evaluate(model, val_ds, mixed_precision=cfg.mixed_precision).metrics
            row.update({f"val_{k}": v for k, v in vm.items()})
            value = vm[cfg.monitor]
            if math.isnan(value) and not warned_nan:
                logger.warning("val %s is undefined (one class in the validation set?); the first epoch is kept as best.", cfg.monitor)
                warned_nan = True
        else:
            vm, value = nan_metrics(0), float("nan")
        row["seconds"] = time.perf_counter() - t0
        history.append(row)
        is_best = best_epoch < 0 or (not has_val) or _improved(value, best_value, maximise, vm["loss"], best_metrics["loss"])
        if is_best:
            best_value, best_epoch, best_metrics, since_best = value, epoch + 1, dict(vm), 0
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            if out is not None:
                save_checkpoint(out / "best.pt", model, train_config=cfg, model_config=model_config, metrics=vm, epoch=epoch + 1)
        else:
            since_best += 1
        if out is not None:
            save_checkpoint(out / "last.pt", model, train_config=cfg, model_config=model_config, metrics=vm, epoch=epoch + 1)
            _write_history_csv(out / "metrics.csv", history)
        msg = f"epoch {epoch + 1}/{cfg.epochs}: train loss {tr['loss']:.4f}"
        if has_val:
            msg += f", val {cfg.monitor} {value:.4f} (best {best_value:.4f} @ {best_epoch})"
        logger.info(msg)
        if hasattr(bar, "set_postfix"):
            bar.set_postfix(loss=f"{tr['loss']:.3f}", **({f"val_{cfg.monitor}": f"{value:.3f}"} if has_val else {}))
        if (
            has_val
            and cfg.early_stopping_patience > 0
            and since_best >= cfg.early_stopping_patience
            and epoch + 1 >= cfg.min_epochs
        ):
            logger.info("Early stopping after epoch %d: no better val %s for %d epochs.", epoch + 1, cfg.monitor, since_best)
            stopped = True
            break
    if hasattr(bar, "close"):
        bar.close()
    if restore_best and best_state is not None:
        model.load_state_dict(best_state)
    return FitResult(
        history=history,
        best_epoch=best_epoch,
        best_value=best_value,
        best_metrics=best_metrics,
        stopped_early=stopped,
        best_checkpoint=(out / "best.pt") if out is not None and best_epoch > 0 else None,
        last_checkpoint=(out / "last.pt") if out is not None and history else None,
    )
