"""Per-volume figures of a volume scenario: the default mode, the centralized 2D UNet and the
centralized 3D UNet, with and without 2.5D input, in one process.

The default mode (blind split training) runs in process (``simulations.in_process.split_train``:
the calls the Flower strategy makes, in the same order, without messages), then every site
scores its test volumes through the inference path (keyed query -> the server's mapping ->
un-key, decode) with the run's metrics (per slice and per volume). The centralized UNet and,
with ``--unet3d``, the 3D UNet get the split training's wall-clock. Each ``--context`` value
writes a results folder (``metrics.json``, ``report.md``) under ``--out``, as ``fedseg run``
does, with the load average beside each stage.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/volume_study.py \\
        --config simulations/scenarios/hippocampus.toml --context 1 3 --unet3d \\
        --out results/bench/hippocampus-volumes
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fedseg.config import RunConfig, load_config  # noqa: E402
from fedseg.coordinator import Coordinator  # noqa: E402
from fedseg.data import SiteSplit, load_federation  # noqa: E402
from fedseg.evaluation import mean_over_sites  # noqa: E402
from fedseg.finetune import SiteFinetuner  # noqa: E402
from fedseg.reference_runs import centralized_unet, centralized_unet3d  # noqa: E402
from fedseg.report import add_baselines, federated_metrics  # noqa: E402
from fedseg.site import (  # noqa: E402
    query_chunk,
    score_test,
    segment_mapped,
    site_blinder,
    site_transform,
    train_site,
)
from simulations.in_process import split_train  # noqa: E402


def load() -> float:
    return round(os.getloadavg()[0], 2)


def default_mode(cfg: RunConfig, sites: list[SiteSplit]) -> tuple[dict, float, dict]:
    """Blind split training in process, then each site's test split through the inference
    path; (per-site metrics, training seconds, loads)."""
    key = Path(cfg.out_dir) / "keys" / "federation.key"
    tuners, transforms = {}, {}
    for s in sites:
        models, _ = train_site(cfg, s.train)  # the seeded start every site shares
        transforms[s.name] = site_transform(cfg, key, create=True)
        blinder = site_blinder(cfg, key, s.name, create=True)
        tuners[s.name] = SiteFinetuner(cfg, s.train, models, transforms[s.name], blinder)
    coord = Coordinator(cfg, list(tuners))
    loads = {"before": load()}
    started = time.perf_counter()

    def on_epoch(epoch: int, epochs: int, loss: float) -> None:
        print(f"  epoch {epoch}/{epochs}: loss {loss:.3f} ({load()} load)", flush=True)

    split_train(coord, tuners, on_epoch)
    seconds = time.perf_counter() - started
    loads["after"] = load()
    metrics = {}
    for s in sites:
        models = tuners[s.name].models
        models.image_ae.eval()
        models.mask_ae.eval()
        with torch.no_grad():
            query = query_chunk(s.test, models, transforms[s.name], 0, len(s.test))
            mapped = coord.map_query(s.name, query)
            pred = segment_mapped(cfg, models, transforms[s.name], mapped, s.test.images)
        where = (cfg.out_dir, s.name, "blind split training")
        metrics[s.name] = score_test(cfg, s.test, pred, where)
    return metrics, seconds, loads


def summary(label: str, mean: dict) -> str:
    vol = mean.get("volume") or {}
    dice = vol.get("dice") or {}
    return (
        f"{label}: per slice Dice {mean['dice']:.3f}; per volume Dice "
        + " / ".join(f"{c} {v:.3f}" for c, v in dice.items())
        + f" (mean {vol.get('dice_mean', float('nan')):.3f}), HD95 {vol.get('hd95_mean'):.2f}, "
        f"ASD {vol.get('asd_mean'):.2f} {vol.get('units')}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="scenario TOML with volume data")
    parser.add_argument("--context", type=int, nargs="+", default=[1], help="slices per sample")
    parser.add_argument("--epochs", type=int, default=0, help="split-training epochs (0: as set)")
    parser.add_argument("--unet3d", action="store_true", help="also the 3D UNet (first context)")
    parser.add_argument("--no-unet", action="store_true", help="skip the centralized 2D UNet")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    for i, context in enumerate(args.context):
        cfg = load_config(args.config)
        cfg.data.context_slices = context
        for source in cfg.sources.values():
            source.context_slices = context
        if args.epochs:
            cfg.training.finetune_epochs = args.epochs
        cfg.out_dir = str(args.out / f"context-{context}")
        cfg.validate()
        torch.set_num_threads(cfg.training.threads)
        sites = load_federation(cfg)
        print(f"context {context}: {', '.join(str(s.test) for s in sites)}", flush=True)
        metrics, seconds, loads = default_mode(cfg, sites)
        timing = {"training_total": seconds}
        results = federated_metrics(
            cfg, metrics, timing, 0, [], command=" ".join(sys.argv), load=loads
        )
        print(summary(f"blind split training ({seconds / 60:.1f} min)", results.federated.mean))
        baselines: dict[str, dict] = {}
        runs = [] if args.no_unet else [("centralized_unet", centralized_unet)]
        if args.unet3d and i == 0:
            runs.append(("centralized_unet3d", centralized_unet3d))
        for name, train in runs:
            before = load()
            started = time.perf_counter()
            block, _ = train(cfg, sites, seconds / 60)
            block["mean"] = mean_over_sites(block["sites"])
            block["load"] = {"before": before, "after": load()}
            timing[name] = time.perf_counter() - started
            baselines[name] = block
            print(summary(f"{name} ({block['epochs']} epochs)", block["mean"]), flush=True)
        if baselines:
            add_baselines(Path(cfg.out_dir), baselines, timing)
        print(f"wrote {cfg.out_dir}/metrics.json and report.md", flush=True)


if __name__ == "__main__":
    main()
