"""Run the federation's ServerApp and ClientApp with the configured simulation engine.

* ``inprocess``: an in-process Grid calls the ClientApp for each site, one message at a time;
* ``ray``: Flower's Ray simulation engine (``pip install 'tdamil-fl[ray]'``) on a private Ray
  instance or a running cluster (``ray.address``), each site with ``resources`` CPUs / GPUs.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from flwr.app import Context, RecordDict

from tdamil.client.client_app import make_client_app
from tdamil.federation.grids import InProcessGrid
from tdamil.federation.task import ModelSpec
from tdamil.server.server_app import RunSetup, make_server_app
from tdamil.simulation.config import SimConfig
from tdamil.simulation.resources import check_inprocess, ray_cluster
from tdamil.simulation.sites import SimSiteProvider, SimSites

__all__ = ["run_federation"]


def run_federation(cfg: SimConfig, sims: SimSites, out_dir: Path, *, resume: bool = False,
                   on_message: Any = None) -> Any:
    """Run the federation with the configured engine; returns the RunSetup (``setup.result``)."""
    setup = RunSetup(spec=ModelSpec(cfg.model, sims.in_dim, cfg.num_classes), federation=cfg.federation,
                     out_dir=out_dir, checkpoint=cfg.checkpoint, heldout=sims.held_out, privacy=cfg.privacy,
                     resume=resume)
    server_app = make_server_app(lambda context: setup)
    names = list(sims.sites)
    if cfg.engine == "inprocess":
        check_inprocess(cfg.resources)
        client_app = make_client_app(SimSiteProvider(cfg, sims))
        grid = InProcessGrid(client_app, {1000 + i: {"site": n} for i, n in enumerate(names)}, on_message=on_message)
        server_app(grid, Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={}))
        return setup
    out_dir.mkdir(parents=True, exist_ok=True)
    # The sites rebuild their data from the config in their actors (paths, never arrays: see
    # SimSiteProvider); each notes where it ran in placement.jsonl.
    client_app = make_client_app(SimSiteProvider(cfg, sims, placement=out_dir / "placement.jsonl"))
    # Ray and Flower's simulation set PYTHONPATH and other variables in this process (some at
    # import): put the environment back so later subprocesses (a SuperLink, an external CLI)
    # are not affected.
    saved_env = dict(os.environ)
    try:
        with ray_cluster(cfg):
            from flwr.simulation import run_simulation  # noqa: PLC0415 - needs the optional ray extra

            # Ray runs the ServerApp in this process; the setup object is filled in place.
            resources = {"num_cpus": cfg.resources.num_cpus, "num_gpus": cfg.resources.num_gpus}
            run_simulation(server_app=server_app, client_app=client_app, num_supernodes=len(names),
                           backend_config={"client_resources": resources})
    finally:
        os.environ.clear()
        os.environ.update(saved_env)
    return setup
