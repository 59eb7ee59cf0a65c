"""Ray engine: per-site resources from the YAML, checked against what the cluster has, and a run on
a real local cluster (``ray start --head`` on 127.0.0.1) whose actors are shown to have run there."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from tdamil.config import ConfigError
from tdamil.net import free_port, wait_for_port
from tdamil.simulation.config import RayConfig, SimConfig, SiteResources, load_sim_config
from tdamil.simulation.resources import check_inprocess, sites_that_fit

RAY = Path(sys.executable).with_name("ray")
# Ray replaces a 127.0.0.1 node address by the machine's routable one unless clusters are "off":
# with this, every Ray port (GCS, raylet, object manager, workers) binds to loopback only.
LOOPBACK_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0"}

SIM = {
    "model": {"name": "tdamil", "dim": 16, "depth": 1, "num_heads": 2},
    "baselines": False,
    "engine": "ray",
    "data": {"source": "digits", "digits": {"num_sites": 2, "site_test_bags": 6, "bags": {
        "num_train_bags": 6, "num_val_bags": 4, "num_test_bags": 8, "mean_bag_size": 5}}},
    "federation": {"rounds": 1, "lr": 0.002, "min_sites": 2, "round_timeout_s": 120, "wait_for_sites_s": 60},
    "train": {"progress": False},
}


def test_sites_fit_node_by_node():
    cpu_node, gpu_node = {"CPU": 8.0}, {"CPU": 16.0, "GPU": 4.0}
    assert sites_that_fit(SiteResources(num_cpus=2), [cpu_node, gpu_node]) == 4 + 8
    assert sites_that_fit(SiteResources(num_cpus=1, num_gpus=1), [cpu_node, gpu_node]) == 4
    assert sites_that_fit(SiteResources(num_cpus=1, num_gpus=0.5), [cpu_node, gpu_node]) == 8  # 2 per GPU
    assert sites_that_fit(SiteResources(num_cpus=1, num_gpus=1), [cpu_node]) == 0
    assert sites_that_fit(SiteResources(num_cpus=12), [cpu_node, {"CPU": 6.0}]) == 0  # must fit on one node


def test_device_follows_the_resources_and_contradictions_are_errors(tmp_path):
    assert SimConfig().train.device == "cpu"
    assert SimConfig(resources=SiteResources(num_gpus=0.5)).train.device == "cuda"
    path = tmp_path / "sim.yaml"
    path.write_text(yaml.safe_dump({"train": {"device": "cuda"}}))
    with pytest.raises(ConfigError, match="resources.num_gpus"):
        load_sim_config(path)
    path.write_text(yaml.safe_dump({"resources": {"num_gpus": 1.5}}))
    with pytest.raises(ConfigError, match="whole number"):
        load_sim_config(path)
    path.write_text(yaml.safe_dump({"ray": {"address": "127.0.0.1:6379", "num_cpus": 2}}))
    with pytest.raises(ConfigError, match="private Ray"):
        load_sim_config(path)
    args = RayConfig(address="10.0.0.5:6379").init_args()
    assert args["address"] == "10.0.0.5:6379" and "num_cpus" not in args


def test_inprocess_gpu_request_without_a_gpu_is_one_line():
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: the request is met")
    with pytest.raises(ConfigError, match="0 CUDA GPU") as err:
        check_inprocess(SiteResources(num_gpus=1))
    assert "\n" not in str(err.value)


def _simulate(tmp_path: Path, cfg: dict, *args: str) -> subprocess.CompletedProcess:
    path = tmp_path / f"sim_{len(list(tmp_path.glob('sim_*.yaml')))}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return subprocess.run([sys.executable, "-m", "tdamil.simulation.cli", "--config", str(path), *args],
                          capture_output=True, text=True, timeout=300, env={**os.environ, **LOOPBACK_ENV})


@pytest.fixture
def ray_head():
    """A one-node Ray cluster on 127.0.0.1 with 2 CPUs, stopped afterwards.

    Stopped by killing its own process group, not with `ray stop`, which stops every Ray process
    of the machine (other test runs' too). A short temp dir: Ray's socket paths have a length limit."""
    temp = Path(tempfile.mkdtemp(prefix="ray", dir="/tmp"))
    port = free_port()
    cmd = [str(RAY), "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={port}",
           "--num-cpus=2", "--num-gpus=0", "--include-dashboard=false", "--disable-usage-stats",
           f"--ray-client-server-port={free_port()}", f"--dashboard-agent-listen-port={free_port()}",
           f"--temp-dir={temp}"]
    log = open(temp / "head.log", "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                            env={**os.environ, **LOOPBACK_ENV})
    try:
        wait_for_port("127.0.0.1", port, timeout=120)
        yield f"127.0.0.1:{port}", temp
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
        time.sleep(1)
        try:  # workers the raylet started are in the group too; make sure none outlives the test
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        log.close()
        shutil.rmtree(temp, ignore_errors=True)


@pytest.mark.slow
@pytest.mark.e2e
def test_simulation_runs_on_a_running_local_cluster(tmp_path, ray_head):
    address, temp = ray_head
    res = _simulate(tmp_path, {**SIM, "output_dir": str(tmp_path / "run")}, "--ray-address", address)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = [json.loads(x) for x in (tmp_path / "run" / "placement.jsonl").read_text().splitlines()]
    assert {r["site"] for r in rows} == {"site_a", "site_b"}
    assert {r["gcs_address"] for r in rows} == {address}  # the cluster we started, not a private one
    assert {r["device"] for r in rows} == {"cpu"} and all(r["gpu_ids"] == [] for r in rows)
    # the cluster's own logs know the actor processes that ran the sites
    logs = temp / "session_latest" / "logs"
    for pid in {r["pid"] for r in rows}:
        assert list(logs.glob(f"python-core-worker-*_{pid}.log")), f"no worker log of pid {pid} in {logs}"
    events = [json.loads(x) for x in (tmp_path / "run" / "audit.jsonl").read_text().splitlines()]
    assert any(e["event"] == "aggregated" and sorted(e["sites"]) == ["site_a", "site_b"] for e in events)

    # a GPU the cluster does not have: one line, exit code 2, no hang (CPUs: test_sites_fit_node_by_node)
    res = _simulate(tmp_path, {**SIM, "output_dir": str(tmp_path / "bad"), "resources": {"num_gpus": 1}},
                    "--ray-address", address)
    assert res.returncode == 2, res.stderr[-2000:]
    (line,) = [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]
    assert "1 GPU(s)" in line and "2 CPU(s), 0 GPU(s)" in line, line


@pytest.mark.slow
def test_unreachable_cluster_is_one_line(tmp_path):
    res = _simulate(tmp_path, {**SIM, "output_dir": str(tmp_path / "run")}, "--ray-address", f"127.0.0.1:{free_port()}")
    assert res.returncode == 2
    assert "cannot reach the Ray cluster" in res.stderr and "ray start --head" in res.stderr
