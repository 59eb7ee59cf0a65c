"""Run the federation's ServerApp and ClientApp with the configured simulation engine.

* ``inprocess``: an in-process Grid calls the ClientApp for each site, one message at a time;
* ``ray``: Flower's Ray simulation engine (``pip install 'tdamil-fl[ray]'``).
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
from tdamil.simulation.sites import SimSiteProvider, SimSites

__all__ = ["run_federation"]


def run_federation(cfg: SimConfig, sims: SimSites, out_dir: Path, *, resume: bool = False,
                   on_message: Any = None) -> Any:
    """Run the federation with the configured engine; returns the RunSetup (``setup.result``)."""
    setup = RunSetup(spec=ModelSpec(cfg.model, sims.in_dim, cfg.num_classes), federation=cfg.federation,
                     out_dir=out_dir, checkpoint=cfg.checkpoint, heldout=sims.held_out, privacy=cfg.privacy,
                     resume=resume)
    server_app = make_server_app(lambda context: setup)
    client_app = make_client_app(SimSiteProvider(cfg, sims))
    names = list(sims.sites)
    if cfg.engine == "inprocess":
        grid = InProcessGrid(client_app, {1000 + i: {"site": n} for i, n in enumerate(names)}, on_message=on_message)
        server_app(grid, Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={}))
    else:
        # Ray and Flower's simulation set PYTHONPATH and other variables in this process (some at
        # import): put the environment back so later subprocesses (a SuperLink, an external CLI)
        # are not affected.
        saved_env = dict(os.environ)
        try:
            from flwr.simulation import run_simulation  # noqa: PLC0415
            import ray  # noqa: F401, PLC0415
        except ImportError:
            raise SystemExit("engine: ray needs Flower's simulation extra: pip install 'tdamil-fl[ray]'.") from None
        # Ray runs the ServerApp in this process; the setup object is filled in place.
        try:
            run_simulation(server_app=server_app, client_app=client_app, num_supernodes=len(names),
                           backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}})
        finally:
            os.environ.clear()
            os.environ.update(saved_env)
    return setup
