"""Screening of the sites' updates before aggregation, and of the aggregated model after it.

A reply that meets the message contract (:func:`~tdamil.federation.records.reply_problem`: the
global model's array names, shapes and dtypes, finite values, a bounded ``num-examples``) can still
spoil a round: weights scaled by 1e6, the received model sent back unchanged (a site that did not
train), or all-zero weights. :func:`screen_updates` compares each site's update ``w_i - w_global``
with the round's other updates and drops

* an update that is exactly zero (the site sent back the model it received), and
* an update whose L2 norm exceeds ``factor`` times the median norm of the OTHER sites' updates
  (``federation.update_norm_factor``, default 10; ``null`` turns the check off), and
* an update that points against the others (a sign-flipped update): with at least three updates
  left by the checks above, one whose cosine with the mean of the other updates is below BOTH
  ``min_cosine`` (``federation.update_min_cosine``, default 0) and ``-AGREEMENT_SHARE`` (0.5)
  times how much the others agree among themselves (the median of each one's cosine with the mean
  of the rest of them), AND whose cosine with a strict majority of the other updates, one by one,
  is negative. The most opposed update is dropped first and the rest judged again without it.

The updates the screens keep are then clipped (:func:`clip_updates`, only while the norm screen is
on): one whose norm exceeds ``CLIP_FACTOR`` (2) times the median norm of the other kept updates is
scaled down to that median, its direction unchanged (logged, not refused). Its magnitude is what is
anomalous, so it counts with a typical site's magnitude (as FLAME clips to the median norm), not
with the largest one an honest site could have.

Comparing with the others' median (not the mean, not including the site itself) keeps one huge
update from raising its own bar. Honest sites differ in update norm by their number of local steps
(slides x epochs); a factor of 10 leaves room for a site with many more slides before it is
refused, and clipping only above 2x leaves such a site its own magnitude up to twice a typical
site's step. An update scaled x10 sits at the refusal bar (7-15x the others' median in the benchmark: it passed
in most rounds and cost FedAvg up to 0.20 AUROC on tuning seeds 10-12); clipped, at most
0.01 against the run without that site. Honest sites of the benchmark's five ranged from 0.75x to
1.43x the others' median on seeds 10-12 (0.66x-1.65x on seeds 0-2; benchmarks/robustness.md), so
2x leaves an honest round untouched there; in the main job, whose sites differ 6x in slides, honest
updates of three sites were clipped in seeds 0-2 (2.3-4.6x the others' median; benchmarks/main_job.md).

A sign-flipped update has an ordinary norm but the wrong direction. Honest updates agree (cosine
with the others' mean ~0.7 in round 1, 0.0-0.3 by rounds 3-4: late updates are nearly orthogonal,
not opposed); a flipped update is about as opposed as an honest one agrees (-0.8 in round 1,
-0.15 to -0.4 by round 4 among five sites; -0.78, -0.20, -0.17 in rounds 1-3 among three). An
honest late update is sometimes slightly negative (-0.02 to -0.04, opposed to most others one by
one): a bar of 0 dropped it (with one site already missing, the round then failed for
``min_replies``). Half the others' agreement sits between the two; judging again after the most
opposed update is gone keeps a flipped update from pulling an honest one below the bar. Where
updates become noise a flipped one does little harm either way; robust strategies
(``fedmedian``, ``fedtrimmedavg``, ``krum``, ``multikrum``, ``bulyan``;
:mod:`tdamil.federation.strategies`) are the defence that needs no threshold.

:func:`model_problem` checks the aggregated model (layout and finite values) and :func:`cast_like`
gives it the global model's dtypes back (median-based strategies return float64 arrays).
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, Message

from tdamil.federation.records import ARRAYS

__all__ = ["updates", "screen_updates", "clip_updates", "model_problem", "cast_like", "layout_of", "CLIP_FACTOR"]

logger = logging.getLogger(__name__)

#: an update kept by the screens whose norm exceeds this factor times the median norm of the
#: other kept updates is scaled down to that median (only while the norm screen is on)
CLIP_FACTOR = 2.0
#: an update is opposed to the others when its cosine with their mean is below
#: min(update_min_cosine, -AGREEMENT_SHARE x how much they agree among themselves)
AGREEMENT_SHARE = 0.5


def layout_of(arrays: ArrayRecord) -> dict[str, tuple[tuple[int, ...], str]]:
    """``{name: (shape, dtype)}`` of an ArrayRecord."""
    return {k: (tuple(int(d) for d in a.shape), str(a.dtype)) for k, a in arrays.items()}


def _float_arrays(arrays: ArrayRecord) -> dict[str, np.ndarray]:
    out = {}
    for name, array in arrays.items():
        values = array.numpy()
        if values.dtype.kind == "f":
            out[name] = values.astype(np.float64, copy=False)
    return out


def updates(global_arrays: ArrayRecord, replies: list[Message]) -> list[np.ndarray]:
    """Each reply's update ``w_i - w_global`` over the floating-point arrays, flattened (float64)."""
    reference = _float_arrays(global_arrays)
    out = []
    for reply in replies:
        local = _float_arrays(reply.content.array_records[ARRAYS])
        out.append(np.concatenate([(local[k] - ref).ravel() for k, ref in reference.items()]))
    return out


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    na, nb = float(np.linalg.norm(a)), float(np.linalg.norm(b))
    return float(a @ b) / (na * nb) if na > 0 and nb > 0 else 0.0


