"""Flower ServerApp: runs the PPCMI-SF phases in order (or the inr mode's) and writes the
results folder."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch
from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedseg.atomic import savez_atomic, torch_save_atomic
from fedseg.checkpoint import (
    LATENTS_NAME,
    UMN_NAME,
    ResultsFolderError,
    check_not_finetuned,
    checkpoint_dir,
    claim_out_dir,
    load_checkpoint,
)
from fedseg.config import RunConfig, config_from_run_config
from fedseg.coordinator import Coordinator
from fedseg.data import image_channels
from fedseg.deploy.registry import load_registry
from fedseg.deploy.runtime import resolve_scenario
from fedseg.models.autoencoder import latent_shapes
from fedseg.obfuscation import INR_NET_NAME, INR_SHARED_NAME, SharedSet, train_network
from fedseg.report import federated_metrics
from fedseg.results import RunResults
from fedseg.wire import payload_bytes
from simulations.profiles import describe, round_deadline
from strategies.autoencoders import LocalAutoencoderTraining
from strategies.common import Federation, log, wait_for_nodes
from strategies.evaluation import SegmentationEvaluation
from strategies.finetune import SplitFinetuning
from strategies.inr import ReleaseCollection, evaluate_network
from strategies.latents import LatentCollection
from strategies.mapping import MappingTraining
from strategies.rounds import RoundParticipation

CHUNK_SIZE = 128
APP_DIR = Path(__file__).resolve().parents[1]  # the app as installed on this node


def run_federation(grid: Grid, cfg: RunConfig, threads: int | None = None) -> RunResults:
    """All phases; returns the run's results, which it also wrote to ``cfg.out_dir``.
    ``threads``: torch threads here (None: ``training.threads``; a simulation whose hospitals
    compute on the same cores passes fewer).

    With ``cfg.resume`` the sites reload their saved autoencoders, and the server takes back
    the collected latents and the last finished UMN round from ``<out_dir>/checkpoints``.
    """
    torch.set_num_threads(threads or cfg.training.threads)
    Path(cfg.out_dir).mkdir(parents=True, exist_ok=True)
    timeout = cfg.federation.message_timeout_s or None
    saved_latents, saved_round = _saved(cfg)
    timing: dict[str, float] = dict(saved_latents["timing"]) if saved_latents else {}
    federation, names = _register(grid, cfg, saved_latents, timing, timeout)
    all_sites = sorted(federation.sites.values(), key=lambda s: s.name)
    if cfg.mode == "inr":
        return _run_inr(grid, cfg, federation, timing, timeout)
    key_dir = cfg.privacy.key_dir or Path(cfg.out_dir) / "keys"
    coordinator = Coordinator(cfg, names, key_dir=key_dir)
    register_ckks_keys(coordinator, federation)
    train_bytes = _collect_latents(grid, coordinator, federation, saved_latents, timing, timeout)
    mapping, participation = _train_umn(grid, coordinator, federation, saved_round, timing)
    finetune: dict = {"finetune_losses": []}
    if cfg.training.finetune_epochs:
        finetune = _split_train(grid, coordinator, federation, timing, timeout)
    # What the baselines' time budget matches (baselines.match_wall_clock). Without autoencoder
    # pre-training (the default) the registration phase trains nothing: it is the hospitals'
    # start-up (11 s of the demo's), which the baselines' own start-up is not charged either.
    phases = ("latent_collection", "umn_training", "finetuning")
    if cfg.training.ae_epochs > 0:
        phases = ("autoencoders", *phases)
    timing["training_total"] = sum(timing[k] for k in phases if k in timing)

    started = time.perf_counter()
    evaluation = SegmentationEvaluation(coordinator, CHUNK_SIZE, timeout)
    site_metrics, map_s = evaluation.run(grid, federation)
    timing["evaluation"] = time.perf_counter() - started
    timing["server_map_per_image"] = map_s
    if not site_metrics:
        raise RuntimeError(f"no hospital was evaluated; dropped: {federation.dropped}")
    shapes = latent_shapes(cfg.model.image_size, cfg.model.latent_channels)
    history = participation.history if participation else []
    rounds = [
        {**t, **(history[i] if i < len(history) else {})}
        for i, t in enumerate(mapping.round_seconds)
    ]
    return federated_metrics(
        cfg,
        site_metrics,
        timing=timing,
        # a test image's keyed latents, or (ckks) its share of the ciphertexts that carried it
        bytes_per_query=(
            evaluation.query_bytes // max(evaluation.queries, 1)
            if evaluation.queries
            else payload_bytes(shapes)
        ),
        dropped=federation.dropped,
        rejected=federation.rejected,
        umn_parameters=coordinator.parameter_count(),
        rounds=rounds,
        data_stats={s.name: s.stats for s in all_sites if s.stats},
        site_profiles=describe(cfg) if cfg.hospitals else [],
        train_latent_bytes=train_bytes,
        **finetune,
        resumed={
            "latents": saved_latents is not None,
            "from_round": int(saved_round["round"]) if saved_round else 0,
        },
    )


def _saved(cfg: RunConfig) -> tuple[dict | None, dict | None]:
    """Resuming: the collected latents and the last UMN round this config checkpointed."""
    saved_latents = load_checkpoint(cfg, LATENTS_NAME) if cfg.resume else None
    latent_training = cfg.training.umn_rounds > 0
    # Without latent training the only UMN checkpoint is the one split training ends with.
    resume_round = cfg.resume and (saved_latents or not latent_training)
    saved_round = load_checkpoint(cfg, UMN_NAME) if resume_round else None
    check_not_finetuned(saved_round, cfg)
    if cfg.resume and saved_latents is None:
        log.info("nothing collected yet in %s: starting from the beginning", cfg.out_dir)
    return saved_latents, saved_round


def _register(grid, cfg, saved_latents, timing, timeout) -> tuple[Federation, list[str]]:
    """The sites that registered (under the operator's registry, if any), and the names the
    UMN serves (a resumed run: the checkpointed sites, who must have kept their models)."""
    registry = load_registry(cfg.federation.registry) if cfg.federation.registry else None
    nodes = wait_for_nodes(grid, cfg.federation.num_sites, cfg.federation.node_wait_s)
    log.info("%d hospitals registered", len(nodes))
    federation = Federation(registry=registry)
    started = time.perf_counter()
    ckks = cfg.privacy.query == "ckks"
    registering = LocalAutoencoderTraining(timeout, reuse=saved_latents is not None, ckks=ckks)
    registering.run(grid, nodes, federation)
    if saved_latents is None:
        timing["autoencoders"] = time.perf_counter() - started
    if not federation.sites:
        raise RuntimeError("no hospital finished autoencoder training; see the log for why")
    if not saved_latents:
        return federation, sorted(s.name for s in federation.sites.values())
    names = list(saved_latents["sites"])
    for node_id, site in list(federation.sites.items()):
        if site.name not in names:
            federation.drop(node_id, "resume", "not part of the checkpointed run")
        elif not site.reused:  # its kept latents came from AEs it no longer has
            federation.drop(node_id, "resume", "its saved autoencoders were missing")
    return federation, names


def register_ckks_keys(coordinator: Coordinator, federation: Federation) -> None:
    """The CKKS public bundles the sites registered with (``privacy.query = "ckks"``); a site
    whose bundle is refused (wrong parameters, a secret key in it) drops out."""
    for node_id, site in list(federation.sites.items()):
        if site.ckks_keys is None:
            continue
        try:
            coordinator.register_ckks(site.name, site.ckks_keys)
        except ValueError as err:
            federation.drop(node_id, "autoencoders", f"CKKS keys refused: {err}")
        site.ckks_keys = None  # held by the coordinator now


def _collect_latents(grid, coordinator, federation, saved_latents, timing, timeout) -> int:
    """The paper preset's keyed training latents (or the checkpointed ones); bytes received."""
    cfg = coordinator.cfg
    if saved_latents:
        coordinator.restore_latents(saved_latents)
        log.info("resumed: collected latents %s from the checkpoint", coordinator.collected())
        return int(saved_latents["train_bytes"])
    if cfg.training.umn_rounds == 0:
        log.info("training.umn_rounds = 0: no training latents are collected or kept")
        return 0
    started = time.perf_counter()
    copies = 1 + cfg.training.augment_copies
    totals = {n: s.n_train * copies for n, s in federation.sites.items()}
    train_bytes = LatentCollection("train", CHUNK_SIZE, timeout).run(
        grid, federation, totals, coordinator.add_chunk
    )
    coordinator.retain([s.name for s in federation.sites.values()])
    timing["latent_collection"] = time.perf_counter() - started
    coordinator.save_latents(checkpoint_dir(cfg), {"timing": timing, "train_bytes": train_bytes})
    mib = train_bytes / 2**20
    log.info("collected keyed latents: %s (%.1f MiB)", coordinator.collected(), mib)
    return train_bytes


def _train_umn(grid, coordinator, federation, saved_round, timing):
    """The UMN's latent-MSE rounds (paper preset; none by default), with simulated hospitals
    taking part (or dropping out) round by round."""
    cfg = coordinator.cfg
    prior_umn_s = 0.0
    if saved_round:
        coordinator.restore_round(saved_round)
        prior_umn_s = float(saved_round.get("umn_seconds", 0.0))
        log.info("resumed: UMN after round %d of %d", coordinator.round, cfg.training.umn_rounds)
    mapping = MappingTraining(coordinator, checkpoint_dir(cfg), prior_umn_s)
    participation = None
    before_round = None
    if cfg.hospitals:
        f = cfg.federation
        items = {
            n: s.n_train if f.round_items < 0 else f.round_items
            for n, s in federation.sites.items()
        }
        participation = RoundParticipation(coordinator, federation, items, round_deadline(cfg))

        def before_round(rnd: int) -> str:
            record = participation.run(grid, rnd)
            return f"{len(record['present'])}/{len(federation.sites)} sites, " + (
                f"dropped {', '.join(record['dropped'])}" if record["dropped"] else "none dropped"
            )

    mapping.run(cfg.training.umn_rounds, before_round)
    timing["umn_training"] = mapping.seconds
    return mapping, participation


def _split_train(grid, coordinator, federation, timing, timeout) -> dict:
    """Split training (the default); its losses and aggregation figures for metrics.json."""
    finetuning = SplitFinetuning(coordinator, checkpoint_dir(coordinator.cfg), timeout)
    losses = finetuning.run(grid, federation)
    timing["finetuning"] = finetuning.seconds
    return {
        "finetune_losses": losses,
        "share_bytes": finetuning.share_bytes,
        "share_seconds": finetuning.share_seconds,
        # when each epoch ended (time to Dice, benchmarks/time_to_dice.py; the first holds the
        # sites' start-up)
        "epoch_end_seconds": finetuning.epoch_end_seconds,
        "aggregation_absent": finetuning.absent,
    }


def _run_inr(grid, cfg: RunConfig, federation, timing, timeout) -> RunResults:
    """``mode = "inr"``: collect the sites' re-rendered chunks, train the UNet on them, send it
    back for each site to score on its own test split. The server keeps what it received
    (``checkpoints/inr_shared.npz``) and its network (``checkpoints/inr_unet.pt``): its view,
    which the attack suite attacks."""
    sites = sorted(federation.sites.values(), key=lambda s: s.name)
    first = sites[0]
    channels = image_channels(cfg)
    size = cfg.model.image_size
    shared = SharedSet((channels, size, size), len(first.class_names))
    started = time.perf_counter()
    received = ReleaseCollection(cfg.privacy.inr_chunk, timeout).run(grid, federation, shared)
    timing["inr_release"] = time.perf_counter() - started
    if not len(shared):
        raise RuntimeError(f"no hospital released images; dropped: {federation.dropped}")
    log.info("received %d re-rendered images (%.1f MiB)", len(shared), received / 2**20)
    folder = checkpoint_dir(cfg)
    folder.mkdir(parents=True, exist_ok=True)
    savez_atomic(folder / INR_SHARED_NAME, shared.to_arrays(), mode=0o600)
    started = time.perf_counter()
    net, network = train_network(cfg, shared.as_site_data(first.class_names))
    timing["inr_training"] = time.perf_counter() - started
    torch_save_atomic({"state": net.state_dict(), "config": cfg.to_dict()}, folder / INR_NET_NAME)
    timing["training_total"] = timing["inr_release"] + timing["inr_training"]
    started = time.perf_counter()
    site_metrics = evaluate_network(grid, federation, net, timeout)
    timing["evaluation"] = time.perf_counter() - started
    if not site_metrics:
        raise RuntimeError(f"no hospital was evaluated; dropped: {federation.dropped}")
    return federated_metrics(
        cfg,
        site_metrics,
        timing=timing,
        bytes_per_query=None,  # no queries: each site runs the network it got back
        dropped=federation.dropped,
        rejected=federation.rejected,
        data_stats={s.name: s.stats for s in sites if s.stats},
        inr={**shared.summary(), "received_bytes": received, "network": network},
    )


def claimed_config(run_config: dict) -> RunConfig:
    """``flwr run .``: the run's config, once its results folder is claimed as ``fedseg run``
    claims it: a folder holding another run is refused unless the run config says
    ``resume=true`` or ``overwrite=true`` (which removes that run's outputs first). Before
    anything is asked of the sites or written."""
    cfg = config_from_run_config(resolve_scenario(run_config, APP_DIR))
    try:
        removed = claim_out_dir(cfg, bool(run_config.get("overwrite", False)))
    except ResultsFolderError as err:
        raise ResultsFolderError(
            f"{err} (flwr run: --run-config 'resume=true', 'overwrite=true' or 'out-dir=...')"
        ) from None
    if removed:
        names = ", ".join(p.name for p in removed)
        log.warning("overwrite: removed the earlier run's %s from %s", names, cfg.out_dir)
    return cfg


def make_server_app(cfg: RunConfig | None = None, threads: int | None = None) -> ServerApp:
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        logging.getLogger("fedseg").setLevel(logging.INFO)
        if cfg is not None:  # fedseg run / demo: the CLI claimed the results folder already
            run_federation(grid, cfg, threads)
            return
        run_federation(grid, claimed_config(dict(context.run_config)))

    return app


app = make_server_app()
