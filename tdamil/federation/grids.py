"""Grids for the round loop.

* :class:`PatientGrid` wraps any Grid so that waiting never lasts forever. Flower 1.42's
  strategies poll ``get_node_ids()`` in an endless loop until enough sites are connected; after
  ``wait_timeout`` seconds without enough sites this wrapper raises :class:`SitesUnavailableError`,
  and while it waits it names the sites it waits for (``known_sites``, from the round loop).
  ``send_and_receive`` collects replies until the time left in the round runs out (the round loop
  passes what is left of ``federation.round_timeout_s``); each reply is pulled on its own, so one
  site's stalled upload never holds back another's, and a reply that comes after its round's
  deadline is handed to :meth:`PatientGrid.late_replies`, never to a later round. Replies are pulled
  every ``poll_interval`` seconds (Flower's grid sleeps 3 s between pulls, 1.5 s lost per message
  on average) and stamped when they arrived (``received_at``).
* :class:`InProcessGrid` runs a ClientApp for every simulated site inside this process (the fast
  simulation engine). It implements Flower's public ``Grid`` interface; message ids and the run id
  are set the way Flower's own in-memory grid sets them (``Metadata.__dict__``), which is why the
  project pins ``flwr==1.42.*`` and tests this class.
"""

from __future__ import annotations

import logging
import math
import threading
import time
import traceback
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from uuid import uuid4

from flwr.app import Context, Message, RecordDict
from flwr.app.error import Error
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

from tdamil.federation.records import METRICS
from tdamil.federation.timeline import STAMP_REPLY_BUILT

logger = logging.getLogger(__name__)

__all__ = ["PatientGrid", "InProcessGrid", "SitesUnavailableError", "LateReply"]

_CLIENT_APP_RAISED_EXCEPTION = 2  # flwr.common.constant.ErrorCode.CLIENT_APP_RAISED_EXCEPTION
_MESSAGE_UNAVAILABLE = 3  # flwr.common.constant.ErrorCode.MESSAGE_UNAVAILABLE
LATE_WINDOW_S = 600.0  # a reply is still pulled this long (at least the round timeout) after its deadline
PROGRESS_S = 15.0  # while replies are outstanding, one line naming the sites waited for and the time left


def _mb(nbytes: float) -> str:
    return f"{nbytes / 1e6:.1f} MB"


def reply_transfer(reply: Message, received: float) -> tuple[int, float | None]:
    """A reply's bytes (its arrays) and, where it carries the site's "reply built" stamp, the
    seconds from that stamp to ``received`` (the upload, on the site's clock: NTP keeps it close)."""
    try:
        nbytes = sum(int(rec.count_bytes()) for rec in reply.content.array_records.values())
        metrics = reply.content.metric_records
        built = float(metrics[METRICS][STAMP_REPLY_BUILT]) if METRICS in metrics else math.nan
    except Exception:  # noqa: BLE001 - an error reply or a malformed one: the intake names it
        return 0, None
    upload = received - built
    return nbytes, upload if math.isfinite(upload) and 0 < upload < 86400 else None


@dataclass
class LateReply:
    """A reply that arrived ``seconds_late`` after the deadline of the round and phase it answers
    (``node_id``: the site the instruction went to)."""

    round: int
    phase: str
    node_id: int
    reply: Message
    seconds_late: float


class SitesUnavailableError(RuntimeError):
    """Fewer sites than ``min_sites`` stayed connected for longer than the wait timeout."""


