"""``fedseg``: demo, run, keygen.

``demo`` and ``run`` drive the Flower apps through Flower's simulation engine (Ray) and then
train the baselines in the same process, writing one results folder.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.progress import (
    BarColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from fedseg.atomic import write_text_atomic
from fedseg.clierror import fail, fail_lines
from fedseg.config import ConfigError, RunConfig, demo_config, load_config
from fedseg.privacy.keys import KeyFileError, key_fingerprint, read_key_file, write_key_file
from fedseg.results import BASELINE_LABELS, RunResults, SiteScores

# No locals in tracebacks: a secret in a local variable must never reach a terminal or a log.
app = typer.Typer(
    add_completion=False,
    pretty_exceptions_show_locals=False,
    help="Federated segmentation that shares keyed latents.",
)
console = Console()


def _logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.WARNING,
        format="%(message)s",
        handlers=[RichHandler(console=console, show_path=False)],
        force=True,
    )
    logging.getLogger("fedseg").setLevel(logging.INFO if verbose else logging.WARNING)


def execute(cfg: RunConfig, with_baselines: bool = True, debug: bool = False) -> RunResults:
    """Federated run, then baselines; returns the run's results. ``debug``: Flower's notices
    to fedseg's developers too (simulations/engine.py)."""
    from fedseg.data import DataError
    from fedseg.report import load_metrics
    from simulations.engine import simulate

    out = Path(cfg.out_dir)
    console.rule(f"[bold]fedseg: {cfg.name}")
    console.print(f"results -> {out.resolve()}")
    started = time.perf_counter()
    try:
        simulate(cfg, debug=debug)  # checks every site's data first, before Ray starts
    except (DataError, ConfigError) as err:  # the data check lists one problem per line
        raise fail_lines(str(err)) from None
    if not (out / "metrics.json").exists():
        raise typer.Exit(code=_fail("the federated run wrote no metrics.json; see the log above"))
    results = RunResults.from_dict(load_metrics(out))
    wall = time.perf_counter() - started
    b = cfg.baselines
    if with_baselines and (b.centralized_unet or b.local_unet or b.unet3d):
        minutes = _baseline_minutes(cfg, results)
        results = _train_baselines(cfg, minutes, {"federated_wall": wall})
    _summary(results)
    console.print(f"report: {(out / 'report.md').resolve()}")
    keys = Path(cfg.privacy.key_dir or out / "keys")
    if any(keys.glob("*.key")):
        console.print(
            f"[yellow]{keys.resolve()} holds the simulated hospitals' secrets (mode 600): "
            "share metrics.json, report.md and figures/, never that folder or sites/."
        )
    return results


def _baseline_minutes(cfg: RunConfig, results: RunResults) -> float:
    """The federated run's training time (``match_wall_clock``), else ``baselines.minutes``."""
    if cfg.baselines.match_wall_clock:
        return results.timing_s["training_total"] / 60
    return cfg.baselines.minutes


def _train_baselines(cfg: RunConfig, minutes: float, timing: dict[str, float]) -> RunResults:
    """Train the baselines ``cfg.baselines`` enables and add them to the run's results folder.
    The centralized UNet gets ``minutes``; each local UNet that divided by the site count."""
    from fedseg.data import load_federation
    from fedseg.evaluation import mean_over_sites
    from fedseg.reference_runs import centralized_unet, centralized_unet3d, local_unets
    from fedseg.report import add_baselines

    b = cfg.baselines
    sites = load_federation(cfg)
    baselines, timing = {}, dict(timing)
    share = minutes / len(sites)
    runs = [  # (key, label, enabled, trainer, progress units, minutes per unit)
        ("centralized_unet", "centralized UNet", b.centralized_unet, centralized_unet, 1, minutes),
        ("local_unet", "local UNets", b.local_unet, local_unets, len(sites), share),
        ("centralized_unet3d", "centralized 3D UNet", b.unet3d, centralized_unet3d, 1, minutes),
    ]
    with _progress() as progress:
        for key, label, enabled, trainer, units, budget in runs:
            if not enabled:
                continue
            task = progress.add_task(label, total=float(units), epoch=0, loss="-")
            started = time.perf_counter()
            baselines[key], _ = trainer(cfg, sites, budget, _advance(progress, task, budget))
            timing[key] = time.perf_counter() - started
    for block in baselines.values():
        block["mean"] = mean_over_sites(block["sites"])
    return add_baselines(Path(cfg.out_dir), baselines, timing)


