"""Training engine: mean-gradient accumulation, FedProx, checkpoints, early stopping, evaluation."""

import math

import numpy as np
import pytest
import torch
from torch import nn

from tdamil.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from tdamil.data.bags import InMemoryBagDataset
from tdamil.train.engine import TrainConfig, evaluate, fit, train_one_epoch
from tdamil.train.metrics import METRIC_KEYS


pytestmark = pytest.mark.usefixtures("one_torch_thread")


class TinyAttnMIL(nn.Module):
    """Attention pooling over patches; enough to exercise the engine without the model package."""

    def __init__(self, d: int = 6, c: int = 2):
        super().__init__()
        self.attn = nn.Linear(d, 1)
        self.head = nn.Linear(d, c)

    def forward(self, x, mask=None):
        w = torch.softmax(self.attn(x).squeeze(-1), dim=1)
        logits = self.head((w.unsqueeze(-1) * x).sum(1))
        return type("Out", (), {"logits": logits, "scores": w})()


def _bags(n=8, d=6, seed=0, one_class=False):
    rng = np.random.default_rng(seed)
    feats, labels = [], []
    for i in range(n):
        y = 0 if one_class else i % 2
        x = rng.normal(size=(int(rng.integers(3, 9)), d)).astype(np.float32)
        x[0, 0] += 3.0 * y
        feats.append(x)
        labels.append(y)
    return InMemoryBagDataset(feats, labels, num_classes=2)


def _cfg(**kw):
    base = dict(lr=1.0, weight_decay=0.0, progress=False, mixed_precision=False, device="cpu")
    base.update(kw)
    return TrainConfig(**base)


def _mean_grad(model, ds):
    model.zero_grad()
    for i in range(len(ds)):
        b = ds[i]
        loss = nn.functional.cross_entropy(model(b.features[None]).logits, torch.tensor([b.label]))
        (loss / len(ds)).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def test_gradient_accumulation_equals_mean_gradient():
    torch.manual_seed(0)
    ds = _bags(n=4)
    model = TinyAttnMIL()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    g = _mean_grad(model, ds)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    out = train_one_epoch(model, ds, opt, _cfg(grad_accum_steps=4))
    assert out["steps"] == 1 and out["n"] == 4
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), before[n] - 0.5 * g[n], rtol=1e-5, atol=1e-6)


def test_accumulation_counts_steps_with_remainder():
    ds = _bags(n=5)
    model = TinyAttnMIL()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    assert train_one_epoch(model, ds, opt, _cfg(grad_accum_steps=2))["steps"] == 3
    assert train_one_epoch(model, ds, opt, _cfg(grad_accum_steps=1))["steps"] == 5


def test_fedprox_term_pulls_toward_reference():
    torch.manual_seed(1)
    ds = _bags(n=4)
    init = TinyAttnMIL()
    ref = {n: p.detach() + 0.5 for n, p in init.named_parameters()}
    plain, prox = TinyAttnMIL(), TinyAttnMIL()
    plain.load_state_dict(init.state_dict())
    prox.load_state_dict(init.state_dict())
    lr, mu = 0.1, 2.0
    train_one_epoch(plain, ds, torch.optim.SGD(plain.parameters(), lr=lr), _cfg(grad_accum_steps=4))
    res = train_one_epoch(prox, ds, torch.optim.SGD(prox.parameters(), lr=lr), _cfg(grad_accum_steps=4), prox_mu=mu, prox_ref=ref)
    # one SGD step: the proximal gradient mu * (w - w_ref) = -mu * 0.5 is added to the data gradient
    for (n, p_plain), p_prox in zip(plain.named_parameters(), prox.parameters()):
        torch.testing.assert_close(p_prox.detach(), p_plain.detach() + lr * mu * 0.5, rtol=1e-5, atol=1e-6)
    dist = lambda m: sum(float(((p.detach() - ref[n]) ** 2).sum()) for n, p in m.named_parameters())  # noqa: E731
    assert dist(prox) < dist(plain)
    assert res["prox"] > 0
    with pytest.raises(ValueError, match="prox_ref"):
        train_one_epoch(prox, ds, torch.optim.SGD(prox.parameters(), lr=lr), _cfg(), prox_mu=1.0)


def test_evaluate_returns_probs_scores_and_all_metric_keys():
    ds = _bags(n=6)
    model = TinyAttnMIL()
    model.train()
    res = evaluate(model, ds)
    assert model.training  # mode restored
    assert res.probs.shape == (6, 2) and np.allclose(res.probs.sum(1), 1)
    assert res.slide_ids == ds.slide_ids and res.labels.tolist() == ds.labels
    assert [len(s) for s in res.scores] == [b.shape[0] for b in (ds[i].features for i in range(6))]
    assert set(res.metrics) == set(METRIC_KEYS)


class TinyAttnMILWithAux(TinyAttnMIL):
    """TinyAttnMIL plus an auxiliary objective: the mean attention on the first patch."""

    def forward(self, x, mask=None):
        out = super().forward(x, mask)
        out.first = out.scores[:, 0]
        return out

    def auxiliary_loss(self, out, target):
        return out.first.mean()


