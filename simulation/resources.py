"""What the sites ask for against what the machine or the Ray cluster has.

``check_inprocess`` and ``ray_cluster`` refuse a request that cannot be met with one line naming the
setting to change, before any site starts: Ray itself would wait forever for a GPU that does not exist.
``record_placement`` lets each site note where it ran (Ray node, process, GPU), which is how a run
shows that it used the cluster it was pointed at and that sites shared a GPU.
"""

from __future__ import annotations

import json
import logging
import math
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tdamil.config import ConfigError
from tdamil.net import split_host_port
from tdamil.simulation.config import SimConfig, SiteResources

logger = logging.getLogger(__name__)

__all__ = ["check_inprocess", "ray_cluster", "sites_that_fit", "record_placement"]


def _cuda_count() -> int:
    import torch  # noqa: PLC0415 - torch is heavy; only needed when GPUs are asked for

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def check_inprocess(res: SiteResources) -> None:
    """The in-process engine runs the sites one after another here: a GPU request needs a GPU here."""
    if res.num_gpus > 0 and _cuda_count() < math.ceil(res.num_gpus):
        raise ConfigError(f"resources.num_gpus is {res.num_gpus:g} but this machine has {_cuda_count()} CUDA GPU(s); "
                          "set resources.num_gpus: 0 to train on the CPU.")


def sites_that_fit(res: SiteResources, nodes: list[dict[str, float]]) -> int:
    """How many sites can run at once on nodes with these resources (``{"CPU": .., "GPU": ..}``).

    Counted node by node, because one site's request must fit on a single node."""
    total = 0
    for node in nodes:
        fit = int(node.get("CPU", 0.0) / res.num_cpus + 1e-9)
        if res.num_gpus > 0:
            fit = min(fit, int(node.get("GPU", 0.0) / res.num_gpus + 1e-9))
        total += fit
    return total


def _check_reachable(address: str) -> None:
    if address == "auto" or "://" in address:
        return  # ray.init resolves these and reports what it cannot find
    host, port = split_host_port(address, "ray.address / --ray-address")
    try:
        socket.create_connection((host, port), timeout=5).close()
    except OSError as exc:
        raise ConfigError(f"cannot reach the Ray cluster at {address} ({exc.strerror or exc}); start it with "
                          "`ray start --head` or fix ray.address / --ray-address.") from None


def _check_cluster(cfg: SimConfig, where: str) -> int:
    import ray  # noqa: PLC0415

    res = cfg.resources
    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive") and n.get("Resources")]
    total = ray.cluster_resources()
    have = f"{total.get('CPU', 0):g} CPU(s), {total.get('GPU', 0):g} GPU(s) on {len(nodes)} node(s)"
    fit = sites_that_fit(res, nodes)
    if fit == 0:
        raise ConfigError(f"each site asks for {res.num_cpus:g} CPU(s) and {res.num_gpus:g} GPU(s) "
                          f"(resources.num_cpus / num_gpus) but {where} has {have}, none of which fits one site; "
                          "lower the request or add a node that has it.")
    if res.num_gpus > 0 and cfg.ray.address is None and _cuda_count() < total.get("GPU", 0):
        raise ConfigError(f"ray.num_gpus declares {total.get('GPU', 0):g} GPU(s) but this machine has {_cuda_count()}; "
                          "lower ray.num_gpus.")
    logger.info("Ray: %s (%s); each site %g CPU(s), %g GPU(s): %d site(s) run at once.", where, have,
                res.num_cpus, res.num_gpus, fit)
    return fit


@contextmanager
def ray_cluster(cfg: SimConfig) -> Iterator[int]:
    """Connect to (or start) the configured Ray cluster, check that one site fits, and shut the
    connection down afterwards; yields how many sites run at once."""
    try:
        import ray  # noqa: PLC0415
    except ImportError:
        raise ConfigError("engine: ray needs Flower's simulation extra: pip install 'tdamil-fl[ray]'.") from None
    address = cfg.ray.address
    if address:
        try:
            _check_reachable(address)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
    where = f"the Ray cluster at {address}" if address else "the private Ray instance"
    try:
        ray.init(**cfg.ray.init_args())
    except ConnectionError as exc:
        raise ConfigError(f"cannot join {where}: {str(exc).splitlines()[0]} (ray.address / --ray-address)") from None
    try:
        yield _check_cluster(cfg, where)
    finally:
        ray.shutdown()


def record_placement(path: Path, site: str, device: str) -> None:
    """Append where ``site`` runs this message: Ray node, job, process, GPU ids (one JSON line)."""
    import ray  # noqa: PLC0415

    ctx = ray.get_runtime_context()
    row: dict[str, Any] = {
        "site": site, "time": time.time(), "pid": os.getpid(), "device": device,
        "node_id": ctx.get_node_id(), "job_id": ctx.get_job_id(), "gcs_address": ctx.gcs_address,
        "gpu_ids": [str(g) for g in ctx.get_accelerator_ids().get("GPU", [])],
    }
    with open(path, "a", encoding="utf-8") as fh:  # one short line per write: appends do not interleave
        fh.write(json.dumps(row) + "\n")
