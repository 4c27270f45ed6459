"""Run a scenario through Flower's simulation engine (Ray), one virtual SuperNode per site."""

from __future__ import annotations

import logging
import math
import os

from fedseg.config import RunConfig
from fedseg.site_worker import cores_left, slots


def backend_config(cfg: RunConfig) -> dict:
    """Ray resources: each simulated client reserves ``client_cpus``; Ray runs as many clients
    at once as its CPU count allows, so ``actors`` sets that count (0 = what the machine's
    cores allow, at least 1). On 2 cores with the default 2 CPUs per client: one at a time."""
    f = cfg.federation
    cores = os.cpu_count() or 1
    actors = f.actors or max(1, int(cores // max(f.client_cpus, 1e-3)))
    client_cpus = f.client_cpus
    if slots(cfg) and not f.actors:
        # The hospitals compute in their workers (fedseg/site_worker.py); an actor only waits
        # on one, so one actor per worker lets them run side by side.
        actors = slots(cfg)
        client_cpus = cores / actors
    actors = min(actors, f.num_sites)
    # Ray counts CPUs for scheduling only, and Flower makes int(num_cpus / client num_cpus)
    # actors: give Ray a whole number of CPUs and each client just under its share of them.
    num_cpus = max(1, math.ceil(actors * client_cpus - 1e-9))
    per_client = math.floor(1e4 * num_cpus / actors) / 1e4
    return {
        "client_resources": {"num_cpus": per_client, "num_gpus": 0.0},
        "init_args": {"num_cpus": num_cpus, "log_to_driver": True},  # stream clients' logs
    }


class _FedsegsOwnNotices(logging.Filter):
    """Flower's notice that ``run_simulation`` is deprecated is addressed to fedseg, not to its
    user, who can do nothing about it. fedseg keeps ``run_simulation`` on purpose: it runs the
    ServerApp in this process, so the phases' live progress reaches the terminal, and it leaves
    no local SuperLink running afterwards (``flwr run .`` starts one and streams only log
    lines). ``--debug`` shows the notice."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "`run_simulation` function is deprecated" not in record.getMessage()


def simulate(cfg: RunConfig, debug: bool = False) -> None:
    """The same ClientApp/ServerApp as ``flwr run .``, with the scenario passed in directly.
    ``debug``: also Flower's notices addressed to fedseg's developers.

    Every site's data is checked first, in this process and before Ray starts: a bad file is
    a :class:`DataCheckError` listing each problem, not a traceback from inside an actor."""
    from fedseg.data.preflight import check_run_data

    for notice in check_run_data(cfg):
        logging.getLogger("fedseg.data").warning("%s", notice)
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    # Ray starts its workers at nice 15; the simulated hospitals are the run's real work, and at
    # nice 15 any other job on the machine starves them (FedAvg rounds went from 52 s to 4-6 min).
    os.environ.setdefault("RAY_worker_niceness", "0")
    # No GPU is asked for: Ray's warning about a future default for that case is noise here.
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    from flwr.simulation import run_simulation

    # Flower prints through its own handler (INFO and up); passed on to ours as well, each of
    # its lines came twice and its DEBUG records (backend config, run ids) reached the user.
    flower_log = logging.getLogger("flwr")
    flower_log.propagate = False
    for old in [f for f in flower_log.filters if isinstance(f, _FedsegsOwnNotices)]:
        flower_log.removeFilter(old)
    if not debug:
        flower_log.addFilter(_FedsegsOwnNotices())

    from clients.app import make_client_app
    from server.app import make_server_app
    from simulations.adversary import tamper_mod

    mods = (tamper_mod(cfg),) if any(h.tamper for h in cfg.hospitals) else ()

    run_simulation(
        server_app=make_server_app(cfg, threads=cores_left(cfg)),
        client_app=make_client_app(cfg, mods),
        num_supernodes=cfg.federation.num_sites,
        backend_config=backend_config(cfg),
        verbose_logging=False,  # Flower's DEBUG lines (backend config, ids) help no user
    )
