"""Where TDA-MIL's task token starts when evidence is rare (tdamil.models.task_start)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tdamil.models.task_start import choose, separation, witness_refinement


def _bags(seed: int = 0, n_bags: int = 60, size: int = 200):
    """Centred tokens: every bag is a mixture of 6 tissue directions whose proportions differ more
    between bags than the rare evidence (1-3 patches of a positive bag, along ``evidence``) moves the
    bag mean, so the difference of bag means points mostly at tissue composition."""
    g = torch.Generator().manual_seed(seed)
    d = 16
    tissues = F.normalize(torch.randn(6, d, generator=g), dim=1) * 2.0
    evidence = F.normalize(torch.randn(d, generator=g), dim=0) * 3.0
    bags, labels, inst = [], [], []
    for i in range(n_bags):
        positive = bool(i % 2)
        mix = torch.distributions.Dirichlet(torch.full((6,), 0.3)).sample()
        kinds = torch.multinomial(mix, size, replacement=True, generator=g)
        x = tissues[kinds] + 0.5 * torch.randn(size, d, generator=g)
        y = torch.zeros(size, dtype=torch.bool)
        if positive:
            idx = torch.randperm(size, generator=g)[: int(torch.randint(1, 4, (1,), generator=g))]
            x[idx] = evidence + 0.5 * torch.randn(len(idx), d, generator=g)
            y[idx] = True
        bags.append(x)
        labels.append(positive)
        inst.append(y)
    return bags, labels, inst, evidence


def _instance_auroc(bags, inst, direction) -> float:
    from sklearn.metrics import roc_auc_score

    cos = torch.cat([F.normalize(x, dim=1) @ F.normalize(direction, dim=0) for x in bags])
    return float(roc_auc_score(torch.cat(inst).numpy(), cos.numpy()))


def test_witness_refinement_finds_rare_evidence_the_mean_contrast_misses():
    wins = 0
    for seed in range(5):
        torch.manual_seed(seed)
        bags, labels, inst, _ = _bags(seed)
        pos = torch.stack([x.mean(0) for x, y in zip(bags, labels) if y]).mean(0)
        neg = torch.stack([x.mean(0) for x, y in zip(bags, labels) if not y]).mean(0)
        start = pos - neg
        candidates = witness_refinement(bags, labels, start, steps=8, top=0.02)
        best, scores = choose(bags, labels, candidates, temperature=30.0, margin=0.25)
        assert len(candidates) == 9 and len(scores) == 9
        assert scores[best] >= scores[0]  # never a worse separation than the contrast start
        before, after = _instance_auroc(bags, inst, start), _instance_auroc(bags, inst, candidates[best])
        assert after >= before - 0.02, (seed, before, after)
        wins += after > 0.95 and after > before + 0.02
    assert wins >= 3, wins  # the refinement is what puts the start on the evidence in most seeds


def test_separation_is_the_bag_auroc_of_the_selection_logit():
    bags, labels, _, evidence = _bags(1)
    assert separation(bags, labels, evidence, temperature=30.0, margin=0.25) > 0.95
    assert separation(bags, labels, -evidence, temperature=30.0, margin=0.25) < 0.6
