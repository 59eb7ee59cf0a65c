"""Where TDA-MIL's task token ``T`` starts: candidates read off labelled bags, and the choice.

The contrast start (:meth:`TDAMIL.init_from_bags`) points ``T`` from the negative bags' mean token to
the positive bags'. Where evidence is rare (1-3 of 100 patches, 0.5 % of a slide) that difference of
bag MEANS is dominated by what the bags are otherwise made of, and the start can land on patches that
score above average but never highest: the map then stays on the wrong patches for good (issue: one
seed in three on bags the project had not seen).

:func:`witness_refinement` refines the start the way multiple-instance learning finds witnesses:
under the current direction, each bag's top ``top`` share of patches are its witnesses; the next
direction points from the negative bags' witnesses (their most evidence-like patches: look-alikes)
to the positive bags' (the evidence, once the direction is roughly right). Every step is a
candidate, the contrast start included, and :func:`choose` keeps the candidate whose selection
logit (the objective's own log-mean-exp pooling of ``temperature * (cos - margin)``) separates the
labelled bags best (bag AUROC; bag labels only, never instance labels). A start that already
separates keeps its place: refinement only replaces it when it separates better.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["witness_refinement", "separation", "choose"]


def _witness_mean(tokens: torch.Tensor, direction: torch.Tensor, top: float) -> torch.Tensor:
    cos = F.normalize(tokens, dim=-1) @ F.normalize(direction, dim=0)
    k = max(1, math.ceil(top * tokens.shape[0]))
    return tokens[torch.topk(cos, k).indices].mean(dim=0)


def witness_refinement(bags: list[torch.Tensor], labels: list[bool], start: torch.Tensor, *, steps: int,
                       top: float, damping: float = 0.5) -> list[torch.Tensor]:
    """``[start, T_1, ..., T_steps]`` (unit vectors after the start): each step moves half way
    (``damping``) towards the positive bags' mean witness minus the negative bags' (witnesses: a
    bag's top ``top`` share of tokens by cosine with the previous direction). Undamped steps
    oscillated between two sets of witnesses on some seeds."""
    candidates = [start]
    direction = F.normalize(start, dim=0)
    for _ in range(steps):
        means = [_witness_mean(x, direction, top) for x in bags]
        pos = torch.stack([m for m, y in zip(means, labels) if y]).mean(dim=0)
        neg = torch.stack([m for m, y in zip(means, labels) if not y]).mean(dim=0)
        step = pos - neg
        if not torch.isfinite(step).all() or step.norm() == 0:
            break
        direction = F.normalize(damping * direction + (1 - damping) * F.normalize(step, dim=0), dim=0)
        candidates.append(direction)
    return candidates


def separation(bags: list[torch.Tensor], labels: list[bool], direction: torch.Tensor, *, temperature: float,
               margin: float) -> float:
    """Bag AUROC of the selection logit ``logmeanexp(temperature * (cos - margin))`` under ``direction``."""
    unit = F.normalize(direction, dim=0)
    logits = []
    for x in bags:
        cos = F.normalize(x, dim=-1) @ unit
        logits.append(float(torch.logsumexp(temperature * (cos - margin), dim=0) - math.log(x.shape[0])))
    pos = [v for v, y in zip(logits, labels) if y]
    neg = [v for v, y in zip(logits, labels) if not y]
    wins = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


def choose(bags: list[torch.Tensor], labels: list[bool], candidates: list[torch.Tensor], *, temperature: float,
           margin: float) -> tuple[int, list[float]]:
    """Index of the candidate that separates the labelled bags best (the earliest on a tie), and
    every candidate's separation."""
    scores = [separation(bags, labels, c, temperature=temperature, margin=margin) for c in candidates]
    best = max(range(len(scores)), key=lambda i: (round(scores[i], 6), -i))
    return best, scores
