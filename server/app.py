"""Flower ServerApp: runs the PPCMI-SF phases in order and writes the results folder."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch
from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedseg.config import RunConfig, config_from_run_config
from fedseg.coordinator import Coordinator
from fedseg.models.autoencoder import latent_shapes
from fedseg.results import federated_metrics
from fedseg.wire import payload_bytes
from strategies.autoencoders import LocalAutoencoderTraining
from strategies.common import Federation, log, wait_for_nodes
from strategies.evaluation import SegmentationEvaluation
from strategies.latents import LatentCollection
from strategies.mapping import MappingTraining

CHUNK_SIZE = 128


def run_federation(grid: Grid, cfg: RunConfig) -> dict:
    """All phases; returns the metrics dict it also wrote to ``cfg.out_dir``."""
    torch.set_num_threads(cfg.training.threads)
    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    timing: dict[str, float] = {}
    timeout = cfg.federation.message_timeout_s or None

    nodes = wait_for_nodes(grid, cfg.federation.num_sites, cfg.federation.node_wait_s)
    log.info("%d hospitals registered", len(nodes))
    federation = Federation()

    started = time.perf_counter()
    LocalAutoencoderTraining(timeout).run(grid, nodes, federation)
    timing["autoencoders"] = time.perf_counter() - started
    if not federation.sites:
        raise RuntimeError("no hospital finished autoencoder training; see the log for why")

    names = sorted(s.name for s in federation.sites.values())
    coordinator = Coordinator(cfg, names, key_dir=cfg.privacy.key_dir or out_dir / "keys")
    started = time.perf_counter()
    copies = 1 + cfg.training.augment_copies
    totals = {n: s.n_train * copies for n, s in federation.sites.items()}
    train_bytes = LatentCollection("train", CHUNK_SIZE, timeout).run(
        grid, federation, totals, coordinator.add_chunk
    )
    coordinator.retain([s.name for s in federation.sites.values()])
    timing["latent_collection"] = time.perf_counter() - started
    log.info("collected keyed latents: %s (%.1f MiB)", coordinator.collected(), train_bytes / 2**20)

    started = time.perf_counter()
    MappingTraining(coordinator, out_dir / "checkpoints").run(cfg.training.umn_rounds)
    timing["umn_training"] = time.perf_counter() - started
    timing["training_total"] = sum(timing.values())

    started = time.perf_counter()
    site_metrics, map_s = SegmentationEvaluation(coordinator, CHUNK_SIZE, timeout).run(
        grid, federation
    )
    timing["evaluation"] = time.perf_counter() - started
    timing["server_map_per_image"] = map_s
    if not site_metrics:
        raise RuntimeError(f"no hospital was evaluated; dropped: {federation.dropped}")

    shapes = latent_shapes(cfg.model.image_size, cfg.model.latent_channels)
    metrics = federated_metrics(
        cfg,
        site_metrics,
        timing=timing,
        bytes_per_query=payload_bytes(shapes),
        dropped=federation.dropped,
        umn_parameters=coordinator.parameter_count(),
        train_latent_bytes=train_bytes,
    )
    return metrics


def make_server_app(cfg: RunConfig | None = None) -> ServerApp:
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        logging.getLogger("fedseg").setLevel(logging.INFO)
        run_cfg = cfg or config_from_run_config(dict(context.run_config))
        run_federation(grid, run_cfg)

    return app


app = make_server_app()
