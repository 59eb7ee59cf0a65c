"""Where the sites' replies enter the coordinator: every one is checked before it is used.

:class:`ReplyIntake` takes one phase's replies and returns the ones fit to aggregate, in site order.
A reply is refused, with a ``failure`` audit line naming the site by its registered name and what
was wrong, when

* it is an error reply, or no reply came by the deadline;
* its node is not a registered site, or the reply claims another site's name (the name comes from
  the key the coordinator registered, ``site_nodes``, or from the simulation's node configs; a
  deployment without key registration believes the claimed names but refuses two nodes claiming
  one);
* its model is not packed as the run's wire format says (:mod:`tdamil.federation.wire`: one
  ``packed`` array of the global model's length in ``federation.update_codec``); it is unpacked
  here, before any other check, so every check below sees the model's named arrays;
* it breaks the message contract (:func:`~tdamil.federation.records.reply_problem`);
* the site runs software the run does not accept, or its features break the run's feature contract
  (the versions and contract its reply reports; the site checks both itself before it trains,
  this catches a site that skipped the check). Each site's versions and feature contract are
  audited once per run (``site_handshake``);
* (train, given the global model) its update is screened out (:mod:`tdamil.federation.screening`).

Only accepted replies reach the audit's ``reply`` lines, the per-site metrics history and the
round's timeline.
"""

from __future__ import annotations

import json
import time
from typing import Any

from flwr.app import ArrayRecord, Message

from tdamil.federation.audit import AuditLog
from tdamil.federation.config import FederationConfig
from tdamil.federation.history import MetricsHistory
from tdamil.federation.records import (
    SITE,
    SITE_FEATURES,
    SITE_VERSIONS,
    ReplyContract,
    error_text,
    is_stamp,
    payload_bytes,
    reply_metrics,
    reply_problem,
    reply_site,
)
from tdamil.federation.screening import screen_updates
from tdamil.federation.timeline import RoundClock
from tdamil.federation.wire import DIFFERENCE_CODECS, flatten, open_reply

__all__ = ["ReplyIntake"]