def _against_the_others(i: int, deltas: list[np.ndarray], min_cosine: float) -> tuple[float, str] | None:
    """(cosine with the others' mean, reason) when update ``i`` points against the others, else None."""
    others = [d for j, d in enumerate(deltas) if j != i and np.any(d)]
    if len(others) < 2:
        return None
    with_mean = _cosine(deltas[i], np.mean(others, axis=0))
    opposed = sum(_cosine(deltas[i], d) < 0 for d in others)
    # how much the others agree among themselves (each one's cosine with the mean of the rest of
    # them, median): a flipped update is about as opposed as an honest one agrees, an honest update
    # in a late round of near-orthogonal updates is barely negative; half-way between is the bar
    agree = float(np.median([_cosine(d, np.mean([e for k, e in enumerate(others) if k != j], axis=0))
                             for j, d in enumerate(others)]))
    bar = min(min_cosine, -AGREEMENT_SHARE * max(agree, 0.0))
    if with_mean < bar and opposed * 2 > len(others):
        return with_mean, (f"the update points against the other sites' (cosine {with_mean:.3f} with their mean, "
                           f"negative with {opposed} of {len(others)}; they agree among themselves at {agree:.3f}, "
                           f"the bar is {bar:.3f}: federation.update_min_cosine={min_cosine:g} and "
                           f"-{AGREEMENT_SHARE:g}x their agreement)")
    return None


def _opposed_updates(deltas: list[np.ndarray], min_cosine: float) -> dict[int, str]:
    """Indices (into ``deltas``) of the updates that point against the others, with the reason: the
    most opposed one is dropped first and the rest judged again without it, so a flipped update
    does not drag an honest one below the bar."""
    alive = list(range(len(deltas)))
    out: dict[int, str] = {}
    while len(alive) >= 3:
        found = {i: r for k, i in enumerate(alive) if (r := _against_the_others(k, [deltas[j] for j in alive],
                                                                                 min_cosine)) is not None}
        if not found:
            break
        worst = min(found, key=lambda i: found[i][0])
        out[worst] = found[worst][1]
        alive.remove(worst)
    return out