def _progress() -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("epoch {task.fields[epoch]}  loss {task.fields[loss]}"),
        TimeElapsedColumn(),
        TextColumn("left"),
        TimeRemainingColumn(),
        console=console,
    )


def _advance(progress: Progress, task, minutes: float):
    """An epoch callback that moves ``task`` by the budget used: epochs, or with a time budget
    whichever runs out first (as ``training.Budget`` stops). Local UNets run one after another
    on the same task, one unit each."""
    state = {"base": 0.0, "last": 0, "started": time.perf_counter()}

    def on_epoch(epoch: int, epochs: int, loss: float) -> None:
        if epoch < state["last"]:  # the next local UNet started
            state["base"] += 1.0
            state["started"] = time.perf_counter()
        state["last"] = epoch
        used = epoch / max(epochs, 1)
        if minutes > 0:
            used = max(used, (time.perf_counter() - state["started"]) / (60 * minutes))
        done = state["base"] + min(used, 1.0)
        progress.update(task, completed=done, epoch=epoch, loss=f"{loss:.4f}")

    return on_epoch


def _summary(results: RunResults) -> None:
    blocks = [(results.method, results.federated)] + [
        (BASELINE_LABELS.get(k, k), b) for k, b in results.baselines.items()
    ]
    sites = list(results.federated.sites)
    table = Table(title="mean foreground Dice / HD95 / ASD per site")
    if len(sites) > 8:  # many hospitals: one row per site instead of a column
        table.add_column("site")
        for name, _ in blocks:
            table.add_column(name)
        for s in sites:
            table.add_row(s, *[_cell(block.sites.get(s)) for _, block in blocks])
        table.add_row("mean", *[_num(block.mean.get("dice")) for _, block in blocks])
    else:
        table.add_column("method")
        for s in sites:
            table.add_column(s)
        table.add_column("mean")
        for name, block in blocks:
            cells = [_cell(block.sites.get(s)) for s in sites]
            table.add_row(name, *cells, _num(block.mean.get("dice")))
    if any(isinstance(block.mean.get("volume"), dict) for _, block in blocks):
        table.title = "per slice: " + str(table.title)
    console.print(table)
    _volume_summary(blocks)


def _volume_summary(blocks: list[tuple[str, Any]]) -> None:
    """Per-volume (3D) means over every test volume, where the sites scored whole volumes."""
    rows = [(name, block.mean.get("volume")) for name, block in blocks]
    rows = [(name, v) for name, v in rows if isinstance(v, dict)]
    if not rows:
        return
    table = Table(title="per volume (3D): Dice per class (mean) / HD95 / ASD")
    for column in ("method", "volumes", "Dice", "HD95", "ASD"):
        table.add_column(column)
    for name, v in rows:
        dice = " / ".join(_num(x) for x in (v.get("dice") or {}).values())
        table.add_row(
            name,
            str(v.get("n_volumes")),
            f"{dice} ({_num(v.get('dice_mean'))})",
            f"{_num(v.get('hd95_mean'), 2)} {v.get('units')}",
            f"{_num(v.get('asd_mean'), 2)} {v.get('units')}",
        )
    console.print(table)


def _cell(site: SiteScores | None) -> str:
    if site is None:
        return "-"
    return (
        f"{_num(site.dice_mean)} / {_num(site.hd95_mean, 1)} / {_num(site.asd_mean, 1)} "
        f"{site.units}"
    )


