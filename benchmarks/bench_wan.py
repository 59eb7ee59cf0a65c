"""Rounds over shaped hospital links (issue 21): round time against the link's physical floor,
request -> answer turns per round, and a site cut mid-upload for longer than the deadline.

Runs the README's demo federation (real flwr-server and tdamil-client processes) inside a private
network namespace, each site behind its own shaped loopback line (tests/wan_harness.py: a relay
for delay, htb for rate, cls_bpf for loss, relay pauses for cuts). Needs root (``ip netns``).

    sudo .venv/bin/python benchmarks/bench_wan.py --scenario plain --rounds 3
    sudo .venv/bin/python benchmarks/bench_wan.py --scenario wan80 --rounds 3
    sudo .venv/bin/python benchmarks/bench_wan.py --scenario wan80 --dim 512 --depth 2 --rounds 2
    sudo .venv/bin/python benchmarks/bench_wan.py --scenario wan80 --dim 512 --depth 2 --rounds 2 --codec fp16-delta
    sudo .venv/bin/python benchmarks/bench_wan.py --scenario cut --reps 3

Each run appends one JSON line to ``--out`` (default benchmarks/results/wan.jsonl) and prints a
summary. The physical floor of a round is what the slowest site must spend at its line's rate:
the global model down and its update up (``payload_bytes * 8 / rate``), plus one RTT each way,
plus the site's own compute (open data, build model, evaluate, train, serialise: from the round
timeline) and the coordinator's aggregation and held-out evaluation; the last round adds its
site-evaluation message (its model bytes, from the audit's ``evaluate_sent``, down, and one RTT
each way). ``--insecure`` runs name every request on a line (``to_site_split`` /
``to_coordinator_split``: a message's own requests apart from idle polls, heartbeats and the run's
set-up); ``--keep DIR`` keeps each run's logs and audit.
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from wan_harness import LinkSpec, Wan, namespaces_allowed  # noqa: E402

from tdamil.federation.processes import ManagedProcess, flower_env  # noqa: E402
from tdamil.net import free_port  # noqa: E402

SCENARIOS = {
    "plain": LinkSpec(),
    "wan80": LinkSpec(rtt_ms=80, rate_mbit=20, loss=0.005),
    "wan400": LinkSpec(rtt_ms=400, rate_mbit=5, loss=0.03),
    "cut": LinkSpec(rtt_ms=80, rate_mbit=20, loss=0.005),
}
COMPUTE = ("open data", "build model", "evaluate global", "train", "evaluate local", "serialise reply")


def _events(out: Path) -> list[dict]:
    path = out / "audit.jsonl"
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines() if path.exists() else []:
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return rows


def _at(e: dict) -> float:
    return datetime.fromisoformat(e["time"]).timestamp()


def run_once(args: argparse.Namespace, spec: LinkSpec, work: Path) -> dict:
    from tdamil.federation.demo import write_demo_federation  # noqa: PLC0415

    fleet, internal = free_port(), free_port()
    sites = [f"site_{c}" for c in "abcdefgh"[: args.sites]]
    fed = {"rounds": args.rounds, "min_sites": args.sites, "min_replies": max(1, args.sites - 1),
           "round_timeout_s": args.deadline, "wait_for_sites_s": 300, "update_codec": args.codec}
    paths = write_demo_federation(work, num_sites=args.sites, train_bags=8, val_bags=4, test_bags=4, heldout_bags=10,
                                  model={"name": "tdamil", "dim": args.dim, "depth": args.depth, "num_heads": 2},
                                  federation=fed, superlink=f"127.0.0.1:{fleet}", internal_port=internal,
                                  runtime_ports=[free_port() for _ in sites], secure=not args.insecure)
    wan = Wan(work / "wan")
    procs: list[ManagedProcess] = []
    result: dict = {"scenario": args.scenario, "link": vars(spec), "dim": args.dim, "depth": args.depth,
                    "sites": args.sites, "rounds": args.rounds, "deadline_s": args.deadline, "tls": not args.insecure,
                    "update_codec": args.codec}
    try:
        links = {}
        for site in sites:
            links[site] = wan.link(site, free_port(), fleet, spec)
            cfg = yaml.safe_load(paths[site].read_text())
            cfg["federation"]["superlink"] = f"127.0.0.1:{links[site].port}"
            paths[site].write_text(yaml.safe_dump(cfg, sort_keys=False))
        env = flower_env(threads=1)
        py = sys.executable
        tls = ["--insecure"] if args.insecure else []
        procs.append(ManagedProcess("flwr-server", [*wan.exec_prefix, py, "-m", "tdamil.server.coordinator",
                                                    "--config", str(paths["server"]), *tls], work / "server.log",
                                    env=env))
        for site in sites:
            procs.append(ManagedProcess(site, [*wan.exec_prefix, py, "-m", "tdamil.client.site", "--config",
                                               str(paths[site]), *tls, "--state-dir", str(work / "state" / site)],
                                        work / f"{site}.log", env=env))
        out = work / "run"
        armed = False
        limit = time.monotonic() + args.max_seconds
        while procs[0].poll() is None and time.monotonic() < limit:
            ev = _events(out)
            started = {e["round"] for e in ev if e["event"] == "round_started"}
            if args.scenario == "cut" and not armed and 2 in started:
                links[sites[-1]].cut_after_upload(64 * 1024, args.cut_seconds)
                armed = True
            time.sleep(0.2)
        result["rc"] = procs[0].poll()
        ev = _events(out)
        result["rounds_detail"] = _rounds(ev, spec, {s: links[s].turns() for s in sites})
        if args.scenario == "cut":
            result["cut"] = _cut_outcome(ev, sites[-1], links[sites[-1]].status(), args.deadline)
    finally:
        for proc in reversed(procs):
            proc.stop(grace=5)
        wan.close()
    return result


# What a Flower 1.42 SuperNode's requests are for (the last segment of the Fleet API path).
MESSAGE_DOWN = ("pull-object", "confirm-message-received")  # plus the one pull-messages that delivers it
MESSAGE_UP = ("push-messages", "push-object")
RUN_SETUP = ("get-run", "get-fab")  # once per run, with its first message


def _kinds(turns: list[tuple[float, str]], start: float, end: float) -> dict[str, int]:
    """Turns in [start, end] by the last segment of their request path ("-" where it is unknown: TLS)."""
    return dict(collections.Counter(path.rstrip("/").rsplit("/", 1)[-1] for t, path in turns if start <= t <= end))


def _message_turns(kinds: dict[str, int]) -> dict[str, int] | None:
    """Split a window's turns into the message's own requests and the rest (plaintext lines only)."""
    if not kinds or "-" in kinds:
        return None
    down = sum(kinds.get(k, 0) for k in MESSAGE_DOWN) + min(kinds.get("pull-messages", 0), 1)
    up = sum(kinds.get(k, 0) for k in MESSAGE_UP)
    return {"message_down": down, "message_up": up, "idle_polls": max(kinds.get("pull-messages", 0) - 1, 0),
            "heartbeats": kinds.get("send-node-heartbeat", 0), "run_setup": sum(kinds.get(k, 0) for k in RUN_SETUP)}


def _rounds(ev: list[dict], spec: LinkSpec, lines: dict[str, list[tuple[float, str]]]) -> list[dict]:
    """Per round: seconds against the floor, and per site the turns its train message took each
    way: to the site (sent -> the handler has the message) and back (reply built -> received),
    and on plaintext lines which requests they were."""
    rows = []
    for fin in (e for e in ev if e["event"] == "round_finished"):
        rnd = fin["round"]
        start = next((e for e in ev if e["event"] == "round_started" and e["round"] == rnd), None)
        timeline = next((e for e in ev if e["event"] == "round_timeline" and e["round"] == rnd), {})
        cols = timeline.get("columns", {})
        replies = {e["site"]: e for e in ev if e["event"] == "reply" and e["round"] == rnd and e["phase"] == "train"}
        model_bytes = start.get("global_model_bytes", 0) if start else 0
        up = max([r["payload_bytes"] for r in replies.values()] or [0])
        compute = max([sum(float(seg.get(k, 0) or 0) for k in COMPUTE) for seg in timeline.get("sites", {}).values()]
                      or [0.0])
        coord = sum(float(cols.get(k, 0) or 0) for k in ("aggregate", "held-out evaluation", "checkpoint"))
        transfer = (model_bytes + up) * 8 / (spec.rate_mbit * 1e6) if spec.rate_mbit else 0.0
        floor = transfer + 2 * spec.rtt_ms / 1000 + compute + coord
        # the last round's site-evaluation message: its model (an xor difference) down, one RTT each way
        sent_eval = next((e for e in ev if e["event"] == "evaluate_sent" and e["round"] == rnd), None)
        eval_bytes = max(sent_eval["model_bytes"] or [0]) if sent_eval else 0
        eval_floor = (eval_bytes * 8 / (spec.rate_mbit * 1e6) if spec.rate_mbit else 0.0) + 2 * spec.rtt_ms / 1000 \
            if sent_eval else 0.0
        floor += eval_floor
        turns = {}
        sent = _at(start) if start else None
        for site, reply in replies.items():
            m, seg = reply["metrics"], timeline.get("sites", {}).get(site, {})
            if sent is None or "time-handler-start" not in m or not seg:
                continue
            built = float(m["time-reply-built"])
            arrived = built + float(seg.get("push + poll", 0))
            line = lines.get(site, [])
            to_site, back = _kinds(line, sent, float(m["time-handler-start"])), _kinds(line, built, arrived)
            turns[site] = {"to_site": sum(to_site.values()), "to_coordinator": sum(back.values()),
                           "to_site_requests": to_site, "to_coordinator_requests": back,
                           "to_site_split": _message_turns(to_site), "to_coordinator_split": _message_turns(back),
                           "flower_to_handler_s": round(float(seg.get("flower -> handler", 0)), 2),
                           "push_poll_s": round(float(seg.get("push + poll", 0)), 2)}
        rows.append({"round": rnd, "seconds": round(fin["seconds"], 2), "ok": fin["ok"],
                     "model_bytes": model_bytes, "reply_bytes": up, "transfer_floor_s": round(transfer, 2),
                     "compute_s": round(compute, 2), "coordinator_s": round(coord, 2),
                     "evaluate_message_bytes": eval_bytes, "evaluate_floor_s": round(eval_floor, 2),
                     "evaluate_message_s": round(float(cols.get("site evaluate message", 0) or 0), 2),
                     "floor_s": round(floor, 2),
                     "x_floor": round(fin["seconds"] / floor, 2) if floor > 0 else None, "turns": turns})
    return rows


def _cut_outcome(ev: list[dict], cut_site: str, status: dict, deadline: float) -> dict:
    start = next((_at(e) for e in ev if e["event"] == "round_started" and e["round"] == 2), None)
    agg = next((e for e in ev if e["event"] == "aggregated" and e["round"] == 2), None)
    named = [e["reason"] for e in ev if e["event"] == "failure" and e["round"] == 2 and e.get("site") == cut_site]
    late = [e["reason"] for e in ev if e["event"] == "failure" and e["reason"].startswith("late reply refused")]
    cut_at = status["cuts"][0][0] - start if status.get("cuts") and start else None
    return {"cut_started_s_into_round": round(cut_at, 1) if cut_at is not None else None,
            "aggregated_sites": agg["sites"] if agg else [],
            "aggregated_s_into_round": round(_at(agg) - start, 1) if agg and start else None,
            "by_deadline": bool(agg and start and _at(agg) - start <= deadline + 5),
            "cut_site_named": named, "late_refused": late,
            "finished": any(e["event"] == "run_finished" for e in ev)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scenario", choices=sorted(SCENARIOS), default="wan80")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--reps", type=int, default=1)
    ap.add_argument("--sites", type=int, default=2)
    ap.add_argument("--dim", type=int, default=32)
    ap.add_argument("--depth", type=int, default=1)
    ap.add_argument("--deadline", type=float, default=120.0, help="federation.round_timeout_s")
    ap.add_argument("--cut-seconds", type=float, default=90.0)
    ap.add_argument("--codec", default="fp32", choices=("fp32", "fp16", "fp16-delta"),
                    help="federation.update_codec (how sites send their model)")
    ap.add_argument("--insecure", action="store_true", help="plaintext (default: TLS and registered keys)")
    ap.add_argument("--max-seconds", type=float, default=900.0)
    ap.add_argument("--keep", type=Path, default=None, help="keep each run's folder (logs, audit) under this folder")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "wan.jsonl")
    args = ap.parse_args(argv)
    reason = namespaces_allowed()
    if reason is not None:
        print(f"cannot run: {reason}", file=sys.stderr)
        return 2
    if args.scenario == "cut" and args.rounds < 2:
        args.rounds = 2
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for rep in range(args.reps):
        if args.keep is not None:  # logs, audit and timeline of every run kept for reading
            work = args.keep / f"{args.scenario}-rep{rep}-{datetime.now():%H%M%S}"
            work.mkdir(parents=True)
            res = run_once(args, SCENARIOS[args.scenario], work)
        else:
            with tempfile.TemporaryDirectory(prefix="tdwan-") as tmp:
                res = run_once(args, SCENARIOS[args.scenario], Path(tmp))
        res["rep"] = rep
        with open(args.out, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(res) + "\n")
        print(json.dumps({k: v for k, v in res.items() if k != "link"}, indent=None))
    return 0


if __name__ == "__main__":
    sys.exit(main())