class ReplyIntake:
    """Checks, audits and records one run's replies (see the module docstring)."""

    def __init__(self, audit: AuditLog, history: MetricsHistory, fed: FederationConfig,
                 site_nodes: dict[int, str] | None = None, *, required_versions: dict[str, str] | None = None,
                 feature_contract: Any = None) -> None:
        self.required_versions = dict(required_versions or {})
        self.feature_contract = feature_contract  # tdamil.data.contract.FeatureContract or None
        self.handshakes: set[str] = set()  # sites whose versions and contract are audited in this run
        self.audit = audit
        self.history = history
        self.fed = fed
        self.site_nodes = {int(k): str(v) for k, v in (site_nodes or {}).items()}
        self.node_sites: dict[int, str] = {}  # names seen in accepted replies, for naming failed sites
        self.wire_bytes: dict[str, int] = {}  # reply id -> bytes as it travelled (packed), for the audit

    def registered(self, grid: Any) -> dict[int, str]:
        """node id -> site, from an authority the sites cannot influence: key registration, or the
        simulation's node configs."""
        if self.site_nodes:
            return self.site_nodes
        names = getattr(getattr(grid, "inner", grid), "site_names", None)
        return names if isinstance(names, dict) else {}

    def site_of(self, grid: Any, node_id: int) -> str | None:
        return self.registered(grid).get(node_id) or self.node_sites.get(node_id)

    def _identity_problem(self, grid: Any, node: int, claimed: str) -> str | None:
        registered = self.registered(grid)
        if node in registered and claimed != registered[node]:
            return f"the reply claims to be site {claimed!r}, but node {node} is registered as {registered[node]!r}"
        if registered and node not in registered:
            return f"node {node} is not a registered site"
        return None

    def _refuse(self, grid: Any, rnd: int, phase: str, reply: Message, why: str) -> None:
        node = int(reply.metadata.src_node_id)
        self.audit.failure(rnd, phase, why, site=self.site_of(grid, node) or reply_site(reply), node_id=node)

    def collect(self, grid: Any, rnd: int, phase: str, messages: list[Message], replies: list[Message],
                contract: ReplyContract, *, clock: RoundClock | None = None,
                global_arrays: ArrayRecord | None = None) -> list[Message]:
        """The replies fit to use, in site order; every other reply or missing reply is audited.
        ``clock`` (train phase) receives each site's arrival time and timeline stamps; with
        ``global_arrays`` the updates are screened against each other."""
        # an error reply for a site that died comes from the SuperLink itself (its own node id), so
        # the site is found through the message it answers
        sent_to = {m.metadata.message_id: m.metadata.dst_node_id for m in messages}
        base = (flatten(global_arrays, contract.arrays) if contract.codec in DIFFERENCE_CODECS
                and global_arrays is not None and contract.arrays else None)
        sound, self.wire_bytes = [], {}
        for reply in replies:
            if reply.has_error():
                node = sent_to.get(reply.metadata.reply_to_message_id, reply.metadata.src_node_id)
                self.audit.failure(rnd, phase, error_text(reply), site=self.site_of(grid, node), node_id=node)
                continue
            self.wire_bytes[reply.metadata.message_id] = payload_bytes(reply.content)
            problem = (self._identity_problem(grid, int(reply.metadata.src_node_id), reply_site(reply))
                       or self._unpack_problem(reply, contract, base)
                       or reply_problem(reply, contract) or self._handshake_problem(reply))
            if problem is not None:
                self._refuse(grid, rnd, phase, reply, f"reply refused: {problem}")
                continue
            sound.append(reply)
        sound = self._unique_names(grid, rnd, phase, sound)
        # in site order, not arrival order: float sums depend on their order, so a FedAvg over replies
        # in arrival order differed in the last bits from run to run and drifted apart over rounds
        sound.sort(key=lambda r: (reply_site(r), int(r.metadata.src_node_id)))
        if global_arrays is not None:
            sound, dropped = screen_updates(global_arrays, sound, self.fed.update_norm_factor,
                                            self.fed.update_min_cosine)
            for reply, reason in dropped:
                self._refuse(grid, rnd, phase, reply, f"update refused: {reason}")
        for reply in sound:
            self._record(rnd, phase, reply, getattr(grid, "received_at", {}), clock)
        answered = {r.metadata.reply_to_message_id for r in replies}
        for msg in messages:
            if msg.metadata.message_id and msg.metadata.message_id not in answered:
                self.audit.failure(rnd, phase, f"no reply within federation.round_timeout_s="
                                   f"{self.fed.round_timeout_s:.0f} s (site stopped or too slow)",
                                   site=self.site_of(grid, msg.metadata.dst_node_id),
                                   node_id=msg.metadata.dst_node_id)
        return sound

    @staticmethod
    def _unpack_problem(reply: Message, contract: ReplyContract, base: Any) -> str | None:
        if not contract.codec or contract.phase != "train" or not reply.has_content():
            return None
        problem = open_reply(reply, contract.arrays or {}, contract.codec, base)
        return None if problem is None else f"its model cannot be unpacked: {problem}"

    def _handshake_problem(self, reply: Message) -> str | None:
        """Why the site's reported software or features do not fit the run; audits them once."""
        from tdamil.federation.versions import check_versions  # noqa: PLC0415

        site, record = reply_site(reply), reply.content.config_records[SITE]
        try:
            versions = json.loads(str(record.get(SITE_VERSIONS, "") or "{}"))
            features = str(record.get(SITE_FEATURES, "") or "")
            features = "" if features == "{}" else features
            if not isinstance(versions, dict):
                raise ValueError("not an object")
        except ValueError as exc:
            return f"its versions record is not JSON ({exc})"
        problem = check_versions(versions, self.required_versions, site=site) if self.required_versions else None
        if problem is None and features and self.feature_contract is not None:
            from tdamil.data.contract import ContractError, FeatureContract  # noqa: PLC0415

            try:
                found = FeatureContract.from_json(features, source=f"site {site}'s features")
            except ContractError as exc:
                return str(exc)
            diff = self.feature_contract.differences(found)
            if diff:
                name, expected, got = diff[0]
                problem = f"site {site}'s features record {name} {got!r}, the run's contract requires {expected!r}"
        if site not in self.handshakes:
            self.handshakes.add(site)
            self.audit.write("site_handshake", site=site, node_id=int(reply.metadata.src_node_id), versions=versions,
                             extraction=json.loads(features) if features else None, accepted=problem is None,
                             problem=problem)
        return problem

    def _record(self, rnd: int, phase: str, reply: Message, arrived: dict[str, float],
                clock: RoundClock | None) -> None:
        site = reply_site(reply)
        self.node_sites[int(reply.metadata.src_node_id)] = site
        metrics = reply_metrics(reply)
        sent = self.wire_bytes.get(reply.metadata.message_id)
        self.audit.reply(rnd, phase, site, reply.metadata.src_node_id,
                         payload_bytes(reply.content) if sent is None else sent, metrics)
        if phase == "train":  # evaluate rows are written by the loop's site evaluation
            self.history.add(rnd, phase, site, {k: v for k, v in metrics.items()
                                                if not is_stamp(k) and not k.startswith("global-")})
        if clock is not None:
            clock.received[site] = arrived.get(reply.metadata.reply_to_message_id, time.time())
            clock.stamps[site] = {k: v for k, v in metrics.items() if is_stamp(k)}

    def _unique_names(self, grid: Any, rnd: int, phase: str, replies: list[Message]) -> list[Message]:
        """Without key registration two nodes may claim one site name: then neither can be believed."""
        counts: dict[str, int] = {}
        for reply in replies:
            counts[reply_site(reply)] = counts.get(reply_site(reply), 0) + 1
        kept = []
        for reply in replies:
            site = reply_site(reply)
            if counts[site] > 1:
                self._refuse(grid, rnd, phase, reply, f"reply refused: {counts[site]} nodes claim to be site {site!r} "
                             "(turn on auth.enabled so that each site's name comes from its registered key)")
            else:
                kept.append(reply)
        return kept
