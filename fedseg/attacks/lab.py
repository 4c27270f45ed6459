"""Run folders for several transforms that share one set of site autoencoders.

The autoencoders do not depend on the transform, so comparing none / KLT / KNT is cleanest (and
three times cheaper) with the same AEs and a new UMN per mode. This builds such run folders at
library level with the same site and server functions the Flower apps call (training chunks,
``Coordinator`` rounds, mapped queries, metrics), in the layout ``fedseg run`` writes, so
``fedseg attack`` runs on them unchanged. It does not exercise Flower's messaging (tests and
``fedseg run --transform knt`` do).

    python -m fedseg.attacks.lab --config simulations/scenarios/hippocampus-attack.toml \\
        --out results/attack/hippocampus --modes none klt knt [--from-run DIR] [--ae-epochs N ...]

Site AEs already in ``<out>/<name>-autoencoders/sites/`` (or the ``--from-run`` folder) are reused;
only missing ones are trained.
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import torch

from fedseg.atomic import write_bytes_atomic
from fedseg.attacks.context import load_run_config
from fedseg.config import RunConfig, load_config
from fedseg.coordinator import Coordinator
from fedseg.data import load_federation
from fedseg.evaluation import mean_over_sites
from fedseg.privacy.keys import write_key_file
from fedseg.report import write_results
from fedseg.site import (
    SiteModels,
    evaluate_predictions,
    query_chunk,
    segment_mapped,
    site_models_path,
    site_transform,
    stream_length,
    train_site,
    training_chunk,
)

CHUNK = 64


def shared_autoencoders(cfg: RunConfig, source: Path, log=print) -> dict[str, Path]:
    """Site AE files in ``source`` (a run folder), training and saving them if missing."""
    paths = {}
    for split in load_federation(cfg):
        path = site_models_path(source, split.name)
        if not path.is_file():
            started = time.perf_counter()
            models, _ = train_site(cfg, split.train)
            models.save(path, split.train.class_names)
            log(f"{split.name}: autoencoders trained in {time.perf_counter() - started:.0f} s")
        paths[split.name] = path
    return paths


def build_run(cfg: RunConfig, mode: str, aes: dict[str, Path], run: Path, log=print) -> dict:
    cfg = copy.deepcopy(cfg)
    cfg.privacy.transform = mode  # type: ignore[assignment]
    cfg.privacy.key_dir = ""
    cfg.out_dir = str(run)
    cfg.validate()
    sites = load_federation(cfg)
    names = [s.name for s in sites]
    keys = {s: run / "keys" / f"{s}.key" for s in names}
    models = {}
    for split in sites:
        target = site_models_path(run, split.name)
        write_bytes_atomic(target, aes[split.name].read_bytes(), mode=0o600)  # 0600 from the start
        models[split.name], _ = SiteModels.load(cfg, target)
        if mode != "none" and not keys[split.name].exists():
            write_key_file(keys[split.name])
    coordinator = Coordinator(cfg, names, key_dir=run / "keys")
    started = time.perf_counter()
    for split in sites:
        transform = site_transform(cfg, keys[split.name], create=True)
        n = stream_length(split.train, cfg.training.augment_copies)
        for start in range(0, n, CHUNK):
            chunk = training_chunk(
                cfg, split.train, models[split.name], transform, start, min(n, start + CHUNK)
            )
            coordinator.add_chunk(split.name, chunk)
    collected = time.perf_counter() - started
    started = time.perf_counter()
    for r in range(max(cfg.training.umn_rounds, 1)):
        loss = coordinator.train_round()
        coordinator.save_checkpoint(run / "checkpoints")
        log(f"{run.name}: UMN round {r + 1} loss {loss:.4f}")
    umn_s = time.perf_counter() - started
    results, per_image = {}, []
    for split in sites:
        transform = site_transform(cfg, keys[split.name], create=True)
        t0 = time.perf_counter()
        query = query_chunk(split.test, models[split.name], transform, 0, len(split.test))
        mapped = coordinator.map_query(split.name, query)
        pred = segment_mapped(cfg, models[split.name], transform, mapped, split.test.images)
        per_image.append((time.perf_counter() - t0) / max(len(split.test), 1))
        results[split.name] = evaluate_predictions(split.test, pred)
    metrics: dict = {
        "config": cfg.to_dict(),
        "sites": results,
        "mean": mean_over_sites(results),
        "timing_s": {
            "latent_collection": collected,
            "umn_training": umn_s,
            "query_end_to_end_per_image": sum(per_image) / len(per_image),
        },
        "lab": "library-level run (fedseg.attacks.lab): autoencoders shared across modes",
    }
    write_results(run, metrics)
    log(f"{run.name}: mean Dice {metrics['mean']['dice']:.3f}")
    return metrics


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, help="scenario TOML (or use --from-run)")
    parser.add_argument("--from-run", type=Path, help="reuse this finished run's site AEs")
    parser.add_argument("--out", type=Path, required=True, help="folder for <name>-<mode> runs")
    parser.add_argument("--modes", nargs="+", default=["none", "klt", "knt"])
    parser.add_argument("--custody", default="client", choices=["client", "server"])
    for name in ("ae_epochs", "umn_rounds", "umn_epochs_per_round", "augment_copies", "threads"):
        parser.add_argument(
            "--" + name.replace("_", "-"), type=int, help=f"override training.{name}"
        )
    args = parser.parse_args()
    if args.from_run:
        cfg = load_run_config(args.from_run)
        source = args.from_run
    elif args.config:
        cfg = load_config(args.config)
        source = args.out / f"{cfg.name}-autoencoders"
    else:
        parser.error("give --config or --from-run")
    cfg.privacy.custody = args.custody
    for name in ("ae_epochs", "umn_rounds", "umn_epochs_per_round", "augment_copies", "threads"):
        if getattr(args, name) is not None:
            setattr(cfg.training, name, getattr(args, name))
    torch.set_num_threads(max(1, cfg.training.threads))
    aes = shared_autoencoders(cfg, source)
    for mode in args.modes:
        suffix = "" if args.custody == "client" else "-server"
        build_run(cfg, mode, aes, args.out / f"{cfg.name}-{mode}{suffix}")


if __name__ == "__main__":
    main()