def test_objective_is_the_loss_plus_the_models_auxiliary_objective():
    ds = _bags(n=6)
    plain = evaluate(TinyAttnMIL(), ds)
    assert plain.metrics["objective"] == plain.metrics["loss"]
    torch.manual_seed(0)
    model = TinyAttnMILWithAux()
    res = evaluate(model, ds)
    with torch.no_grad():
        aux = float(np.mean([float(model(ds[i].features[None]).scores[0, 0]) for i in range(len(ds))]))
    assert res.metrics["objective"] == pytest.approx(res.metrics["loss"] + aux)
    fitted = fit(model, ds, ds, _cfg(epochs=3, lr=0.05, monitor="objective", early_stopping_patience=0))
    objectives = [h["val_objective"] for h in fitted.history]
    assert fitted.best_value == min(objectives) and fitted.best_epoch == objectives.index(min(objectives)) + 1


def test_checkpoint_round_trip_and_errors(tmp_path):
    model = TinyAttnMIL()
    cfg = _cfg(epochs=3)
    path = save_checkpoint(tmp_path / "ck" / "best.pt", model, train_config=cfg, model_config={"name": "tiny"}, metrics={"auroc": 0.7}, epoch=2)
    assert [p.name for p in path.parent.iterdir()] == ["best.pt"]  # no temp file left behind
    other = TinyAttnMIL()
    ck = load_checkpoint(path, other)
    assert ck["epoch"] == 2 and ck["metrics"]["auroc"] == 0.7 and ck["train_config"]["epochs"] == 3
    assert ck["model_config"] == {"name": "tiny"}
    x = torch.randn(1, 5, 6)
    torch.testing.assert_close(model(x).logits, other(x).logits)
    (tmp_path / "bad.pt").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="bad.pt"):
        load_checkpoint(tmp_path / "bad.pt")
    with pytest.raises(CheckpointError, match="do not fit"):
        load_checkpoint(path, TinyAttnMIL(d=7))


def test_early_stopping_stops_and_keeps_best(tmp_path):
    train = _bags(n=6)
    val = _bags(n=4, seed=3, one_class=True)  # val AUROC undefined: never improves after epoch 1
    model = TinyAttnMIL()
    res = fit(model, train, val, _cfg(lr=1e-2, epochs=30, early_stopping_patience=3), out_dir=tmp_path)
    assert res.stopped_early and len(res.history) == 4 and res.best_epoch == 1
    assert load_checkpoint(tmp_path / "best.pt")["epoch"] == 1
    assert load_checkpoint(tmp_path / "last.pt")["epoch"] == 4
    assert len((tmp_path / "metrics.csv").read_text().strip().splitlines()) == 1 + 4
    best = load_checkpoint(tmp_path / "best.pt")["model_state"]
    for k, v in model.state_dict().items():  # restore_best
        torch.testing.assert_close(v, best[k])


def test_fit_monitors_val_loss_and_runs_all_epochs_without_patience():
    train, val = _bags(n=10), _bags(n=6, seed=4)
    res = fit(TinyAttnMIL(), train, val, _cfg(lr=5e-2, epochs=5, early_stopping_patience=0, monitor="loss"))
    assert len(res.history) == 5 and not res.stopped_early
    assert res.best_value == min(r["val_loss"] for r in res.history)
    assert not math.isnan(res.history[0]["train_loss"])


def test_mixed_precision_is_cuda_only_and_config_is_validated():
    ds = _bags(n=4)
    model = TinyAttnMIL()
    a = evaluate(model, ds, mixed_precision=True)  # on CPU: no autocast, identical float32 results
    b = evaluate(model, ds, mixed_precision=False)
    assert np.array_equal(a.probs, b.probs)
    from tdamil.config import ConfigError, from_dict

    with pytest.raises(ConfigError, match="grad_accum_steps must be >= 1"):
        from_dict(TrainConfig, {"grad_accum_steps": 0}, source="site.yaml")
    with pytest.raises(ConfigError, match="monitor"):
        from_dict(TrainConfig, {"monitor": "auc"}, source="site.yaml")
    assert from_dict(TrainConfig, {"lr": "1e-5"}).lr == 1e-5


@pytest.mark.parametrize("epochs,warmup,schedule", [(10, 0, "cosine"), (10, 3, "cosine"), (10, 3, "constant"),
                                                    (6, 0, "constant"), (4, 6, "cosine"), (7, 1, "cosine")])
def test_lr_schedule_is_linear_warmup_then_cosine_or_constant(epochs, warmup, schedule):
    """torch's schedulers give the documented schedule, epoch by epoch (the lr in force during epoch e)."""
    from tdamil.train.engine import make_lr_scheduler

    def expected(e):
        if e < warmup:
            return (e + 1) / (warmup + 1)
        if schedule == "cosine" and epochs > warmup:
            return 0.5 * (1 + math.cos(math.pi * (e - warmup) / (epochs - warmup)))
        return 1.0

    cfg = _cfg(epochs=epochs, warmup_epochs=warmup, lr_schedule=schedule, lr=0.01)
    opt = torch.optim.AdamW([nn.Parameter(torch.zeros(1))], lr=cfg.lr)
    sched = make_lr_scheduler(opt, cfg)
    assert (sched is None) == (warmup == 0 and schedule == "constant")
    got = []
    for _ in range(epochs):
        got.append(opt.param_groups[0]["lr"])
        if sched is not None:
            opt.step()
            sched.step()
    assert got == pytest.approx([0.01 * expected(e) for e in range(epochs)], rel=1e-9, abs=1e-15)


def test_fit_records_the_scheduled_lr(tmp_path):
    res = fit(TinyAttnMIL(), _bags(n=4), None, _cfg(epochs=3, warmup_epochs=1, lr_schedule="cosine", lr=0.01))
    assert [r["lr"] for r in res.history] == pytest.approx([0.005, 0.01, 0.005])
