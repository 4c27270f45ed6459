"""Run a scenario through Flower's simulation engine (Ray), one virtual SuperNode per site."""

from __future__ import annotations

import os

from fedseg.config import RunConfig


def backend_config(cfg: RunConfig) -> dict:
    """Ray resources: each simulated client reserves ``client_cpus``; Ray runs as many clients
    at once as its CPU count allows, so ``actors`` sets that count (0 = what the machine's
    cores allow, at least 1). On 2 cores with the default 2 CPUs per client: one at a time."""
    f = cfg.federation
    cores = os.cpu_count() or 1
    actors = f.actors or max(1, int(cores // max(f.client_cpus, 1e-3)))
    actors = min(actors, f.num_sites)
    return {
        "client_resources": {"num_cpus": f.client_cpus, "num_gpus": 0.0},
        "init_args": {
            # Ray counts these CPUs for scheduling only; actors * client_cpus fits them exactly.
            "num_cpus": max(1, int(round(actors * f.client_cpus))),
            "log_to_driver": True,  # stream the clients' logs to this console
        },
    }


def simulate(cfg: RunConfig, verbose: bool = False) -> None:
    """The same ClientApp/ServerApp as ``flwr run .``, with the scenario passed in directly."""
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    from flwr.simulation import run_simulation

    from clients.app import make_client_app
    from server.app import make_server_app

    run_simulation(
        server_app=make_server_app(cfg),
        client_app=make_client_app(cfg),
        num_supernodes=cfg.federation.num_sites,
        backend_config=backend_config(cfg),
        verbose_logging=verbose,
    )
