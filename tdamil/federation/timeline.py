"""Where a federated round's seconds go: the per-site and coordinator timeline.

A site stamps wall-clock times (``time.time()``) as its ClientApp runs and returns them in its reply
(the ``time-*`` keys of :data:`~tdamil.federation.records.TIMELINE_KEYS`); the coordinator stamps
when it sent the round's messages, when each reply arrived and how long aggregation, held-out
evaluation and checkpoint writing took. :func:`site_segments` turns one site's stamps into
consecutive durations that sum exactly to "sent -> received"; :func:`round_table` turns a round into
one row whose columns sum to the round's wall time, the remainder being ``unaccounted``.

Durations between two site stamps are exact; "sent -> process start" and "reply built -> received"
compare the coordinator's clock with the site's, so on separate machines they carry the clock
offset (NTP keeps it to milliseconds). The SuperNode's pull of the message is not observable from
the app: it lies inside ``wait + spawn``.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from typing import Any

__all__ = ["SITE_STAMPS", "STAMP_REPLY_BUILT", "SEGMENTS", "process_start_time", "site_segments", "RoundClock",
           "round_table", "TABLE_COLUMNS"]

# The site's stamps, in the order they happen in one ClientApp run (reply metric keys).
SITE_STAMPS: tuple[str, ...] = (
    "time-process-start",     # the ClientApp process was created (Linux /proc; NaN elsewhere)
    "time-import-start",      # Flower started importing the app module (Flower start-up before it)
    "time-imported",          # the app module and what it imports are loaded
    "time-handler-start",     # the handler received the message
    "time-data-opened",       # the site's datasets are open
    "time-model-built",       # the model is built and holds the global arrays
    "time-global-evaluated",  # the incoming global model was evaluated on the validation split
    "time-trained",           # local training done
    "time-local-evaluated",   # the trained model was evaluated on the validation split
    "time-reply-built",       # the reply's arrays and metrics are ready
)

STAMP_REPLY_BUILT = SITE_STAMPS[-1]  # also the coordinator's start of a reply's upload (grids.reply_transfer)

# Segment name -> the stamp that ends it ("received" is the coordinator's stamp).
SEGMENTS: tuple[tuple[str, str], ...] = (
    ("wait + spawn", "time-process-start"),
    ("python + flower start", "time-import-start"),
    ("app imports", "time-imported"),
    ("flower -> handler", "time-handler-start"),
    ("open data", "time-data-opened"),
    ("build model", "time-model-built"),
    ("evaluate global", "time-global-evaluated"),
    ("train", "time-trained"),
    ("evaluate local", "time-local-evaluated"),
    ("serialise reply", "time-reply-built"),
    ("push + poll", "received"),
)

TABLE_COLUMNS: tuple[str, ...] = (
    ("configure",) + tuple(name for name, _ in SEGMENTS)
    + ("wait for missing sites", "aggregate", "site evaluate message", "held-out evaluation", "checkpoint",
       "unaccounted")
)


def process_start_time() -> float:
    """Wall-clock time this process was created (``/proc`` on Linux; NaN where unavailable)."""
    try:
        with open("/proc/self/stat", encoding="ascii") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
        ticks = int(fields[19])  # field 22 of stat(5); the first two fields were split off
        with open("/proc/stat", encoding="ascii") as fh:
            btime = next(int(line.split()[1]) for line in fh if line.startswith("btime"))
        return btime + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return float("nan")


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(float(value))


def site_segments(sent: float, received: float, stamps: dict[str, Any]) -> dict[str, float]:
    """Consecutive durations from ``sent`` to ``received`` for one site's reply.

    Each stamp is clamped to lie between the previous one and ``received``, so a stamp from before
    the message was sent (an in-process simulation's process start, a missing stamp) gives a
    zero-length segment and the segments always sum to ``received - sent``.
    """
    out: dict[str, float] = {}
    prev = sent
    for name, key in SEGMENTS:
        value = received if key == "received" else stamps.get(key)
        at = min(max(float(value), prev), received) if _finite(value) else prev
        out[name] = at - prev
        prev = at
    return out


@dataclass
class RoundClock:
    """The coordinator's stamps and durations for one round (``time.time()`` seconds)."""

    started: float = field(default_factory=time.time)
    sent: float = math.nan
    collected: float = math.nan  # the train replies were handed over (all in, or the round's deadline)
    received: dict[str, float] = field(default_factory=dict)  # site -> reply arrival
    stamps: dict[str, dict[str, float]] = field(default_factory=dict)  # site -> its time-* stamps
    durations: dict[str, float] = field(default_factory=dict)  # aggregate, held-out evaluation, ...

    def timed(self, name: str, started: float) -> None:
        """Add the seconds since ``started`` to ``durations[name]``."""
        self.durations[name] = self.durations.get(name, 0.0) + (time.time() - started)

    def sites(self) -> dict[str, dict[str, float]]:
        return {site: site_segments(self.sent, self.received[site], self.stamps.get(site, {}))
                for site in self.received if _finite(self.sent)}


def round_table(clock: RoundClock, ended: float) -> dict[str, Any]:
    """One row: the critical (last-replying) site's segments, the wait after it for sites that did
    not reply (until the round's deadline), plus the coordinator's work; the
    columns of ``columns`` sum to ``seconds`` (``unaccounted`` is the remainder: bookkeeping,
    audit and metrics writes, and anything not timed)."""
    sites = clock.sites()
    critical = max(clock.received, key=clock.received.get) if sites else None
    cols: dict[str, float] = {name: 0.0 for name in TABLE_COLUMNS}
    if critical is not None:
        cols["configure"] = clock.sent - clock.started
        cols.update(sites[critical])
    if _finite(clock.collected) and _finite(clock.sent):  # after the last reply, until the deadline
        last = clock.received[critical] if critical is not None else clock.sent
        cols["configure"] = clock.sent - clock.started
        cols["wait for missing sites"] = max(0.0, clock.collected - last)
    for name in ("aggregate", "site evaluate message", "held-out evaluation", "checkpoint"):
        cols[name] = clock.durations.get(name, 0.0)
    seconds = ended - clock.started
    cols["unaccounted"] = seconds - sum(v for k, v in cols.items() if k != "unaccounted")
    return {"seconds": seconds, "critical_site": critical, "columns": cols, "sites": sites}
