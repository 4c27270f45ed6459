"""Time to Dice: the default federated mode against the centralized MONAI UNet, on one machine.

One command, one run of each system, each scored on the held-out test images at regular
intervals with its clock paused while it is scored:

- **fedseg**: the scenario's split training in this process (``simulations/in_process.py``:
  the federation's own code, its sites called directly), scored every ``--every`` epochs (and
  at epochs 1, 2, 4, ... before the first of those) with the model the sites hold after that
  epoch's aggregation. Its clock is the compute only. A
  short run of the same phase through Flower and Ray (``--flower-epochs``) gives seconds per
  epoch as a federation pays them (messages, Ray, site workers, key guard; from the epochs'
  end times after the first) and the sites' start-up, and the curve is also drawn on that
  clock: the two runs are one computation (tests/test_split_training.py:
  the same losses to 1e-5 and the same models), so only the time per epoch differs.
- **centralized UNet**: the harness's baseline recipe on the pooled training images for
  ``--unet-minutes`` (its cosine schedule fitted to that budget), scored every
  ``--unet-every`` seconds of training (and at an eighth, a quarter and half of that first).

The Flower clock starts with split training; the hospitals' registration before it (their
workers starting, loading torch and the data) is reported beside it, and a ratio with it
counted (``ratio_flower_with_registration``; the UNet's clock leaves out its data loading too).

Reported: the UNet's plateau (its best score), the target (plateau - 2 pp), the time each
system first reaches it (linear interpolation between scores), and their ratio, on the
Flower clock and on the compute clock. Writes ``<out>/time_to_dice.json`` and
``<out>/time_to_dice.png``. Run it with nothing else heavy on the machine (the load is
recorded beside each part)::

    .venv/bin/python benchmarks/time_to_dice.py --out results/bench/ttd-demo
    .venv/bin/python benchmarks/time_to_dice.py --config simulations/scenarios/us-nerve.toml \\
        --every 20 --unet-minutes 40 --out results/bench/ttd-us-nerve

``--fedseg-only`` draws fedseg's in-process curve alone, to compare variants by Dice
(``--set training.local_batch_norm=true``); ``--at 4,8,12`` scores it at those epochs only
and stops after the last, so a variant's early curve costs only those epochs.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from benchmarks.split_epoch import _override  # noqa: E402
from fedseg.config import RunConfig, apply_overrides, demo_config, load_config  # noqa: E402
from fedseg.coordinator import Coordinator, key_path  # noqa: E402
from fedseg.data import SiteData, SiteSplit, load_federation  # noqa: E402
from fedseg.evaluation import mean_over_sites  # noqa: E402
from fedseg.finetune import SiteFinetuner, split_epochs  # noqa: E402
from fedseg.reference_runs import reference_net  # noqa: E402
from fedseg.site import (  # noqa: E402
    evaluate_predictions,
    query_chunk,
    segment_mapped,
    site_blinder,
    site_transform,
    train_site,
)
from fedseg.training import Budget, predict, train_segmenter  # noqa: E402
from simulations.in_process import split_train, weighted_mean  # noqa: E402


class PausedClock:
    """Training seconds, not counting the time spent scoring."""

    def __init__(self) -> None:
        self.start, self.paused = time.perf_counter(), 0.0

    def seconds(self) -> float:
        return time.perf_counter() - self.start - self.paused

    def scoring(self, score: Callable[[], dict]) -> dict:
        started = time.perf_counter()
        try:
            return score()
        finally:
            self.paused += time.perf_counter() - started


def scored_epoch(epoch: int, every: int) -> bool:
    """fedseg is scored every ``every`` epochs, and at epochs 1, 2, 4, ... before that, so that
    a system that reaches the target early is timed closely, not at its first regular score."""
    return epoch % every == 0 or (epoch < every and epoch & (epoch - 1) == 0)


def next_score_at(last: float, every_s: float) -> float:
    """The UNet's next score, in training seconds after its last one (0: none yet): at
    ``every_s`` / 8, / 4, / 2, then every ``every_s``, for the same reason."""
    return min(2 * last, last + every_s) if last > 0 else every_s / 8


def score_point(sites: list[SiteSplit], predict_site: Callable[[SiteSplit], object]) -> dict:
    """Mean foreground Dice over sites (unweighted, as metrics.json's ``mean``), per site."""
    metrics = {s.name: evaluate_predictions(s.test, predict_site(s)) for s in sites}
    per_site = {name: m["dice_mean"] for name, m in metrics.items()}
    return {"dice": mean_over_sites(metrics)["dice"], "sites": per_site}


class _Stopped(Exception):
    """Raised after the last epoch ``at`` asks for: the rest of the phase is not run."""


def federated_curve(
    cfg: RunConfig, sites: list[SiteSplit], every: int, keys: Path, at: list[int] | None = None
) -> dict:
    """Split training in process, scored at :func:`scored_epoch` and after the last epoch.
    With ``at``, scored at those epochs only and stopped after the last of them: a variant's
    early curve without its whole phase (the learning-rate schedule stays fitted to the whole
    phase, so its points are the whole run's)."""
    torch.set_num_threads(cfg.training.threads)
    tuners, transforms = {}, {}
    for s in sites:
        models, _ = train_site(cfg, s.train)  # the seeded initialisation a hospital starts from
        key = key_path(keys, s.name, cfg.privacy.key_scope)
        transforms[s.name] = site_transform(cfg, key, create=True)
        blinder = site_blinder(cfg, key, s.name, create=True)
        tuners[s.name] = SiteFinetuner(cfg, s.train, models, transforms[s.name], blinder)
    coordinator = Coordinator(cfg, [s.name for s in sites])
    sizes = {name: len(t.data) for name, t in tuners.items()}

    def held_models(name: str):
        """What a site holds after the epoch's aggregation (its next call adopts the sum)."""
        tuner = tuners[name]
        if cfg.training.finetune_share == "none":
            return tuner.models
        shared = {n: t.shared_state() for n, t in tuners.items()}
        floats = {
            n: {k: v for k, v in st.items() if v.is_floating_point()} for n, st in shared.items()
        }
        held = copy.deepcopy(tuner.models)
        held.load_state({**held.state(), **weighted_mean(floats, sizes)})
        return held

    def predict_site(s: SiteSplit):
        models, transform = held_models(s.name), transforms[s.name]
        mapped = coordinator.map_query(
            s.name, query_chunk(s.test, models, transform, 0, len(s.test))
        )
        return segment_mapped(cfg, models, transform, mapped, s.test.images)

    clock, points = PausedClock(), []
    load = os.getloadavg()[0]

    def on_epoch(epoch: int, total: int, loss: float) -> None:
        wanted = epoch in at if at else scored_epoch(epoch, every) or epoch == total
        if wanted:
            seconds = clock.seconds()
            point = clock.scoring(lambda: score_point(sites, predict_site))
            points.append({"epoch": epoch, "seconds": seconds, "loss": loss, **point})
            print(
                f"fedseg epoch {epoch}/{total}: Dice {point['dice']:.3f}, loss {loss:.3f}, "
                f"at {seconds:.0f} s",
                flush=True,
            )
        if at and epoch >= max(at):
            raise _Stopped

    try:
        split_train(coordinator, tuners, on_epoch)
    except _Stopped:
        pass
    return {"points": points, "load_before": load, "threads": cfg.training.threads}


def flower_rate(cfg: RunConfig, epochs: int, out: Path) -> dict:
    """Seconds per split-training epoch through Flower and Ray (no baselines), from the
    epochs' end times after the first, and the first epoch's extra (the sites' start-up)."""
    from simulations.engine import simulate

    if epochs < 3:
        raise SystemExit("--flower-epochs: at least 3 (the first one holds the start-up)")
    cfg.training.finetune_epochs = epochs
    cfg.out_dir = str(out)
    cfg.baselines.centralized_unet = cfg.baselines.local_unet = cfg.baselines.unet3d = False
    load = os.getloadavg()[0]
    simulate(cfg.validate())
    metrics = json.loads((out / "metrics.json").read_text())
    ends = metrics["epoch_end_seconds"]
    rate = (ends[-1] - ends[0]) / (len(ends) - 1)
    return {
        "epochs": epochs,
        "seconds_per_epoch": rate,
        "start_up_seconds": ends[0] - rate,
        # Before split training's clock starts: the hospitals' registration (their workers
        # start, load torch and the data, and build the seeded models there since 815be2e).
        "registration_seconds": metrics["timing_s"]["autoencoders"],
        "epoch_end_seconds": ends,
        "load_before": load,
        "load_after": os.getloadavg()[0],
    }


def unet_curve(cfg: RunConfig, sites: list[SiteSplit], minutes: float, every_s: float) -> dict:
    """The centralized UNet's recipe (``reference_runs.fit_reference``) for ``minutes`` of
    training, scored at :func:`next_score_at` and at the end."""
    pooled = SiteData.concat([s.train for s in sites], "pooled")
    b = cfg.baselines
    net = reference_net(cfg, pooled, cfg.training.seed)
    budget = Budget(10**6, minutes)
    points: list[dict] = []
    load = os.getloadavg()[0]

    def on_epoch(epoch: int, total: int, loss: float) -> None:
        seconds = budget.elapsed()
        last = points[-1]["seconds"] if points else 0.0
        if seconds < next_score_at(last, every_s) and not budget.done(epoch):
            return
        started = time.perf_counter()
        point = score_point(sites, lambda s: predict(net, s.test.images))
        net.train()
        budget.start += time.perf_counter() - started  # scoring is not training time
        points.append({"epoch": epoch, "seconds": seconds, "loss": loss, **point})
        print(f"UNet epoch {epoch}: Dice {point['dice']:.3f} at {seconds:.0f} s", flush=True)

    train_segmenter(
        net,
        pooled.images,
        pooled.masks,
        pooled.num_classes,
        budget,
        b.lr,
        cfg.training.batch_size,
        cfg.training.seed,
        on_epoch,
    )
    return {"points": points, "load_before": load, "minutes": minutes}


def time_to(points: list[dict], target: float, clock: str = "seconds") -> float | None:
    """Seconds at which a curve (sorted by time) first reaches ``target``, by linear
    interpolation from the previous score (from the origin's side for the first); None if it
    never does."""
    previous = None
    for p in sorted(points, key=lambda q: q[clock]):
        if p["dice"] is not None and p["dice"] >= target:
            if previous is None or previous["dice"] is None:
                return p[clock]
            span = p["dice"] - previous["dice"]
            frac = (target - previous["dice"]) / span if span > 0 else 1.0
            return previous[clock] + frac * (p[clock] - previous[clock])
        previous = p
    return None


def summarise(name: str, fed: dict, rate: dict, unet: dict) -> dict:
    for p in fed["points"]:
        p["flower_seconds"] = rate["start_up_seconds"] + p["epoch"] * rate["seconds_per_epoch"]
    plateau = max(p["dice"] for p in unet["points"])
    target = plateau - 0.02
    t_unet = time_to(unet["points"], target)
    t_flower = time_to(fed["points"], target, "flower_seconds")
    t_compute = time_to(fed["points"], target)
    registration = rate.get("registration_seconds")
    t_registered = None if t_flower is None or registration is None else t_flower + registration
    last = fed["points"][-1]

    def ratio(t: float | None) -> float | None:
        return t / t_unet if t is not None and t_unet else None

    return {
        "scenario": name,
        "fedseg": fed,
        "flower": rate,
        "unet": unet,
        "unet_plateau": plateau,
        "target_dice": target,
        "seconds_to_target": {
            "unet": t_unet,
            "fedseg_flower": t_flower,
            "fedseg_compute": t_compute,
            "fedseg_flower_with_registration": t_registered,
        },
        "ratio_flower": ratio(t_flower),
        "ratio_flower_with_registration": ratio(t_registered),
        "ratio_compute": ratio(t_compute),
        # Not reached: the ratio is at least the whole run's time over the UNet's.
        "ratio_flower_at_least": ratio(last["flower_seconds"]) if t_flower is None else None,
        "fedseg_final_dice": last["dice"],
        "cores": os.cpu_count(),
    }


def draw(path: Path, result: dict) -> None:
    fig = Figure(figsize=(6.4, 4.0), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    fed, unet = result["fedseg"]["points"], result["unet"]["points"]
    curves = (
        (fed, "flower_seconds", dict(fmt="o-", color="C0", label="fedseg, through Flower + Ray")),
        (fed, "seconds", dict(fmt=":", color="C0", label="fedseg, compute only (in process)")),
        (unet, "seconds", dict(fmt="s-", color="C1", label="centralized UNet")),
    )
    for points, clock, style in curves:
        fmt = style.pop("fmt")
        x, y = [p[clock] / 60 for p in points], [p["dice"] for p in points]
        ax.plot(x, y, fmt, ms=3, **style)
    ax.axhline(
        result["target_dice"],
        color="grey",
        linestyle="--",
        linewidth=1,
        label="UNet plateau - 2 pp",
    )
    ax.set_xlabel("training wall-clock (min), scoring not counted")
    ax.set_ylabel("mean foreground Dice (test)")
    ax.set_title(f"Time to Dice: {result['scenario']}")
    ax.legend(frameon=False, fontsize=8)
    fig.tight_layout()
    fig.savefig(path)


def _epochs(text: str) -> list[int]:
    """``--at``'s value: epochs, comma-separated, each at least 1."""
    try:
        epochs = sorted({int(e) for e in text.split(",")})
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of epochs: {text!r}") from None
    if not epochs or epochs[0] < 1:
        raise argparse.ArgumentTypeError(f"epochs start at 1: {text!r}")
    return epochs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="scenario TOML (default: the embedded demo)")
    parser.add_argument("--every", type=int, default=10, help="score fedseg every N epochs")
    parser.add_argument(
        "--flower-epochs", type=int, default=20, help="epochs of the Flower run that times an epoch"
    )
    parser.add_argument(
        "--unet-minutes",
        type=float,
        default=0.0,
        help="the UNet's budget (default: fedseg's whole run on the Flower clock)",
    )
    parser.add_argument(
        "--unet-every",
        type=float,
        default=0.0,
        help="score the UNet every N training seconds (default: budget / 20)",
    )
    parser.add_argument(
        "--unet-from",
        type=Path,
        help="take the UNet's curve from an earlier time_to_dice.json of the same scenario "
        "(a variant of fedseg against one UNet run; say so beside the figures)",
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.FIELD=JSON",
        help="any config field, e.g. --set training.finetune_pipeline=false",
    )
    parser.add_argument(
        "--fedseg-only",
        action="store_true",
        help="only fedseg's in-process curve (no Flower timing, no UNet): for comparing "
        "variants of fedseg by Dice; writes <out>/fedseg_curve.json",
    )
    parser.add_argument(
        "--at",
        type=_epochs,
        metavar="E1,E2,...",
        help="with --fedseg-only: score at these epochs only and stop after the last "
        "(the schedule stays fitted to the whole phase)",
    )
    parser.add_argument("--out", type=Path, default=Path("results/bench/time-to-dice"))
    args = parser.parse_args()
    overrides = dict(_override(item) for item in args.set)

    def fresh() -> RunConfig:
        cfg = load_config(args.config) if args.config else demo_config()
        return apply_overrides(cfg, overrides).validate()

    if args.at and not args.fedseg_only:
        parser.error("--at needs --fedseg-only (a ratio needs the whole curve)")
    cfg = fresh()
    args.out.mkdir(parents=True, exist_ok=True)
    sites = load_federation(cfg)
    epochs = split_epochs(cfg.training, [len(s.train) for s in sites])
    print(f"fedseg: {epochs} epochs of split training", flush=True)
    if args.at and max(args.at) > epochs:
        parser.error(f"--at: epoch {max(args.at)} is past the phase's {epochs} epochs")
    if args.fedseg_only:
        with tempfile.TemporaryDirectory() as keys:
            fed = federated_curve(cfg, sites, args.every, Path(keys), args.at)
        fed = {"command": " ".join(sys.argv), "scenario": cfg.name, **fed}
        (args.out / "fedseg_curve.json").write_text(json.dumps(fed, indent=2))
        last = fed["points"][-1]
        print(f"fedseg Dice {last['dice']:.3f} at epoch {last['epoch']} of {epochs}")
        return
    rate = flower_rate(fresh(), min(args.flower_epochs, epochs), args.out / "flower")
    print(f"through Flower: {rate['seconds_per_epoch']:.2f} s an epoch", flush=True)
    with tempfile.TemporaryDirectory() as keys:
        fed = federated_curve(cfg, sites, args.every, Path(keys))
    minutes = (
        args.unet_minutes or (rate["start_up_seconds"] + epochs * rate["seconds_per_epoch"]) / 60
    )
    if args.unet_from:
        earlier = json.loads(args.unet_from.read_text())
        if earlier["scenario"] != cfg.name:
            raise SystemExit(
                f"--unet-from: {args.unet_from} is {earlier['scenario']!r}, not {cfg.name!r}"
            )
        unet = {**earlier["unet"], "from": str(args.unet_from)}
    else:
        unet = unet_curve(fresh(), sites, minutes, args.unet_every or minutes * 3)
    result = {"command": " ".join(sys.argv), **summarise(cfg.name, fed, rate, unet)}
    (args.out / "time_to_dice.json").write_text(json.dumps(result, indent=2))
    draw(args.out / "time_to_dice.png", result)
    keys_shown = (
        "unet_plateau",
        "target_dice",
        "seconds_to_target",
        "ratio_flower",
        "ratio_compute",
        "ratio_flower_at_least",
        "fedseg_final_dice",
    )
    print(json.dumps({k: result[k] for k in keys_shown}, indent=2))


if __name__ == "__main__":
    main()