def _num(x, digits: int = 3) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def _fail(message: str) -> int:
    """Print one error line (``fedseg.clierror``); returns the exit code."""
    return fail(message).exit_code


def _claim(cfg: RunConfig, overwrite: bool) -> None:
    """Refuse another run's results folder (before anything is written), or clear it with
    ``--overwrite``; with ``--resume`` say what resumes."""
    from fedseg.checkpoint import claim_out_dir, describe_resume

    removed = claim_out_dir(cfg, overwrite)
    if removed:
        names = ", ".join(p.name for p in removed)
        console.print(f"--overwrite: removed the earlier run's {names} from {cfg.out_dir}")
    if cfg.resume:
        console.print(describe_resume(cfg), soft_wrap=True)


@app.command()
def demo(
    out: Path = typer.Option(Path("results/demo"), help="results folder"),
    quick_run: bool = typer.Option(
        False, "--quick", help="small and fast (under 3 min on 2 cores)"
    ),
    resume: bool = typer.Option(False, help="continue a killed demo from its checkpoints"),
    overwrite: bool = typer.Option(False, help="replace an earlier run in the results folder"),
    verbose: bool = typer.Option(True, help="show the federation's log"),
    debug: bool = typer.Option(False, help="also Flower's notices to fedseg's developers"),
) -> None:
    """Three synthetic hospitals (the embedded default) through Flower + Ray."""
    _logging(verbose)
    cfg = demo_config(str(out), quick_run)
    cfg.resume = resume
    try:
        _claim(cfg, overwrite)
    except ConfigError as err:
        raise typer.Exit(code=_fail(str(err))) from None
    execute(cfg, debug=debug)


@app.command()
def run(
    config: Path = typer.Option(..., "--config", help="scenario TOML (see simulations/scenarios)"),
    out: Path | None = typer.Option(None, help="results folder (default results/<name>)"),
    custody: str | None = typer.Option(None, help="override privacy.custody: client | server"),
    transform: str | None = typer.Option(None, help="override privacy.transform: none | klt | knt"),
    rho: float | None = typer.Option(None, help="override privacy.inr_rho (mode = 'inr')"),
    baselines: bool = typer.Option(True, help="train the centralized and local UNets too"),
    resume: bool = typer.Option(False, help="continue a killed run from its checkpoints"),
    overwrite: bool = typer.Option(False, help="replace an earlier run in the results folder"),
    verbose: bool = typer.Option(True, help="show the federation's log"),
    debug: bool = typer.Option(False, help="also Flower's notices to fedseg's developers"),
) -> None:
    """Any scenario from a TOML file."""
    _logging(verbose)
    try:
        cfg = load_config(config)
        if custody:
            cfg.privacy.custody = custody  # type: ignore[assignment]
        if transform:
            cfg.privacy.transform = transform  # type: ignore[assignment]
        if rho is not None:
            cfg.privacy.inr_rho = rho
        cfg.out_dir = str(out or Path("results") / cfg.name)
        cfg.resume = resume
        cfg.validate()
        _claim(cfg, overwrite)
    except ConfigError as err:
        raise typer.Exit(code=_fail(str(err))) from None
    execute(cfg, with_baselines=baselines, debug=debug)


