"""UMN studies on fixed site autoencoders: what a change does to Dice, round by round.

Training the sites' autoencoders is the slow part of a run (about 10 minutes a site for
us-nerve on this machine); the mapping network is what most questions are about. This script
takes the sites' AEs from a cache (``--ae-cache``, the same files ``suite.py --dice`` keeps;
trained with ``site.train_site`` when missing), collects keyed latents through the project's own
calls (``site.training_chunk``, ``Coordinator.add_chunk``), trains the UMN round by round with
``Coordinator.train_round`` and scores every site's held-out test split after each round
(``site.query_chunk`` -> ``Coordinator.map_query`` -> ``site.segment_mapped``, MONAI metrics).

Examples::

    # KLT against KNT on the same AEs (client custody, the scenario's budget)
    python benchmarks/umn_study.py --ae-cache DIR --set privacy.transform=klt
    python benchmarks/umn_study.py --ae-cache DIR --set privacy.transform=knt
    # does pooling help? the UMN trained on one site's latents only
    python benchmarks/umn_study.py --ae-cache DIR --sites us-nerve-1
    # split-learning fine-tuning after the UMN (scored every 5 epochs)
    python benchmarks/umn_study.py --ae-cache DIR --set training.finetune_epochs=40
    # AEs from elsewhere (e.g. federated-averaged ones): {site} is replaced by the site name
    python benchmarks/umn_study.py --ae-files "results/fedavg/ae_{site}.pt"
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from suite import ae_tag  # noqa: E402

from fedseg.config import ConfigError, RunConfig, apply_overrides, load_config  # noqa: E402
from fedseg.coordinator import Coordinator, key_path  # noqa: E402
from fedseg.data import load_federation  # noqa: E402
from fedseg.finetune import SiteFinetuner  # noqa: E402
from fedseg.site import (  # noqa: E402
    SiteModels,
    evaluate_predictions,
    query_chunk,
    segment_mapped,
    site_transform,
    stream_length,
    train_site,
    training_chunk,
)
from simulations.in_process import split_train  # noqa: E402


def parse_assignments(assignments: list[str]) -> dict:
    """``section.key=value`` pairs; values are TOML (a bare word is a string)."""
    import tomllib

    out = {}
    for item in assignments:
        key, sep, text = item.partition("=")
        if not sep or "." not in key:
            raise ConfigError(f"--set {item!r}: expected section.key=value")
        try:
            out[key] = tomllib.loads(f"v = {text}")["v"]
        except tomllib.TOMLDecodeError:  # privacy.transform=knt
            out[key] = text
    return out


def site_aes(cfg: RunConfig, sites, args) -> dict[str, SiteModels]:
    models = {}
    tag = ae_tag(cfg)
    for s in sites:
        source = args.ae_from or s.name
        if args.ae_files:
            path = Path(args.ae_files.format(site=source))
        else:
            path = Path(args.ae_cache) / f"ae_{source}_{tag}.pt"
        m = SiteModels.build(cfg, s.train.num_classes)
        if cfg.training.ae_epochs == 0:  # split training from the seeded initialisation
            m, _ = train_site(cfg, s.train)
        elif path.is_file():
            m.load_state(torch.load(path, weights_only=True))
        elif args.ae_files:
            raise SystemExit(f"{path}: no such AE file")
        else:
            print(f"{s.name}: training AEs (cache miss {path.name})", flush=True)
            m, _ = train_site(cfg, s.train)
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.save(m.state(), path)
        models[s.name] = m
    return models


def score(cfg: RunConfig, sites, models, transforms, coord: Coordinator, split: str) -> dict:
    out = {}
    for s in sites:
        data = s.test if split == "test" else s.train
        query = query_chunk(data, models[s.name], transforms[s.name], 0, len(data))
        mapped = coord.map_query(s.name, query)
        metrics = evaluate_predictions(
            data, segment_mapped(cfg, models[s.name], transforms[s.name], mapped, data.images)
        )
        out[s.name] = {k: metrics[k] for k in ("dice_mean", "hd95_mean", "asd_mean", "dice")}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="simulations/scenarios/us-nerve.toml")
    parser.add_argument("--set", action="append", default=[], help="section.key=value")
    parser.add_argument("--ae-cache", default="results/bench/aes")
    parser.add_argument("--ae-files", default="", help="AE file pattern with {site}")
    parser.add_argument("--ae-from", default="", help="every site uses this site's AEs")
    parser.add_argument("--sites", default="", help="comma-separated subset (default all)")
    parser.add_argument("--train-dice", action="store_true", help="also score training images")
    parser.add_argument("--work", default="", help="keys folder (default a temporary one)")
    parser.add_argument("--finetune-score-every", type=int, default=5)
    parser.add_argument("--out", default="", help="JSON with every round's scores")
    args = parser.parse_args()

    cfg = apply_overrides(load_config(args.config), parse_assignments(args.set))
    torch.set_num_threads(max(1, cfg.training.threads))
    sites = load_federation(cfg)
    if args.sites:
        wanted = args.sites.split(",")
        unknown = set(wanted) - {s.name for s in sites}
        if unknown:
            raise SystemExit(f"--sites: unknown {sorted(unknown)}; have {[s.name for s in sites]}")
        sites = [s for s in sites if s.name in wanted]
    work = Path(args.work or tempfile.mkdtemp(prefix="fedseg-study-"))
    models = site_aes(cfg, sites, args)
    transforms = {
        s.name: site_transform(
            cfg, key_path(work / "keys", s.name, cfg.privacy.key_scope), create=True
        )
        for s in sites
    }
    coord = Coordinator(cfg, [s.name for s in sites], key_dir=work / "keys")
    for s in sites if cfg.training.umn_rounds else []:  # no latent training: nothing to send
        n = stream_length(s.train, cfg.training.augment_copies)
        for a in range(0, n, 128):
            chunk = training_chunk(
                cfg, s.train, models[s.name], transforms[s.name], a, min(a + 128, n)
            )
            coord.add_chunk(s.name, chunk)
    print(f"latents {coord.collected()}; UMN {coord.parameter_count() / 1e6:.2f} M", flush=True)

    started, rounds = time.perf_counter(), []
    for r in range(cfg.training.umn_rounds):
        loss = coord.train_round()
        record = {"round": r + 1, "loss": loss, "seconds": time.perf_counter() - started}
        record["test"] = score(cfg, sites, models, transforms, coord, "test")
        record["test_dice_mean"] = float(np.mean([v["dice_mean"] for v in record["test"].values()]))
        line = f"round {r + 1}: test Dice {record['test_dice_mean']:.3f} " + " / ".join(
            f"{v['dice_mean']:.3f}" for v in record["test"].values()
        )
        if args.train_dice:
            record["train"] = score(cfg, sites, models, transforms, coord, "train")
            train_mean = float(np.mean([v["dice_mean"] for v in record["train"].values()]))
            record["train_dice_mean"] = train_mean
            line += f"; train {train_mean:.3f}"
        print(f"{line} ({record['seconds']:.0f} s)", flush=True)
        rounds.append(record)
    epochs = cfg.training.finetune_epochs
    if epochs:  # split-learning fine-tuning, scored every --finetune-score-every epochs
        started = time.perf_counter()
        tuners = {
            s.name: SiteFinetuner(cfg, s.train, models[s.name], transforms[s.name]) for s in sites
        }

        def on_epoch(epoch: int, total: int, loss: float) -> None:
            if epoch % args.finetune_score_every and epoch != total:
                return
            record = {"finetune_epoch": epoch, "loss": loss}
            record["seconds"] = time.perf_counter() - started
            record["test"] = score(cfg, sites, models, transforms, coord, "test")
            mean = float(np.mean([v["dice_mean"] for v in record["test"].values()]))
            record["test_dice_mean"] = mean
            per_site = " / ".join(f"{v['dice_mean']:.3f}" for v in record["test"].values())
            print(f"fine-tuning epoch {epoch}: loss {loss:.3f}, test Dice {mean:.3f} {per_site}")
            rounds.append(record)

        split_train(coord, tuners, on_epoch)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        result = {
            "command": " ".join(sys.argv),
            "config": cfg.to_dict(),
            "sites": [s.name for s in sites],
            "ae_tag": ae_tag(cfg),
            "rounds": rounds,
        }
        Path(args.out).write_text(json.dumps(result, indent=2))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
