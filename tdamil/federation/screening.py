"""Screening of the sites' updates before aggregation, and of the aggregated model after it.

A reply that meets the message contract (:func:`~tdamil.federation.records.reply_problem`: the
global model's array names, shapes and dtypes, finite values, a bounded ``num-examples``) can still
spoil a round: weights scaled by 1e6, the received model sent back unchanged (a site that did not
train), or all-zero weights. :func:`screen_updates` compares each site's update ``w_i - w_global``
with the round's other updates and drops

* an update that is exactly zero (the site sent back the model it received), and
* an update whose L2 norm exceeds ``factor`` times the median norm of the OTHER sites' updates
  (``federation.update_norm_factor``, default 10; ``null`` turns the check off), and
* an update that points against the others (a sign-flipped update): with at least three updates,
  one whose cosine with the mean of the other updates is below ``min_cosine``
  (``federation.update_min_cosine``, default 0) AND whose cosine with a strict majority of the
  other updates, one by one, is negative.

Comparing with the others' median (not the mean, not including the site itself) keeps one huge
update from raising its own bar. Honest sites differ in update norm by their number of local steps
(slides x epochs); a factor of 10 leaves room for a site with many more slides. A sign-flipped
update has an ordinary norm but the wrong direction. Measured on three honest digits sites
(benchmarks/robustness.md), honest updates agree (cosine with the others' mean 0.75 in round 1,
0.08-0.16 by round 3: late updates are nearly orthogonal, not opposed). A flipped update scored
-0.77, -0.18 and -0.09 in rounds 1-3 (negative with both honest updates each time), the honest
sites beside it 0.02 to 0.09 (negative with one of the two). The flipped update's signal shrinks
with the honest sites' agreement, so a margin below 0 (-0.1 was tried) lets it through by round
3; the majority rule is what keeps an honest site whose update merely disagrees with one other.
Where updates become noise a flipped one does little harm either way; robust strategies (``fedmedian``,
``fedtrimmedavg``, ``krum``, ``multikrum``, ``bulyan``; :mod:`tdamil.federation.strategies`) are
the defence that needs no threshold.

:func:`model_problem` checks the aggregated model (layout and finite values) and :func:`cast_like`
gives it the global model's dtypes back (median-based strategies return float64 arrays).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, Message

from tdamil.federation.records import ARRAYS

__all__ = ["updates", "screen_updates", "model_problem", "cast_like", "layout_of"]


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


def _against_the_others(i: int, deltas: list[np.ndarray], min_cosine: float) -> str | None:
    others = [d for j, d in enumerate(deltas) if j != i and np.any(d)]
    if len(others) < 2:
        return None
    with_mean = _cosine(deltas[i], np.mean(others, axis=0))
    opposed = sum(_cosine(deltas[i], d) < 0 for d in others)
    if with_mean < min_cosine and opposed * 2 > len(others):
        return (f"the update points against the other sites' (cosine {with_mean:.3f} with their mean, negative with "
                f"{opposed} of {len(others)}; the limit is federation.update_min_cosine={min_cosine:g})")
    return None


def screen_updates(global_arrays: ArrayRecord, replies: list[Message], factor: float | None,
                   min_cosine: float | None = None) -> tuple[list[Message], list[tuple[Message, str]]]:
    """Split contract-checked train replies into (kept, [(dropped, reason)])."""
    deltas = updates(global_arrays, replies)
    norms = [float(np.linalg.norm(d)) for d in deltas]
    kept: list[Message] = []
    dropped: list[tuple[Message, str]] = []
    for i, reply in enumerate(replies):
        others = [n for j, n in enumerate(norms) if j != i and n > 0]
        opposed = _against_the_others(i, deltas, min_cosine) if min_cosine is not None else None
        if norms[i] == 0.0:
            dropped.append((reply, "the update is exactly zero: the site sent back the model it received "
                                   "(it did not train)"))
        elif factor is not None and others and norms[i] > factor * float(np.median(others)):
            ratio = norms[i] / float(np.median(others))
            dropped.append((reply, f"update norm {norms[i]:.4g} is {ratio:.3g}x the median of the other sites' "
                                   f"({float(np.median(others)):.4g}); the limit is federation.update_norm_factor="
                                   f"{factor:g}"))
        elif opposed is not None:
            dropped.append((reply, opposed))
        else:
            kept.append(reply)
    return kept, dropped


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