@app.command()
def baselines(
    run_dir: Path = typer.Option(..., "--run", help="results folder of a finished `fedseg run`"),
    minutes: float = typer.Option(
        0.0, help="training minutes (0: the run's own training time, or baselines.minutes)"
    ),
    centralized: bool = typer.Option(True, help="the centralized UNet, if the scenario has it"),
    local: bool = typer.Option(True, help="the local UNets, if the scenario has them"),
    unet3d: bool = typer.Option(
        False, "--unet3d", help="also the 3D UNet on native volumes (volume data)"
    ),
) -> None:
    """Train the baselines of a finished run and add them to its results folder: for a run made
    with --no-baselines (two custodies side by side, then one reference), or to re-train them."""
    from fedseg.config import config_from_dict
    from fedseg.report import load_metrics

    _logging(False)
    metrics_file = run_dir / "metrics.json"
    if not metrics_file.is_file():
        raise typer.Exit(code=_fail(f"{metrics_file}: no such file (not a fedseg results folder)"))
    try:
        results = RunResults.from_dict(load_metrics(run_dir))
        cfg = config_from_dict(results.config)
    except (ConfigError, KeyError, ValueError) as err:
        raise typer.Exit(
            code=_fail(f"{metrics_file}: cannot rebuild the run's config: {err}")
        ) from err
    cfg.out_dir = str(run_dir)
    cfg.baselines.centralized_unet &= centralized
    cfg.baselines.local_unet &= local
    cfg.baselines.unet3d |= unet3d
    if not (cfg.baselines.centralized_unet or cfg.baselines.local_unet or cfg.baselines.unet3d):
        raise typer.Exit(code=_fail("no baseline left to train (see --centralized / --local)"))
    budget = minutes if minutes > 0 else _baseline_minutes(cfg, results)
    console.print(f"baselines for {run_dir}: {budget:.1f} min of training")
    _summary(_train_baselines(cfg, budget, {}))
    console.print(f"report: {(run_dir / 'report.md').resolve()}")


@app.command()
def keygen(
    out: Path = typer.Option(..., "--out", help="key file to create (mode 0600)"),
    force: bool = typer.Option(False, help="overwrite an existing key file"),
) -> None:
    """Create a hospital's 256-bit secret. Keep it at the hospital; back it up offline."""
    try:
        path = write_key_file(out, overwrite=force)
    except KeyFileError as err:  # names the file
        raise typer.Exit(code=_fail(str(err))) from None
    except OSError as err:
        raise typer.Exit(code=_fail(f"cannot create {out}: {err.strerror or err}")) from None
    fingerprint = key_fingerprint(read_key_file(path))
    console.print(f"wrote {path} (mode 600), fingerprint {fingerprint}")


@app.command()
def compare(
    runs: list[Path] = typer.Argument(..., help="results folders of finished runs"),
    by: str = typer.Option("privacy.custody", help="config key to group the runs by"),
    out: Path | None = typer.Option(None, help="also write the comparison as markdown here"),
) -> None:
    """Runs side by side, grouped by one config value (e.g. custody), with the spread over their
    repeats (training seeds) and per-seed paired differences."""
    from fedseg.compare import compare_runs

    try:
        comparison = compare_runs(runs, by)
    except (FileNotFoundError, ValueError) as err:
        raise typer.Exit(code=_fail(str(err))) from err
    table = Table(title=f"runs grouped by {by}")
    for column in (by, "runs", "seeds", "mean Dice (sd)", "Dice per run", "HD95", "ASD"):
        table.add_column(column)
    for g in comparison.groups:
        table.add_row(
            g.value,
            str(len(g.runs)),
            ", ".join(map(str, g.seeds)),
            f"{_num(g.mean('dice'))} ({_num(g.sd('dice'))})",
            " / ".join(_num(d) for d in g.dice),
            f"{_num(g.mean('hd95'), 1)} {g.units}",
            f"{_num(g.mean('asd'), 1)} {g.units}",
        )
    console.print(table)
    console.print("also differing: " + (", ".join(comparison.varies) or "nothing"))
    for line in comparison.differences():
        console.print(line)
    if out:
        write_text_atomic(out, comparison.to_markdown())
        console.print(f"wrote {out}")


def _register_attack() -> None:
    from fedseg.attacks.cli import attack

    app.command(name="attack")(attack)


_register_attack()


def _register_serving() -> None:
    from fedseg.serving.cli import segment, serve

    app.command(name="serve")(serve)
    app.command(name="segment")(segment)


_register_serving()


def _register_deploy() -> None:
    from fedseg.deploy.cli import app as deploy_app

    app.add_typer(deploy_app, name="deploy")


_register_deploy()


def main() -> None:
    app()


if __name__ == "__main__":
    main()
