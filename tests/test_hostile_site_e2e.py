"""A hostile site with real processes: flwr-server (TLS, registered site keys) and three
tdamil-client sites on 127.0.0.1, site_c running modified code.

site_c's processes start with a ``sitecustomize.py`` on their PYTHONPATH (as a hospital that
patched its installation would): its ClientApp skips the site's own reply check and, in round 1,
claims to be site_a; in round 2 it sends NaN weights and claims 1e9 training slides. The
coordinator must name every refusal by site_c's registered key, aggregate site_a and site_b in
both rounds, keep every checkpoint finite and finish the run.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml

from tdamil.net import free_port
from federation_processes import start_logged, stop_all

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
BIN = Path(sys.executable).parent

HOSTILE_CODE = textwrap.dedent('''
    # Loaded at start-up by every Python process of the hostile site (PYTHONPATH).
    import numpy as np

    def _patch():
        import tdamil.client.client_app as ca
        from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord

        def tampered(msg, content, rt):
            rnd = int(msg.content["config"].get("server-round", 0))
            site = dict(content["site"])
            if rnd == 1:
                site["name"] = "site_a"
            content["site"] = ConfigRecord(site)
            if rnd >= 2 and "arrays" in content:
                arrays = {k: a.numpy().copy() for k, a in content["arrays"].items()}
                first = next(k for k, v in arrays.items() if v.dtype.kind == "f")
                arrays[first][...] = np.nan
                content["arrays"] = ArrayRecord({k: Array(v) for k, v in arrays.items()})
                metrics = dict(content["metrics"])
                metrics["num-examples"] = 1_000_000_000
                content["metrics"] = MetricRecord(metrics)
            return Message(content, reply_to=msg)

        ca.checked_reply = tampered

    _patch()
''')


def test_a_hostile_registered_site_is_refused_by_its_key_and_the_run_finishes(tmp_path):
    from tdamil.federation.demo import write_demo_federation

    root = tmp_path
    public, internal = free_port(), free_port()
    paths = write_demo_federation(
        root / "demo", num_sites=3, train_bags=10, val_bags=4, test_bags=4, heldout_bags=20,
        model={"name": "tdamil", "dim": 16, "depth": 1, "num_heads": 2},
        superlink=f"127.0.0.1:{public}", internal_port=internal, runtime_ports=[free_port() for _ in range(3)],
        federation={"rounds": 2, "min_sites": 3, "min_replies": 2, "evaluate_sites": False,
                    "round_timeout_s": 200, "wait_for_sites_s": 200},
    )
    srv = yaml.safe_load(paths["server"].read_text())
    assert srv["auth"]["enabled"] is True and "tls" in srv  # the README's secure demo
    shim = root / "hostile"
    shim.mkdir()
    (shim / "sitecustomize.py").write_text(HOSTILE_CODE)
    procs = []
    try:
        server = start_logged([str(BIN / "flwr-server"), "--config", str(paths["server"])], root / "server.log", root)
        procs.append(server)
        for s in ("site_a", "site_b", "site_c"):
            env = {"PYTHONPATH": str(shim)} if s == "site_c" else None
            procs.append(start_logged([str(BIN / "tdamil-client"), "--config", str(paths[s]), "--state-dir",
                                 str(root / f"state_{s}")], root / f"{s}.log", root, env))
        try:
            rc = server.wait(timeout=400)
        except subprocess.TimeoutExpired:
            rc = None
        logs = {p: (root / f"{p}.log").read_text()[-3000:] for p in ("server", "site_c")}
        assert rc == 0, logs
    finally:
        stop_all(procs)
    out = root / "demo" / srv["output_dir"]
    events = [json.loads(x) for x in (out / "audit.jsonl").read_text().splitlines() if x.strip()]
    # the patch really ran at site_c (its reply claimed site_a) and was refused by the key, not the claim
    failures = [e for e in events if e["event"] == "failure"]
    by_round = {r: [e for e in failures if e["round"] == r] for r in (1, 2)}
    assert [e["site"] for e in by_round[1]] == ["site_c"], failures
    assert "claims to be site 'site_a'" in by_round[1][0]["reason"] and "registered as 'site_c'" in by_round[1][0]["reason"]
    assert [e["site"] for e in by_round[2]] == ["site_c"], failures
    assert "non-finite" in by_round[2][0]["reason"] or "num-examples" in by_round[2][0]["reason"], by_round[2]
    for rnd in (1, 2):
        (agg,) = [e for e in events if e["event"] == "aggregated" and e["round"] == rnd]
        assert agg["sites"] == ["site_a", "site_b"] and set(agg["weights"]) == {"site_a", "site_b"}
    assert [e["site"] for e in events if e["event"] == "reply"].count("site_c") == 0
    assert events[-1]["event"] == "run_finished" and events[-1]["failed_rounds"] == []
    for name in ("last.pt", "round_0001.pt", "round_0002.pt"):
        state = torch.load(out / "checkpoints" / name, weights_only=True)["model_state"]
        assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point()), name
