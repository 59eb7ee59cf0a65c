"""A receiver asks for a message's arrays every <= 0.5 s while they arrive (tdamil.federation.object_pulls).

Flower's own back-off (1, 2, 4 ... s) finds an object that arrives 1.1 s after the first ask only
at 3 s; the project's wrapper finds it within half a second. Fails too when a Flower release
renames or re-signs what the wrapper wraps."""

from __future__ import annotations

import importlib
import inspect
import threading
import time

import pytest
from flwr.supercore.inflatable import inflatable_utils
from flwr.supercore.inflatable.inflatable_utils import ObjectUnavailableError

from tdamil.federation.object_pulls import CAP_S, PULL_SITES, quick, use_quick_object_pulls

ARRIVES_S = 1.1


class _NoJitter:
    """``random`` as Flower's back-off sees it, without the +-20 % jitter (a deterministic schedule)."""

    @staticmethod
    def uniform(a: float, b: float) -> float:
        del a, b
        return 0.0


def _time_to_get(pull) -> float:
    start = time.monotonic()

    def pull_object(object_id: str) -> bytes:
        if time.monotonic() - start < ARRIVES_S:
            raise ObjectUnavailableError(object_id)
        return b"array bytes"

    assert pull(object_ids=["obj"], pull_object_fn=pull_object) == {"obj": b"array bytes"}
    return time.monotonic() - start


def test_an_arriving_object_is_found_within_the_cap_not_at_flowers_next_back_off(monkeypatch):
    monkeypatch.setattr(inflatable_utils, "random", _NoJitter)
    took: dict[str, float] = {}
    runs = {"flower": inflatable_utils.pull_objects, "quick": quick(inflatable_utils.pull_objects)}
    threads = [threading.Thread(target=lambda k=k, f=f: took.__setitem__(k, _time_to_get(f))) for k, f in runs.items()]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert took["flower"] >= 2.9  # asks at 0, 1 and 3 s
    assert took["quick"] < ARRIVES_S + CAP_S + 0.4


@pytest.mark.parametrize("role", sorted(PULL_SITES))
def test_the_wrapped_flower_pulls_exist_and_take_the_back_off_arguments(role, monkeypatch):
    module_name, name = PULL_SITES[role]
    module = importlib.import_module(module_name)
    params = inspect.signature(getattr(module, name)).parameters
    assert {"initial_backoff", "backoff_cap", "max_tries_per_object"} <= set(params)
    monkeypatch.setattr(module, name, getattr(module, name))  # undone after the test
    use_quick_object_pulls(role)
    use_quick_object_pulls(role)  # idempotent: wrapped once
    wrapped = getattr(module, name)
    assert wrapped._tdamil_quick and not getattr(wrapped.__wrapped__, "_tdamil_quick", False)
