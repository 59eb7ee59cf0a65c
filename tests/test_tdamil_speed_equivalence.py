"""The fast paths of TDA-MIL's training step give the same numbers, bit for bit, as the plain
autograd computations they replace (benchmarks/faithfulness.md, per-epoch cost)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tdamil.models import create_model
from tdamil.models.tdamil import _LeakyClamp


def _reference_leaky(cos: torch.Tensor, keep: torch.Tensor, slope: float) -> torch.Tensor:
    """The leaky clamp as it was written before: eight autograd operations."""
    s = cos.clamp(0.0, 1.0)
    outside = ((cos < 0) | (cos > 1)).to(cos.dtype)
    return (s + slope * outside * (cos - cos.detach())) * keep


def test_leaky_clamp_matches_reference_bitwise():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(3, 41, generator=g) * 0.9  # values below 0, inside [0, 1] and above 1
    base[0, :3] = torch.tensor([0.0, 1.0, -0.0])  # the bounds: clamp passes no gradient there
    keep = torch.rand(3, 41, generator=g) > 0.2
    upstream = torch.randn(3, 41, generator=g)
    a = base.clone().requires_grad_()
    b = base.clone().requires_grad_()
    out_a = _LeakyClamp.apply(a, 0.1, keep)
    out_b = _reference_leaky(b, keep, 0.1)
    (out_a * upstream).sum().backward()
    (out_b * upstream).sum().backward()
    assert torch.equal(out_a, out_b)
    assert torch.equal(a.grad, b.grad)


def _step(model, x, y):
    out = model(x)
    loss = F.cross_entropy(out.logits, y) + model.auxiliary_loss(out, y)
    loss.backward()
    return out


def _reference_forward(model, x):
    """The selection logit and auxiliary inputs computed the plain way (isfinite count)."""
    trace = model.forward_trace(x)
    cfg = model.cfg
    per_patch = cfg.selection_temperature * (trace.cosine - cfg.selection_margin)
    n_real = torch.isfinite(trace.cosine).sum(dim=1).to(per_patch.dtype)
    return trace, torch.logsumexp(per_patch, dim=1) - n_real.log()


def test_training_step_matches_plain_autograd_bitwise():
    torch.manual_seed(0)
    model = create_model({"name": "tdamil", "dim": 32, "depth": 1, "num_heads": 4}, in_dim=16, num_classes=2)
    model.task_token_ready.fill_(1.0)
    model.train()
    x = torch.randn(1, 30, 16)
    y = torch.tensor([1])
    out = _step(model, x, y)
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    trace, logit = _reference_forward(model, x)
    assert torch.equal(out.selection_logit, logit)
    assert torch.equal(out.logits, trace.logits)
    # the reference loss: the weight applied as a product, the count of real patches by isfinite
    cfg = model.cfg
    loss = F.cross_entropy(trace.logits, y) + cfg.selection_loss_weight * F.binary_cross_entropy_with_logits(
        logit, (y != 0).float())
    loss.backward()
    for n, p in model.named_parameters():
        assert torch.equal(p.grad, grads[n]), n
