"""End-to-end: the feature contract and the version handshake with real processes on 127.0.0.1.

One plaintext federation (``flwr-server --insecure`` + five ``tdamil-client`` SuperNodes, free
ports, bounded waits, everything stopped in ``finally``) on digits bags written as h5 feature
caches. The coordinator's YAML pins a contract (encoder, weights sha256, 20x, 512 px, 64 features
per patch) that site_a's files record; the demo writer records only ``encoder``, so every file's
attrs are rewritten here (h5py, attrs only, on the root and on ``/coords`` as the writer stores them):

* site_a: the contract's values (the one good site);
* site_b: another encoder of the same width;
* site_c: one slide re-extracted at 40x (the others fit: the file named must be that one);
* site_d: another weights file (sha256);
* site_e: fitting files, but its processes declare tdamil-fl 0.0.9 (a ``sitecustomize.py`` on
  PYTHONPATH sets ``tdamil.__version__`` in every process of that site; production code untouched).

The run finishes (exit 0) with site_a aggregated in both rounds; each bad site is refused in round 1
before it trains, with one audit ``failure`` line naming the site, the file, the attribute, the
expected and the found value (the version: package, found, required and the pip command); no
``aggregated`` event lists a bad site; site_a's ``site_handshake`` is audited once with its versions.
"No extra cost per round" is counted, not timed: the contract check (``check_features``, one summary
log line each time it runs) runs once per site and run, not once per round.
"""

from __future__ import annotations

import hashlib
import os
import re
import sys
from pathlib import Path

import pytest
import yaml

from tdamil.federation.processes import ManagedProcess, flower_env
from tdamil.net import free_port
from federation_processes import audit_events, stop_all, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

SITES = ("site_a", "site_b", "site_c", "site_d", "site_e")
BAD = SITES[1:]
ENCODER = "digits-pixels"
SHA = hashlib.sha256(b"digits-pixels weights v1").hexdigest()
OTHER_SHA = hashlib.sha256(b"digits-pixels weights v2").hexdigest()
GOOD = {"encoder": ENCODER, "weights_sha256": SHA, "target_magnification": 20, "patch_size": 512}


def _set_attrs(path: Path, attrs: dict) -> None:
    """Rewrite a feature file's extraction attrs (root and /coords, as tdamil.data.h5 writes them)."""
    import h5py

    with h5py.File(path, "r+") as f:
        for node in (f, f["coords"]):
            for key, value in attrs.items():
                node.attrs[key] = value


def _site_files(root: Path, site: str) -> list[Path]:
    return sorted((root / site / "features").glob("*.h5"))


