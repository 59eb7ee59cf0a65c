"""Local training of a MIL model, one bag (slide) per step.

* :class:`TrainConfig`      the ``train:`` section of a YAML, with documented defaults.
* :func:`train_one_epoch`   one pass over a dataset (optionally with the FedProx proximal term).
* :func:`evaluate`          (from :mod:`tdamil.train.evaluate`) slide probabilities, patch scores, metrics.
* :func:`fit`               epochs with validation, early stopping, best/last checkpoints
                            (:mod:`tdamil.checkpoint`), history.

Bags differ in size (a slide has 5k-100k patches), so each step sees one bag (batch 1, as in the
TDA-MIL paper); ``grad_accum_steps`` bags are accumulated per optimizer step, and the accumulated
gradient is the MEAN over those bags. Mixed precision (bf16 autocast) is used on CUDA only.
"""

from __future__ import annotations

import csv
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Literal, Mapping, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.lr_scheduler import CosineAnnealingLR, LinearLR, LRScheduler, SequentialLR

from tdamil.atomic import atomic_path
from tdamil.checkpoint import save_checkpoint
from tdamil.data.bags import BagDataset, class_counts
from tdamil.train.evaluate import EvalResult, evaluate
from tdamil.train.metrics import higher_is_better, nan_metrics
from tdamil.train.runtime import autocast, logits_of, model_device, progress, resolve_device, seed_everything

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

MonitorKey = Literal["auroc", "balanced_accuracy", "f1", "accuracy", "loss", "objective"]


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
                             ``loss`` and ``objective`` are minimised, the others maximised).
                             ``objective`` is the training objective on the validation slides:
                             cross-entropy plus the model's auxiliary term (TDA-MIL's selection
                             objective), so the kept epoch also has a trained selection; for
                             models without one it equals ``loss``.
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
def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters with ``cfg.lr`` and ``cfg.weight_decay``."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters.")
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=tuple(cfg.betas))


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


# --------------------------------------------------------------------------------------------
def _labelled_init(model: nn.Module, dataset: BagDataset, order: Sequence[int], device: torch.device) -> None:
    """Show a model that starts from labelled bags (TDA-MIL's ``task_init: contrast``) the training
    bags in this epoch's order, one at a time, before its first step; it reads as many as it needs."""

    def bags() -> Iterator[tuple[torch.Tensor, int]]:
        for i in order:
            bag = dataset[i]
            yield bag.features.to(device), bag.label

    t0 = time.perf_counter()
    read = model.init_from_bags(bags())
    if read["positive"] and read["positive"] < read["bags"]:
        how = "pointed from the negative to the positive bags' mean token"
        choice = getattr(model, "task_start_choice", None)
        if choice is not None:
            best, scores = choice
            how += (f", then refined on their witness patches: step {best} of {len(scores) - 1} kept (bag separation "
                    f"{scores[best]:.3f}, contrast start {scores[0]:.3f})")
    else:
        how = "only one class among them, so its sign was chosen on the first bag"
    logger.info("Task token T started from %d training bags (%d positive) in %.1f s: %s.",
                read["bags"], read["positive"], time.perf_counter() - t0, how)


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
    if getattr(model, "awaits_labelled_init", False):
        _labelled_init(model, dataset, order, device)
    optimizer.zero_grad(set_to_none=True)
    total_loss, correct, steps = 0.0, 0, 0
    bar = progress(range(n), cfg.progress and n >= 500, desc=f"epoch {epoch} train", leave=False, unit="bag")
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
        with autocast(device, cfg.mixed_precision):
            out = model(x)
        logits = logits_of(out)
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


def _start_candidates(model: nn.Module, opt: torch.optim.Optimizer, schedule: Optional[LRScheduler], train_ds: BagDataset,
                      val_ds: BagDataset, cfg: TrainConfig) -> tuple[list[dict[str, float]], dict[str, float]]:
    """Restarts judged on the validation bags (``start_candidates`` K > 1 in the model's config,
    e.g. :class:`~tdamil.models.tdamil_config.TDAMILConfig`): the model and K - 1 fresh copies
    (``model.start_candidate(seed)``) are each trained ``start_candidate_epochs`` epochs on the same
    bags in the same order; the one with the lowest validation objective (bag labels only) is loaded
    into ``model`` and ``opt`` (``schedule`` has stepped as far). Returns its history rows and its
    validation metrics."""
    k_all, epochs = int(model.cfg.start_candidates), int(model.cfg.start_candidate_epochs)
    best: Optional[tuple[float, int, nn.Module, torch.optim.Optimizer, list[dict[str, float]], dict[str, float]]] = None
    said = []
    for k in range(k_all):
        if k == 0:
            cand, c_opt, c_sched = model, opt, schedule
        else:
            cand = model.start_candidate(int(cfg.seed) * 1000 + k)
            c_opt = make_optimizer(cand, cfg)
            c_sched = make_lr_scheduler(c_opt, cfg)
        rows = []
        for epoch in range(epochs):
            t0, lr = time.perf_counter(), c_opt.param_groups[0]["lr"]
            tr = train_one_epoch(cand, train_ds, c_opt, cfg, epoch=epoch)
            if c_sched is not None:
                c_sched.step()
            rows.append({"epoch": float(epoch + 1), "lr": lr, "train_loss": tr["loss"], "train_accuracy": tr["accuracy"],
                         "start_candidate": float(k), "seconds": time.perf_counter() - t0})
        vm = evaluate(cand, val_ds, mixed_precision=cfg.mixed_precision).metrics
        rows[-1].update({f"val_{key}": v for key, v in vm.items()})
        objective = vm.get("objective", vm["loss"])
        objective = objective if math.isfinite(objective) else math.inf
        said.append(f"{objective:.3f}")
        if best is None or objective < best[0]:
            best = (objective, k, cand, c_opt, rows, vm)
    assert best is not None
    _, k, cand, c_opt, rows, vm = best
    if cand is not model:
        model.load_state_dict(cand.state_dict())
        opt.load_state_dict(c_opt.state_dict())
    model.start_candidate_choice = (k, [float(x) for x in said])
    logger.info("Start candidates: validation objective after %d epochs %s; candidate %d kept.", epochs, ", ".join(said), k)
    return rows, vm


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
    mcfg = getattr(model, "cfg", None)
    if (has_val and int(getattr(mcfg, "start_candidates", 1)) > 1 and callable(getattr(model, "start_candidate", None))
            and cfg.epochs > int(mcfg.start_candidate_epochs)):  # restarts need epochs to continue the kept one
        rows, vm = _start_candidates(model, opt, schedule, train_ds, val_ds, cfg)
        history += rows
        best_value, best_epoch, best_metrics = vm[cfg.monitor], len(rows), dict(vm)
        best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        if out is not None:
            save_checkpoint(out / "best.pt", model, train_config=cfg, model_config=model_config, metrics=vm, epoch=best_epoch)
    bar = progress(range(len(history), cfg.epochs), cfg.progress, desc="epochs", unit="epoch")
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
