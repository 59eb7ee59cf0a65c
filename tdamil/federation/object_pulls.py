"""Ask for a message's arrays as soon as they can be there, not up to 10 s later.

Flower 1.42 moves a message as an object tree and hands it to its receiver as soon as the sender
has *registered* it, before the objects (the arrays) have arrived; the receiver then asks for each
object and, while it is not there yet, waits 1, 2, 4, 8, 10, 10 ... s (+-20 %) between asks
(``flwr.supercore.inflatable.inflatable_utils.pull_objects``: ``PULL_INITIAL_BACKOFF = 1``,
``PULL_BACKOFF_CAP = 10``). A 22 MB model takes ~9 s to cross a 20 Mbit/s line, so the ask that
finds it lands up to several seconds after its last byte: over an 80 ms / 20 Mbit/s line the
default model's instruction reached the site's handler 6-7 s after its SuperNode had it, and each
reply reached the coordinator ~2.5 s after its upload ended (``benchmarks/wan.md``).

Two receivers wait like that in every round, and both ask a process on their own machine:

* the site's ClientApp asks its own SuperNode (which is still downloading the instruction):
  ``flwr.supernode.runtime.run_clientapp.pull_and_inflate_object_from_tree``;
* the coordinator's ServerApp asks its own SuperLink (the site is still uploading the reply):
  ``flwr.superlink.grid.http_grid.pull_objects``.

:func:`use_quick_object_pulls` makes those two asks start after :data:`INITIAL_S` and back off to at
most :data:`CAP_S`: a missing object costs a local request every half second at most, never link
traffic (the SuperNode's own pulls over the line are left as Flower has them). The number of tries
grows with it, so that the time a receiver keeps asking is Flower's (500 tries at the 10 s cap).
``tests/test_object_pulls.py`` fails if a Flower release renames what this wraps.
"""

from __future__ import annotations

import functools
import importlib
import logging
from collections.abc import Callable
from typing import Any

logger = logging.getLogger(__name__)

__all__ = ["INITIAL_S", "CAP_S", "PULL_SITES", "quick", "use_quick_object_pulls"]

INITIAL_S = 0.05
CAP_S = 0.5
FLOWER_MAX_TRIES, FLOWER_CAP_S = 500, 10.0  # flwr.supercore.constant: PULL_MAX_TRIES_PER_OBJECT, PULL_BACKOFF_CAP

#: (module, function) that a receiver calls to pull a message's objects from its own machine's Flower process.
PULL_SITES: dict[str, tuple[str, str]] = {
    "site": ("flwr.supernode.runtime.run_clientapp", "pull_and_inflate_object_from_tree"),
    "coordinator": ("flwr.superlink.grid.http_grid", "pull_objects"),
}


def quick(fn: Callable[..., Any], initial_s: float = INITIAL_S, cap_s: float = CAP_S) -> Callable[..., Any]:
    """``fn`` (Flower's ``pull_objects`` or ``pull_and_inflate_object_from_tree``) with a shorter back-off."""
    if getattr(fn, "_tdamil_quick", False):
        return fn

    @functools.wraps(fn)
    def pull(*args: Any, **kwargs: Any) -> Any:
        kwargs.setdefault("initial_backoff", initial_s)
        kwargs.setdefault("backoff_cap", cap_s)
        kwargs.setdefault("max_tries_per_object", int(FLOWER_MAX_TRIES * FLOWER_CAP_S / cap_s))
        return fn(*args, **kwargs)

    pull._tdamil_quick = True  # type: ignore[attr-defined]
    return pull


def use_quick_object_pulls(role: str, initial_s: float = INITIAL_S, cap_s: float = CAP_S) -> None:
    """Wrap the pull that ``role`` ("site" or "coordinator") uses, in this process (idempotent)."""
    module_name, name = PULL_SITES[role]
    module = importlib.import_module(module_name)
    setattr(module, name, quick(getattr(module, name), initial_s, cap_s))
    logger.debug("%s: a message's objects are asked for every %.2f-%.2f s while they arrive", role, initial_s, cap_s)
