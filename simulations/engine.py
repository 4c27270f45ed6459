"""Run a scenario through Flower's simulation engine (Ray), one virtual SuperNode per site."""

from __future__ import annotations

import os

from fedseg.config import RunConfig


def simulate(cfg: RunConfig, verbose: bool = False) -> None:
    """The same ClientApp/ServerApp as ``flwr run .``, with the scenario passed in directly."""
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    from flwr.simulation import run_simulation

    from clients.app import make_client_app
    from server.app import make_server_app

    backend = {
        "client_resources": {"num_cpus": cfg.federation.client_cpus, "num_gpus": 0.0},
        "init_args": {"num_cpus": max(int(cfg.federation.client_cpus), os.cpu_count() or 1)},
    }
    run_simulation(
        server_app=make_server_app(cfg),
        client_app=make_client_app(cfg),
        num_supernodes=cfg.federation.num_sites,
        backend_config=backend,
        verbose_logging=verbose,
    )
