"""The centralized MONAI UNet of a scenario, alone: Dice/HD95/ASD per site for a time budget.

`fedseg run` trains it after the federated run (`fedseg baselines --run DIR` adds it to a
finished run); this trains it without one, so the reference can run beside federated runs
that were started with --no-baselines.

    .venv/bin/python benchmarks/reference_unet.py \\
        --config simulations/scenarios/us-nerve.toml --minutes 40 --out unet.json

`--net split-path` trains the federated run's own layers (image encoder -> UMN -> mask decoder,
`fedseg.models.split_path`) the same way: pooled, one copy, no key. The UNet minus it is what
the architecture costs; it minus a federated run is what the federation costs.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fedseg.config import load_config  # noqa: E402
from fedseg.data import load_federation  # noqa: E402
from fedseg.evaluation import mean_over_sites  # noqa: E402
from fedseg.reference_runs import centralized_unet  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="scenario TOML")
    budget = parser.add_mutually_exclusive_group(required=True)
    budget.add_argument("--minutes", type=float, help="training wall-clock")
    budget.add_argument("--epochs", type=int, help="training epochs instead (no time limit)")
    parser.add_argument("--out", default="", help="JSON with the result")
    parser.add_argument(
        "--net",
        choices=["unet", "split-path"],
        default="unet",
        help="the MONAI UNet, or the scenario's split-training layers as one pooled network",
    )
    args = parser.parse_args()
    cfg = load_config(args.config)
    if args.epochs is not None:
        if args.epochs < 1:
            parser.error(f"--epochs must be at least 1, not {args.epochs}")
        cfg.baselines.epochs = args.epochs
    started = time.perf_counter()
    block, _ = centralized_unet(cfg, load_federation(cfg), args.minutes or 0.0, reference=args.net)
    block["mean"] = mean_over_sites(block["sites"])
    block["wall_seconds"] = time.perf_counter() - started
    print(
        f"centralized {args.net} ({block['epochs']} epochs, "
        f"{block['train_seconds'] / 60:.1f} min): "
        f"Dice {block['mean']['dice']:.3f}, HD95 {block['mean']['hd95']:.1f}, "
        f"ASD {block['mean']['asd']:.1f} ({next(iter(block['sites'].values()))['units']})"
    )
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(
            json.dumps({"command": " ".join(sys.argv), "net": args.net, **block}, indent=2)
        )


if __name__ == "__main__":
    main()