def screen_updates(global_arrays: ArrayRecord, replies: list[Message], factor: float | None,
                   min_cosine: float | None = None, clip_factor: float | None = CLIP_FACTOR
                   ) -> tuple[list[Message], list[tuple[Message, str]]]:
    """Split contract-checked train replies into (kept, [(dropped, reason)]); with the norm screen
    on (``factor``), the kept updates are then clipped (:func:`clip_updates`)."""
    deltas = updates(global_arrays, replies)
    norms = [float(np.linalg.norm(d)) for d in deltas]
    why: dict[int, str] = {}
    for i in range(len(replies)):
        others = [n for j, n in enumerate(norms) if j != i and n > 0]
        if norms[i] == 0.0:
            why[i] = "the update is exactly zero: the site sent back the model it received (it did not train)"
        elif factor is not None and others and norms[i] > factor * float(np.median(others)):
            ratio = norms[i] / float(np.median(others))
            why[i] = (f"update norm {norms[i]:.4g} is {ratio:.3g}x the median of the other sites' "
                      f"({float(np.median(others)):.4g}); the limit is federation.update_norm_factor={factor:g}")
    if min_cosine is not None:  # judged among the updates the checks above kept
        rest = [i for i in range(len(replies)) if i not in why]
        why |= {rest[k]: r for k, r in _opposed_updates([deltas[i] for i in rest], min_cosine).items()}
    kept = [r for i, r in enumerate(replies) if i not in why]
    dropped = [(r, why[i]) for i, r in enumerate(replies) if i in why]
    if factor is not None and clip_factor is not None:
        clip_updates(global_arrays, kept, min(clip_factor, factor),
                     deltas=[d for i, d in enumerate(deltas) if i not in why])
    return kept, dropped


def clip_updates(global_arrays: ArrayRecord, replies: list[Message], factor: float,
                 deltas: list[np.ndarray] | None = None) -> list[str]:
    """Scale, in place, each update whose norm exceeds ``factor`` times the median norm of the
    OTHER replies' updates down to that median (``w_global + s (w_site - w_global)``, same dtype);
    its direction is kept. ``deltas``: the replies' :func:`updates` where the caller has them.
    Returns one line per clipped update (also logged)."""
    deltas = updates(global_arrays, replies) if deltas is None else deltas
    norms = [float(np.linalg.norm(d)) for d in deltas]
    typical = [float(np.median(o)) if (o := [n for j, n in enumerate(norms) if j != i and n > 0]) else None
               for i in range(len(replies))]
    reference = _float_arrays(global_arrays)
    clipped = []
    for reply, norm, median in zip(replies, norms, typical):
        if median is None or norm <= factor * median:
            continue
        scale = median / norm
        arrays = reply.content.array_records[ARRAYS]
        out = {}
        for name, array in arrays.items():
            values = array.numpy()
            if name in reference:
                values = (reference[name] + scale * (values.astype(np.float64) - reference[name])).astype(values.dtype)
                out[name] = Array(np.ascontiguousarray(values))
            else:
                out[name] = array
        reply.content[ARRAYS] = ArrayRecord(out)
        line = (f"update of node {reply.metadata.src_node_id} clipped from norm {norm:.4g} "
                f"({norm / median:.3g}x the median of the other sites', above the {factor:g}x bound) "
                f"to that median, {median:.4g}")
        logger.warning(line)
        clipped.append(line)
    return clipped


def model_problem(arrays: ArrayRecord, layout: dict[str, tuple[tuple[int, ...], str]]) -> str | None:
    """Why an aggregated model must not become the global model, or None."""
    found = layout_of(arrays)
    if set(found) != set(layout):
        return f"its arrays differ from the global model's ({len(found)} vs {len(layout)} arrays)"
    for name, (shape, _dtype) in layout.items():
        if found[name][0] != shape:
            return f"array {name!r} has shape {list(found[name][0])}, the global model's is {list(shape)}"
        values = arrays[name].numpy()
        if values.dtype.kind in "fc" and not np.isfinite(values).all():
            return f"array {name!r} holds {int(values.size - np.isfinite(values).sum())} non-finite value(s)"
    return None


def cast_like(arrays: ArrayRecord, layout: dict[str, tuple[tuple[int, ...], str]]) -> ArrayRecord:
    """``arrays`` with the global model's dtypes (and order); other arrays are left as they are."""
    out: dict[str, Any] = {}
    for name, array in arrays.items():
        want = layout.get(name, (None, str(array.dtype)))[1]
        if str(array.dtype) == want:
            out[name] = array
        else:
            values = array.numpy()
            if np.dtype(want).kind in "iu":
                values = np.rint(values)
            out[name] = Array(np.ascontiguousarray(values.astype(want)))
    order = [k for k in layout if k in out] + [k for k in out if k not in layout]
    return ArrayRecord({k: out[k] for k in order})
