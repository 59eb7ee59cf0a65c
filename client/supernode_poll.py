"""The site's SuperNode process: Flower's own ``flower-supernode``, with a shorter idle poll.

Flower 1.42's SuperNode loop asks the coordinator for a message and, when there is none, sleeps a
fixed 3 s (``flwr.supernode.start_client_internal``); it then waits for its ClientApp's reply in
0.5 s sleeps. Every round's message therefore sat 1.5 s on average (up to 3 s) before the site saw
it: about 2.5 s of the README demo's 7.5 s round, and the largest fixed cost left in a round
(``benchmarks/federation.md``). ``python -m tdamil.client.supernode_poll --poll-interval S <flower-supernode
arguments>`` runs Flower's entry point unchanged except for those two sleeps: the idle poll becomes
``federation.poll_interval_s`` (1 s by default: an idle site asks once a second, so 50 sites make 50
small requests a second at the coordinator) and the reply wait 0.1 s (a local check).
``tests/test_supernode_poll.py`` fails if a Flower release changes the loop this relies on.
"""

from __future__ import annotations

import argparse
import sys
import time as _time
from typing import Any, Optional

__all__ = ["FLOWER_IDLE_SLEEP_S", "FLOWER_REPLY_SLEEP_S", "PollClock", "main"]

FLOWER_IDLE_SLEEP_S = 3  # Flower's SuperNode: no message pulled
FLOWER_REPLY_SLEEP_S = 0.5  # Flower's SuperNode: reply (or its content) not ready yet


class PollClock:
    """The ``time`` module as Flower's SuperNode loop sees it, with its two fixed sleeps replaced."""

    def __init__(self, idle_s: float, reply_s: float = 0.1) -> None:
        self.idle_s, self.reply_s = float(idle_s), float(reply_s)

    def sleep(self, seconds: float) -> None:
        if seconds == FLOWER_IDLE_SLEEP_S:
            seconds = self.idle_s
        elif seconds == FLOWER_REPLY_SLEEP_S:
            seconds = self.reply_s
        _time.sleep(seconds)

    def __getattr__(self, name: str) -> Any:  # time.time, time.monotonic, ... unchanged
        return getattr(_time, name)


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tdamil.client.supernode_poll", add_help=False)
    parser.add_argument("--poll-interval", type=float, default=1.0)
    args, flower_args = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    import flwr.supernode.start_client_internal as loop  # noqa: PLC0415
    from flwr.supernode.cli.flower_supernode import flower_supernode  # noqa: PLC0415

    loop.time = PollClock(args.poll_interval)  # type: ignore[assignment]
    sys.argv = ["flower-supernode", *flower_args]
    flower_supernode()


if __name__ == "__main__":  # pragma: no cover
    main()