class PatientGrid(Grid):
    """Delegate to ``inner`` but stop waiting for sites after ``wait_timeout`` seconds, and for
    replies at the round's deadline (see the module docstring)."""

    def __init__(self, inner: Grid, min_nodes: int, wait_timeout: float,
                 clock: Callable[[], float] = time.monotonic, poll_interval: float = 0.1) -> None:
        self.inner = inner
        self.poll_interval = float(poll_interval)
        self.received_at: dict[str, float] = {}  # instruction message id -> reply arrival (time.time())
        self.min_nodes = int(min_nodes)
        self.wait_timeout = float(wait_timeout)
        # node id -> (site, how the coordinator knows it), set by the round loop: names the missing sites
        self.known_sites: Callable[[], dict[int, tuple[str, str]]] = dict
        self._clock = clock
        self._short_since: float | None = None
        self._last_log = 0.0
        self._lock = threading.Condition()
        self._late: list[LateReply] = []
        self._orphans: dict[str, tuple[int, str, int, float]] = {}  # id -> (round, phase, node, deadline passed)
        self._sent_at = time.time()  # when the current phase's messages were pushed

    def set_run(self, run: Run) -> None:
        self.inner.set_run(run)

    @property
    def run(self) -> Run:
        return self.inner.run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str,
                       ttl: float | None = None) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def _site(self, node: int) -> str:
        return self.known_sites().get(node, (f"node {node}", ""))[0]

    def _missing_sites(self, nodes: list[int]) -> str:
        """'site_b (registered), node 42 (took part in round 1)' for the known sites not connected."""
        known = self.known_sites()
        missing = [f"{site} ({how})" for nid, (site, how) in sorted(known.items(), key=lambda kv: kv[1])
                   if nid not in nodes]
        return ", ".join(missing)

    def get_node_ids(self) -> Iterable[int]:
        nodes = list(self.inner.get_node_ids())
        if len(nodes) >= self.min_nodes:
            self._short_since = None
            return nodes
        now = self._clock()
        if self._short_since is None:
            self._short_since = now
        waited = now - self._short_since
        missing = self._missing_sites(nodes)
        waiting_for = f"waiting for {missing}, " if missing else "waiting for sites, "
        if waited > self.wait_timeout:
            self._short_since = None
            raise SitesUnavailableError(
                f"{waiting_for}{len(nodes)} of {self.min_nodes} required connected (federation.min_sites); "
                f"waited {self.wait_timeout:.0f} s (federation.wait_for_sites_s). Start the missing sites "
                f"with `tdamil-client --site <name>` or lower min_sites."
            )
        if now - self._last_log > 10:
            self._last_log = now
            logger.info("%s%d of %d required connected (%.0f s left, federation.wait_for_sites_s).",
                        waiting_for[0].upper() + waiting_for[1:], len(nodes), self.min_nodes,
                        self.wait_timeout - waited)
        return nodes

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self.inner.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self.inner.pull_messages(message_ids)

    def late_replies(self) -> list[LateReply]:
        """Replies that arrived after their round's deadline (each only once): never to be used."""
        with self._lock:
            late, self._late = self._late, []
        return late

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None,
                         round_phase: tuple[int, str] = (0, ""), deadline_note: str = "") -> Iterable[Message]:
        """Push, then collect the replies until every one is in or ``timeout`` seconds passed (the
        time left in the round). A message without a reply by then gets an error reply naming the
        deadline (``deadline_note``), which the reply intake audits under the site's name.

        Each reply of a remote grid is pulled by its own thread: Flower hands a reply to the
        ServerApp as soon as the site *starts* uploading it, and its ``pull_messages`` then waits
        for every object of the reply, up to the site's push session (180 s) or longer. Pulled
        together, one stalled upload held back the replies of every other site. A reply still
        arriving at the deadline is kept from this round; when it comes it is handed to
        :meth:`late_replies` with its ``round_phase``, never to a later round."""
        messages = list(messages)
        self._sent_at = time.time()
        ids = [str(i) for i in self.push_messages(messages) if i]
        sent = {m.metadata.message_id: m for m in messages if m.metadata.message_id}
        deadline = time.monotonic() + (timeout if timeout is not None else 0.0)
        if getattr(self.inner, "runs_sites_here", False):  # its pull runs the sites' apps: one at a time
            replies = self._pull_in_turn(ids, deadline, timeout is None)
        else:
            nodes = {mid: int(sent[mid].metadata.dst_node_id) for mid in ids if mid in sent}
            replies = self._pull_in_parallel(ids, deadline, timeout, round_phase, nodes)
        answered = {r.metadata.reply_to_message_id for r in replies}
        for mid in ids:
            if mid not in answered and mid in sent:
                replies.append(self._deadline_reply(sent[mid], deadline_note))
        return replies

    def _arrived(self, reply: Message) -> None:
        self.received_at[reply.metadata.reply_to_message_id] = time.time()

    def _pull_in_turn(self, ids: list[str], deadline: float, forever: bool) -> list[Message]:
        pending, replies = set(ids), []
        while pending:
            for reply in self.pull_messages(pending):
                self._arrived(reply)
                pending.discard(reply.metadata.reply_to_message_id)
                replies.append(reply)
            if not pending or (not forever and time.monotonic() >= deadline):
                break
            time.sleep(self.poll_interval)
        return replies

    def _pull_in_parallel(self, ids: list[str], deadline: float, timeout: float | None,
                          round_phase: tuple[int, str], nodes: dict[str, int]) -> list[Message]:
        got: dict[str, Message] = {}
        label = f"Round {round_phase[0]} {round_phase[1]}".strip()
        for mid in ids:
            threading.Thread(target=self._pull_one, args=(mid, got, deadline, timeout, label, nodes.get(mid, 0)),
                             name=f"pull-{mid[:8]}", daemon=True).start()
        with self._lock:
            next_line = time.monotonic() + PROGRESS_S
            while len(got) < len(ids):
                left = deadline - time.monotonic()
                if timeout is not None and left <= 0:
                    break
                if time.monotonic() >= next_line:  # what an operator watching the round wants to know
                    next_line = time.monotonic() + PROGRESS_S
                    waiting = sorted(self._site(nodes.get(mid, 0)) for mid in ids if mid not in got)
                    until = "" if timeout is None else f"; {left:.0f} s to the round's deadline"
                    logger.info("%s: %d of %d replies in; waiting for %s%s.", label, len(got), len(ids),
                                ", ".join(waiting), until)
                wait = PROGRESS_S if timeout is None else min(left, PROGRESS_S)
                self._lock.wait(max(min(wait, next_line - time.monotonic()), 0.01))
            replies = [got[mid] for mid in ids if mid in got]
            for mid in ids:
                if mid not in got:  # from now on its reply is late: the puller hands it to late_replies
                    self._orphans[mid] = (*round_phase, nodes.get(mid, 0), time.time())
            got.clear()
        return replies

    def _pull_one(self, mid: str, got: dict[str, Message], deadline: float, timeout: float | None,
                  label: str = "", node: int = 0) -> None:
        """Pull one message's reply until it arrives, or until ``late_window`` after the deadline
        (a late reply is still pulled, so that it is audited and leaves the SuperLink)."""
        stop = deadline + (max(LATE_WINDOW_S, timeout) if timeout is not None else 0.0)
        warned = -math.inf
        while timeout is None or time.monotonic() < stop:
            try:
                replies = list(self.pull_messages([mid]))
            except Exception as exc:  # noqa: BLE001 - one site's pull must never end the round
                if time.monotonic() - warned > 30:
                    warned = time.monotonic()
                    logger.warning("Pulling the reply to %s failed (%s); trying again.", mid[:8], exc)
                replies = []
            with self._lock:
                for reply in replies:
                    if mid in self._orphans:
                        rnd, phase, node, ended = self._orphans.pop(mid)
                        self._late.append(LateReply(rnd, phase, node, reply, time.time() - ended))
                    else:
                        self._arrived(reply)
                        got[mid] = reply
                        self._log_arrival(reply, label, node, deadline if timeout is not None else None)
                    self._lock.notify_all()
                if replies:
                    return
            time.sleep(self.poll_interval if time.monotonic() < deadline else max(self.poll_interval, 1.0))
        with self._lock:
            self._orphans.pop(mid, None)

    def _log_arrival(self, reply: Message, label: str, node: int, deadline: float | None) -> None:
        """One line per reply: size, when it came, the upload's rate, the time left in the round."""
        now = time.time()
        nbytes, upload = reply_transfer(reply, now)
        if not nbytes:
            return
        rate = f", uploaded in {upload:.1f} s (~{nbytes * 8 / upload / 1e6:.1f} Mbit/s)" if upload else ""
        left = "" if deadline is None else f"; {max(deadline - time.monotonic(), 0.0):.0f} s to the round's deadline"
        logger.info("%s: reply from %s in: %s, %.1f s after the instruction was sent%s%s.", label, self._site(node),
                    _mb(nbytes), now - self._sent_at, rate, left)

    @staticmethod
    def _deadline_reply(msg: Message, note: str) -> Message:
        reason = note or "no reply before the deadline"
        return Message(Error(code=_MESSAGE_UNAVAILABLE, reason=reason), reply_to=msg)


