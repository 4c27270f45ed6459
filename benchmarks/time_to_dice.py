"""Time to Dice: the default federated mode against the centralized MONAI UNet, on one machine.

Each point is a whole run given a budget: the federated mode through Flower and Ray with
``--epochs`` split-training epochs (its training wall-clock is the budget), then the
centralized UNet trained on the pooled data for exactly that wall-clock (its cosine schedule
fitted to the budget, as the harness's baselines are). So a curve is "the Dice a user gets
for T minutes of training", evaluation time not counted. A last, longer UNet run gives its
plateau; the figure is the time each system needs to reach the plateau minus 2 pp (linear
interpolation between points), and their ratio.

    .venv/bin/python benchmarks/time_to_dice.py --epochs 20 40 80 120 --out results/bench/ttd-demo
    .venv/bin/python benchmarks/time_to_dice.py --config simulations/scenarios/hippocampus.toml \
        --epochs 10 20 40 --out results/bench/ttd-hippocampus

Writes ``<out>/time_to_dice.json`` and ``<out>/time_to_dice.png``; each run's own results
folder is kept under ``<out>/runs/``. Run it with nothing else heavy on the machine: the
points are timings (the load is recorded beside each).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from fedseg.config import RunConfig, demo_config, load_config  # noqa: E402
from fedseg.data import load_federation  # noqa: E402
from fedseg.evaluation import mean_over_sites  # noqa: E402
from fedseg.reference_runs import centralized_unet  # noqa: E402


def federated_point(cfg: RunConfig, epochs: int, out: Path) -> dict:
    """One federated run of ``epochs`` (no baselines); its training time and Dice."""
    from simulations.engine import simulate

    cfg.training.finetune_epochs = epochs
    cfg.out_dir = str(out)
    cfg.baselines.centralized_unet = cfg.baselines.local_unet = False
    load = os.getloadavg()[0]
    simulate(cfg.validate())
    metrics = json.loads((out / "metrics.json").read_text())
    return {
        "epochs": epochs,
        "seconds": metrics["timing_s"]["training_total"],
        "dice": metrics["mean"]["dice"],
        "load_before": load,
    }


def unet_point(cfg: RunConfig, seconds: float) -> dict:
    """The centralized UNet trained for ``seconds`` on the pooled training data."""
    load = os.getloadavg()[0]
    block, _ = centralized_unet(cfg, load_federation(cfg), seconds / 60)
    return {
        "seconds": block["train_seconds"],
        "epochs": block["epochs"],
        "dice": mean_over_sites(block["sites"])["dice"],
        "load_before": load,
    }


def time_to(points: list[dict], target: float) -> float | None:
    """Seconds at which a curve (sorted by time) first reaches ``target``, by linear
    interpolation from the origin's side; None if it never does."""
    previous = None
    for p in sorted(points, key=lambda q: q["seconds"]):
        if p["dice"] is not None and p["dice"] >= target:
            if previous is None or previous["dice"] is None:
                return p["seconds"]
            span = p["dice"] - previous["dice"]
            frac = (target - previous["dice"]) / span if span > 0 else 1.0
            return previous["seconds"] + frac * (p["seconds"] - previous["seconds"])
        previous = p
    return None


def draw(path: Path, federated: list[dict], unet: list[dict], target: float, name: str) -> None:
    fig = Figure(figsize=(6.4, 4.0), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    for label, points, marker in (
        ("blind split training (Flower + Ray)", federated, "o"),
        ("centralized UNet", unet, "s"),
    ):
        pts = sorted(points, key=lambda q: q["seconds"])
        ax.plot(
            [p["seconds"] / 60 for p in pts], [p["dice"] for p in pts], marker=marker, label=label
        )
    ax.axhline(target, color="grey", linestyle="--", linewidth=1, label="UNet plateau - 2 pp")
    ax.set_xlabel("training wall-clock (min), evaluation not counted")
    ax.set_ylabel("mean foreground Dice (test)")
    ax.set_title(f"Time to Dice: {name}")
    ax.legend(frameon=False, fontsize=8)
    fig.tight_layout()
    fig.savefig(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="scenario TOML (default: the embedded demo)")
    parser.add_argument("--epochs", type=int, nargs="+", default=[20, 40, 80, 120])
    parser.add_argument(
        "--plateau-factor",
        type=float,
        default=2.0,
        help="the UNet's plateau run gets this times the longest federated budget",
    )
    parser.add_argument("--out", type=Path, default=Path("results/bench/time-to-dice"))
    args = parser.parse_args()

    def fresh() -> RunConfig:
        return load_config(args.config) if args.config else demo_config()

    name = fresh().name
    args.out.mkdir(parents=True, exist_ok=True)
    federated, unet = [], []
    for epochs in sorted(args.epochs):
        point = federated_point(fresh(), epochs, args.out / "runs" / f"federated-{epochs}")
        federated.append(point)
        unet.append(unet_point(fresh(), point["seconds"]))
        print(json.dumps({"federated": point, "unet": unet[-1]}), flush=True)
    longest = max(p["seconds"] for p in federated)
    plateau = unet_point(fresh(), args.plateau_factor * longest)
    unet.append(plateau)
    target = max(p["dice"] for p in unet) - 0.02
    t_fed, t_unet = time_to(federated, target), time_to(unet, target)
    result = {
        "scenario": name,
        "federated": federated,
        "unet": unet,
        "unet_plateau": max(p["dice"] for p in unet),
        "target_dice": target,
        "seconds_to_target": {"federated": t_fed, "unet": t_unet},
        "ratio": (t_fed / t_unet) if t_fed and t_unet else None,
        # Not reached within the longest budget: the ratio is at least this.
        "ratio_at_least": (longest / t_unet) if t_fed is None and t_unet else None,
        "cores": os.cpu_count(),
    }
    (args.out / "time_to_dice.json").write_text(json.dumps(result, indent=2))
    draw(args.out / "time_to_dice.png", federated, unet, target, name)
    keys = ("target_dice", "seconds_to_target", "ratio", "ratio_at_least")
    print(json.dumps({k: result[k] for k in keys}))


if __name__ == "__main__":
    main()