def test_contract_and_versions_refuse_bad_sites_before_training(tmp_path):
    from tdamil import __version__
    from tdamil.data.contract import contract_of_file
    from tdamil.federation.demo import write_demo_federation

    fleet, internal = free_port(), free_port()
    ports = [free_port() for _ in SITES]
    paths = write_demo_federation(
        tmp_path, num_sites=len(SITES), train_bags=6, val_bags=3, test_bags=3, heldout_bags=6,
        model={"name": "tdamil", "dim": 16, "depth": 1, "num_heads": 2},
        federation={"rounds": 2, "min_sites": len(SITES), "min_replies": 1, "round_timeout_s": 120,
                    "wait_for_sites_s": 240, "evaluate_sites": False},
        superlink=f"127.0.0.1:{fleet}", internal_port=internal, runtime_ports=ports, secure=False)

    # the demo's files record the encoder only: give them the extraction attrs, bad sites differing
    assert contract_of_file(_site_files(tmp_path, "site_a")[0]).weights_sha256 is None
    for folder in ("coordinator", *SITES):
        for f in _site_files(tmp_path, folder):
            _set_attrs(f, GOOD)
    for f in _site_files(tmp_path, "site_b"):
        _set_attrs(f, {"encoder": "digits-pca"})  # another encoder, same width (64)
    c_bad = _site_files(tmp_path, "site_c")[-1]
    _set_attrs(c_bad, {"target_magnification": 40.0})  # one slide re-extracted at 40x
    for f in _site_files(tmp_path, "site_d"):
        _set_attrs(f, {"weights_sha256": OTHER_SHA})  # another release of the encoder's weights
    found = contract_of_file(_site_files(tmp_path, "site_a")[0])
    assert (found.encoder, found.weights_sha256, found.target_magnification, found.patch_size, found.feature_dim) == \
        ("digits_pixels", SHA, 20.0, 512, 64)

    server_cfg = yaml.safe_load(paths["server"].read_text())
    server_cfg["contract"] = {**GOOD, "feature_dim": server_cfg["in_dim"]}
    paths["server"].write_text(yaml.safe_dump(server_cfg, sort_keys=False))

    # site_e runs an older tdamil-fl: every process of that site imports this first
    old = tmp_path / "old_tdamil"
    old.mkdir()
    (old / "sitecustomize.py").write_text('import tdamil\ntdamil.__version__ = "0.0.9"\n')

    out = tmp_path / "run"
    env = flower_env(threads=1)
    env_e = {**env, "PYTHONPATH": os.pathsep.join(x for x in (str(old), env.get("PYTHONPATH")) if x)}
    py = sys.executable
    logs = tmp_path / "logs"

    procs: list[ManagedProcess] = []
    try:
        server = ManagedProcess("flwr-server", [py, "-m", "tdamil.server.coordinator", "--config", str(paths["server"]),
                                                "--insecure"], logs / "server.log", env=env)
        procs.append(server)
        for name in SITES:
            procs.append(ManagedProcess(name, [py, "-m", "tdamil.client.site", "--config", str(paths[name]),
                                               "--insecure", "--state-dir", str(tmp_path / "state" / name)],
                                        logs / f"{name}.log", env=env_e if name == "site_e" else env))
        wait_for("the run to finish", lambda: server.poll() is not None, 220, procs)
        assert server.poll() == 0, server.tail(40)
        ev = audit_events(out)
        assert ev[-1]["event"] == "run_finished" and ev[-1]["failed_rounds"] == [], ev[-1]

        # site_a's update is aggregated in both rounds, and no bad site's ever is
        aggregated = [e for e in ev if e["event"] == "aggregated"]
        assert [e["round"] for e in aggregated] == [1, 2]
        assert all(e["sites"] == ["site_a"] for e in aggregated), aggregated
        assert {e["site"] for e in ev if e["event"] == "reply"} == {"site_a"}

        # each bad site is refused in round 1, phase train, with one line saying what to fix
        failures = [e for e in ev if e["event"] == "failure" and e["round"] == 1 and e["phase"] == "train"]
        reasons = {}
        for name in BAD:
            mine = [e["reason"] for e in failures if f"site {name}" in e["reason"]]
            assert len(mine) == 1, (name, failures)
            reasons[name] = mine[0]
            assert "\n" not in mine[0] and "<class" not in mine[0], mine[0]

        def contract_line(name: str, attr: str, expected: str, got: str) -> re.Match:
            m = re.match(rf"site {name}: (\S+\.h5): {attr} is {re.escape(got)}, the federation expects "
                         rf"{re.escape(expected)} \(.*contract\.{attr}\)\. Re-extract with tdamil-extract", reasons[name])
            assert m, reasons[name]
            assert Path(m.group(1)).resolve().parent == (tmp_path / name / "features").resolve(), reasons[name]
            return m

        contract_line("site_b", "encoder", "'digits_pixels'", "'digits_pca'")
        assert Path(contract_line("site_c", "target_magnification", "20", "40").group(1)).resolve() == c_bad.resolve()
        contract_line("site_d", "weights_sha256", repr(SHA), repr(OTHER_SHA))
        assert re.match(r"site site_e runs tdamil-fl 0\.0\.9, the coordinator requires 0\.1\.x "
                        r"\(pip install -U 'tdamil-fl==0\.1\.\*'\); refused before training", reasons["site_e"]), \
            reasons["site_e"]

        # refused before training: no bad site got as far as a training epoch
        for name in BAD:
            assert "training 1 local epoch" not in (logs / f"{name}.log").read_text(), name

        # site_a's versions and features are audited once, accepted
        hs = [e for e in ev if e["event"] == "site_handshake"]
        assert [e["site"] for e in hs] == ["site_a"], hs
        versions = hs[0]["versions"]
        assert hs[0]["accepted"] is True and hs[0]["problem"] is None
        assert versions["tdamil-fl"] == __version__ and versions["device"] == "cpu" and versions["precision"] == "fp32"
        assert all(versions.get(k) for k in ("flwr", "torch", "python")), versions
        assert hs[0]["extraction"] == {**{k: v for k, v in GOOD.items()}, "encoder": "digits_pixels",
                                     "target_magnification": 20.0, "feature_dim": 64}

        # no extra cost per round: the contract check (one summary line each time check_features runs)
        # ran once at site_a in this run of 2 rounds, not once per round
        a_log = (logs / "site_a.log").read_text()
        n_files = len(_site_files(tmp_path, "site_a"))
        checks = re.findall(rf"site site_a: {n_files} feature files fit the contract", a_log)
        trained = re.findall(r"Site site_a, round \d+: training", a_log)
        assert len(trained) == 2, a_log[-3000:]
        # the accepted handshake is kept in the run's context.state, which the SuperNode hands to
        # every message (each round's ClientApp is a fresh forked process)
        assert len(checks) == 1, checks
    finally:
        stop_all(procs)
