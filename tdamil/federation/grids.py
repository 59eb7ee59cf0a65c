"""Grids for the round loop.

* :class:`PatientGrid` wraps any Grid so that waiting for sites never lasts forever: Flower 1.42's
  strategies poll ``get_node_ids()`` in an endless loop until enough sites are connected; after
  ``wait_timeout`` seconds without enough sites this wrapper raises :class:`SitesUnavailableError`.
  It also pulls replies every ``poll_interval`` seconds (Flower's grid sleeps 3 s between pulls,
  1.5 s lost per message on average) and stamps when each reply arrived (``received_at``).
* :class:`InProcessGrid` runs a ClientApp for every simulated site inside this process (the fast
  simulation engine). It implements Flower's public ``Grid`` interface; message ids and the run id
  are set the way Flower's own in-memory grid sets them (``Metadata.__dict__``), which is why the
  project pins ``flwr==1.42.*`` and tests this class.
"""

from __future__ import annotations

import logging
import time
import traceback
from collections.abc import Callable, Iterable
from uuid import uuid4

from flwr.app import Context, Message, RecordDict
from flwr.app.error import Error
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

logger = logging.getLogger(__name__)

__all__ = ["PatientGrid", "InProcessGrid", "SitesUnavailableError"]

_CLIENT_APP_RAISED_EXCEPTION = 2  # flwr.common.constant.ErrorCode.CLIENT_APP_RAISED_EXCEPTION


class SitesUnavailableError(RuntimeError):
    """Fewer sites than ``min_sites`` stayed connected for longer than the wait timeout."""


class PatientGrid(Grid):
    """Delegate to ``inner`` but stop waiting for sites after ``wait_timeout`` seconds."""

    def __init__(self, inner: Grid, min_nodes: int, wait_timeout: float,
                 clock: Callable[[], float] = time.monotonic, poll_interval: float = 0.1) -> None:
        self.inner = inner
        self.poll_interval = float(poll_interval)
        self.received_at: dict[str, float] = {}  # instruction message id -> reply arrival (time.time())
        self.min_nodes = int(min_nodes)
        self.wait_timeout = float(wait_timeout)
        self._clock = clock
        self._short_since: float | None = None
        self._last_log = 0.0

    def set_run(self, run: Run) -> None:
        self.inner.set_run(run)

    @property
    def run(self) -> Run:
        return self.inner.run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str,
                       ttl: float | None = None) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        nodes = list(self.inner.get_node_ids())
        if len(nodes) >= self.min_nodes:
            self._short_since = None
            return nodes
        now = self._clock()
        if self._short_since is None:
            self._short_since = now
        waited = now - self._short_since
        if waited > self.wait_timeout:
            self._short_since = None
            raise SitesUnavailableError(
                f"Only {len(nodes)} site(s) connected, {self.min_nodes} required (federation.min_sites); "
                f"waited {self.wait_timeout:.0f} s (federation.wait_for_sites_s). Start the missing sites "
                f"with `tdamil-client --site <name>` or lower min_sites."
            )
        if now - self._last_log > 10:
            self._last_log = now
            logger.info("Waiting for sites: %d connected, %d required (%.0f s left).", len(nodes),
                        self.min_nodes, self.wait_timeout - waited)
        return nodes

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self.inner.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self.inner.pull_messages(message_ids)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        """Push, then pull every ``poll_interval`` s until every reply is in or ``timeout`` passed."""
        pending = set(self.push_messages(messages))
        deadline = time.monotonic() + (timeout if timeout is not None else 0.0)
        replies: list[Message] = []
        while pending:
            for reply in self.pull_messages(pending):
                self.received_at[reply.metadata.reply_to_message_id] = time.time()
                pending.discard(reply.metadata.reply_to_message_id)
                replies.append(reply)
            if not pending or (timeout is not None and time.monotonic() >= deadline):
                break
            time.sleep(self.poll_interval)
        return replies


class InProcessGrid(Grid):
    """Run ``client_app`` for each simulated node in this process, one message at a time.

    ``node_configs`` maps node id -> node config (what ``--node-config`` gives a SuperNode, e.g.
    ``{"site": "site_a"}``). A ClientApp exception becomes an error reply, as on a real SuperNode.
    ``on_message`` (optional) sees every (instruction, reply) pair: tests use it to inspect what
    sites send.
    """

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
