"""End-to-end: real Flower processes on 127.0.0.1 (free ports, bounded waits, always stopped).

One scenario with a coordinator (``flwr-server``: SuperLink + fleet gateway + ``flwr run``) and two
sites (``tdamil-client``: SuperNodes) on digits bags written as h5 feature caches:

1. round 1 runs with both sites and writes a checkpoint that differs from the initial model;
2. the coordinator is killed (SIGKILL) and restarted with ``--resume``: it continues at round 2;
3. site_b is killed in the middle of round 2: the round completes with site_a (min_sites = 1)
   and the failure is in the audit log; the round-2 model differs from the round-1 model;
4. after the run, the surviving site says "run finished; waiting for the next run" once, not ERROR.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time

import pytest
import torch

from tdamil.federation.processes import ManagedProcess, flower_env
from tdamil.net import free_port
from federation_processes import audit_events, stop_all, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


def test_real_processes_resume_and_a_site_dying_mid_round(tmp_path):
    from tdamil.checkpoint import load_checkpoint
    from tdamil.federation.demo import write_demo_federation
    from tdamil.federation.task import ModelSpec, build_model

    fleet, internal = free_port(), free_port()
    ports = [free_port(), free_port()]
    paths = write_demo_federation(
        tmp_path, num_sites=2, train_bags=8, val_bags=4, test_bags=4, heldout_bags=10,
        model={"name": "tdamil", "dim": 16, "depth": 1, "num_heads": 2},
        # round 1 ends at its deadline (site_b's death is noticed there, before Flower's 60 s heartbeat
        # patience): 30 s, 2x what site_a's round takes with the machine loaded 6x over
        federation={"rounds": 2, "min_sites": 2, "min_replies": 1, "round_timeout_s": 30, "wait_for_sites_s": 120,
                    "evaluate_sites": False},
        superlink=f"127.0.0.1:{fleet}", internal_port=internal, runtime_ports=ports, secure=False)
    out = tmp_path / "run"
    env = flower_env(threads=1)
    py = sys.executable

    def coordinator(*extra: str) -> ManagedProcess:
        return ManagedProcess("flwr-server", [py, "-m", "tdamil.server.coordinator", "--config", str(paths["server"]),
                                              "--insecure", *extra], tmp_path / "logs" / f"server{extra}.log", env=env)

    def site(name: str) -> ManagedProcess:
        return ManagedProcess(name, [py, "-m", "tdamil.client.site", "--config", str(paths[name]), "--insecure",
                                     "--state-dir", str(tmp_path / "state" / name)],
                              tmp_path / "logs" / f"{name}.log", env=env)

    procs: list[ManagedProcess] = []
    try:
        server = coordinator()
        procs.append(server)
        site_a, site_b = site("site_a"), site("site_b")
        procs += [site_a, site_b]
        wait_for("round 1 to start with both sites",
                 lambda: any(e["event"] == "round_started" and len(e["sampled_nodes"]) == 2 for e in audit_events(out)),
                 300, procs)
        time.sleep(1.0)
        site_b.kill()  # site_b dies in the middle of round 1
        wait_for("round 1 checkpoint", lambda: (out / "checkpoints" / "round_0001.pt").exists(), 300, procs)
        ev = audit_events(out)
        r1 = [e for e in ev if e["event"] == "aggregated" and e["round"] == 1]
        assert r1 and r1[0]["sites"] == ["site_a"] and r1[0]["weights"] == {"site_a": 8}  # weight = train slides
        assert any(e["event"] == "failure" and e["round"] == 1 and e["phase"] == "train" for e in ev)

        server.kill()  # the coordinator crashes; its SuperLink and gateway go down with it
        wait_for("the coordinator's ports to be free", lambda: _port_free(fleet) and _port_free(internal), 60, procs)
        assert site_a.poll() is None  # the surviving site keeps (re)connecting
        text = paths["server"].read_text().replace("min_sites: 2", "min_sites: 1")
        paths["server"].write_text(text)
        resumed = coordinator("--resume")
        procs.append(resumed)
        wait_for("the resumed run to finish", lambda: resumed.poll() is not None, 400, procs)
        assert resumed.poll() == 0, resumed.tail(40)

        ev = audit_events(out)
        assert [e["next_round"] for e in ev if e["event"] == "resumed"] == [2]
        started = [e["round"] for e in ev if e["event"] == "round_started"]
        assert started.count(1) == 1 and started[-1] == 2  # round 1 is not redone after the restart
        r2 = [e for e in ev if e["event"] == "aggregated" and e["round"] == 2]
        assert r2 and r2[0]["sites"] == ["site_a"]
        assert ev[-1]["event"] == "run_finished" and ev[-1]["failed_rounds"] == []
        sent = [e for e in ev if e["event"] == "reply"]
        assert sent and all(e["payload_bytes"] > 0 and e["site"] in ("site_a", "site_b") for e in sent)

        ck1 = load_checkpoint(out / "checkpoints" / "round_0001.pt")
        ck2 = load_checkpoint(out / "checkpoints" / "round_0002.pt")
        assert ck2["round"] == 2 and load_checkpoint(out / "checkpoints" / "last.pt")["round"] == 2
        spec = ModelSpec.from_json(ck1["model_spec"])
        init = build_model(spec, seed=0).state_dict()
        for key in ("task_token", "channel_matrix"):
            k = next(k for k in init if key in k)
            assert not torch.equal(init[k], ck1["model_state"][k].to(init[k].dtype)), f"{k} unchanged by round 1"
        assert any(not torch.equal(ck1["model_state"][k], ck2["model_state"][k]) for k in init), "round 2 changed nothing"
        heldout = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        assert {r["round"] for r in heldout if r["phase"] == "heldout"} == {0, 1, 2}

        # the run is over: the surviving site says so in one line and waits for the next run, without
        # reporting the coordinator's closed port as an error
        from tdamil.federation.supernode import RUN_FINISHED_LINE
        site_log = tmp_path / "logs" / "site_a.log"
        wait_for("site_a to say the run finished", lambda: RUN_FINISHED_LINE in site_log.read_text(), 120, procs)
        time.sleep(3.0)  # a few more reconnection attempts
        after = site_log.read_text().split(RUN_FINISHED_LINE, 1)[1]
        assert site_a.poll() is None and " ERROR " not in after and "Connection refused" not in after, after[-2000:]

        # warm start (the default): site_a's ClientApps were forked from its pre-imported SuperExec, so no
        # round paid Python's start-up and the imports again (tdamil.client.warm_start). Measured against a
        # cold start of the same stack on this machine (a ratio, not a wall-clock limit): the first ClientApp
        # of the resumed run (a new Flower run) still pays Flower's per-run set-up, ~0.2 of a cold start here.
        assert "Warm start: the ClientApp stack is imported" in (tmp_path / "logs" / "site_a.log").read_text()
        timelines = [e["sites"]["site_a"] for e in ev if e["event"] == "round_timeline" and "site_a" in e["sites"]]
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-c", "import tdamil.client.client_app"], check=True, timeout=300)
        cold = time.perf_counter() - t0
        assert timelines and all(t["python + flower start"] + t["app imports"] < 0.5 * cold for t in timelines), (cold, timelines)
    finally:
        stop_all(procs)