class InProcessGrid(Grid):
    """Run ``client_app`` for each simulated node in this process, one message at a time.

    ``node_configs`` maps node id -> node config (what ``--node-config`` gives a SuperNode, e.g.
    ``{"site": "site_a"}``). A ClientApp exception becomes an error reply, as on a real SuperNode.
    ``on_message`` (optional) sees every (instruction, reply) pair: tests use it to inspect what
    sites send.
    """

    runs_sites_here = True  # pulling a reply runs the site's app in the pulling thread

    def __init__(self, client_app: ClientApp, node_configs: dict[int, dict], run_config: dict | None = None,
                 run_id: int = 1,
                 on_message: Callable[[Message, Message], None] | None = None) -> None:
        self.client_app = client_app
        self._run = Run.create_empty(run_id)
        self._contexts = {
            int(nid): Context(run_id=run_id, node_id=int(nid), node_config=dict(cfg), state=RecordDict(),
                              run_config=dict(run_config or {}))
            for nid, cfg in node_configs.items()
        }
        self._pending: dict[str, Message] = {}
        self._replies: dict[str, Message] = {}
        self.on_message = on_message
        self._claim_identity()

    def _claim_identity(self) -> None:
        # Flower 1.42 stamps new messages with the process's TaskIdentity (set by flwr-serverapp in a
        # deployment); in-process we are the ServerApp task, as in Flower's own compat layer.
        TaskIdentity.task_id = 1
        TaskIdentity.run_id = self._run.run_id
        TaskIdentity.node_id = SUPERLINK_NODE_ID

    def set_run(self, run: Run) -> None:
        self._run = run
        self._claim_identity()

    @property
    def run(self) -> Run:
        return self._run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str,
                       ttl: float | None = None) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return list(self._contexts)

    @property
    def site_names(self) -> dict[int, str]:
        """node id -> site name (from the node configs)."""
        return {nid: str(ctx.node_config.get("site", f"node-{nid}")) for nid, ctx in self._contexts.items()}

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for msg in messages:
            if msg.metadata.dst_node_id not in self._contexts:
                raise ValueError(f"Unknown node id {msg.metadata.dst_node_id}")
            msg_id = str(uuid4())
            msg.metadata.__dict__["_message_id"] = msg_id
            msg.metadata.__dict__["_run_id"] = self._run.run_id
            msg.metadata.__dict__["_src_node_id"] = SUPERLINK_NODE_ID
            self._pending[msg_id] = msg
            ids.append(msg_id)
        return ids

    def _execute(self, msg: Message) -> Message:
        context = self._contexts[msg.metadata.dst_node_id]
        try:
            reply = self.client_app(msg, context)
        except Exception as exc:  # noqa: BLE001 - a site failing must not stop the federation
            logger.error("Simulated site (node %s) raised: %s", msg.metadata.dst_node_id, exc)
            logger.debug("%s", traceback.format_exc())
            reason = f"{type(exc)}:<'{exc}'>"
            reply = Message(Error(code=_CLIENT_APP_RAISED_EXCEPTION, reason=reason), reply_to=msg)
        if self.on_message is not None:
            self.on_message(msg, reply)
        return reply

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        out = []
        for msg_id in list(message_ids):
            if msg_id in self._pending:
                self._replies[msg_id] = self._execute(self._pending.pop(msg_id))
            if msg_id in self._replies:
                out.append(self._replies.pop(msg_id))
        return out

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        return self.pull_messages(self.push_messages(messages))
