"""``fedseg attack``: run one attack (or all) against finished run folders."""

from __future__ import annotations

import time
from pathlib import Path

import typer
from rich.console import Console

console = Console()
ATTACKS = (
    "server-inversion",
    "surrogate",
    "cross-decoder",
    "inversion",
    "key-recovery",
    "membership",
    "reid",
)
CHOICES = (*ATTACKS, "all", "tradeoff")


def attack(
    run: list[Path] = typer.Option(..., "--run", help="run folder (repeat for --attack tradeoff)"),
    name: str = typer.Option(..., "--attack", help=" | ".join(CHOICES)),
    victim: int | None = typer.Option(None, help="victim site index (default attack.victim)"),
    epochs: int | None = typer.Option(None, help="override inversion and re-id training epochs"),
    out: Path | None = typer.Option(None, help="tradeoff: where to write (default first run)"),
) -> None:
    """Attack a finished run; results go into its attacks.md, metrics.json and figures/."""
    import torch

    from fedseg.attacks import report
    from fedseg.attacks.context import RunContext, RunFolderError, load_run_config

    if name not in CHOICES:
        raise typer.BadParameter(f"unknown attack {name!r}; choose one of {', '.join(CHOICES)}")
    try:
        if name == "tradeoff":
            from fedseg.attacks import tradeoff

            target = out or run[0]
            result, md = tradeoff.run(run, target)
            report.record(target, "tradeoff", result, md)
            console.print(md)
            return
        for folder in run:
            if load_run_config(folder).mode == "inr":
                _attack_inr(folder, name, victim, epochs)
                continue
            ctx = RunContext.load(folder)
            torch.manual_seed(ctx.cfg.attack.seed)
            torch.set_num_threads(max(1, ctx.cfg.training.threads))
            if victim is not None:
                ctx.cfg.attack.victim = victim
            if epochs is not None:
                ctx.cfg.attack.inversion_epochs = ctx.cfg.attack.reid_epochs = epochs
            for one in ATTACKS if name == "all" else (name,):
                if one == "reid" and name == "all" and ctx.cfg.data.kind != "nifti":
                    console.print("reid: skipped (needs a volume data set: patients = volumes)")
                    continue
                started = time.perf_counter()
                result, md = _run(one, ctx)
                result["seconds"] = time.perf_counter() - started
                report.record(ctx.run, one, result, md)
                console.print(md)
    except (RunFolderError, ValueError) as err:
        console.print(f"[red]error:[/red] {err}")
        raise typer.Exit(code=2) from err


def _attack_inr(folder: Path, name: str, victim: int | None, epochs: int | None) -> None:
    """The attacks that apply to the inr mode (fedseg/attacks/obfuscation.py)."""
    import torch

    from fedseg.attacks import obfuscation, report

    view = obfuscation.InrView.load(folder)
    torch.manual_seed(view.cfg.attack.seed)
    torch.set_num_threads(max(1, view.cfg.training.threads))
    if victim is not None:
        view.cfg.attack.victim = victim
    if epochs is not None:
        view.cfg.attack.reid_epochs = epochs
    for one in obfuscation.ATTACKS if name == "all" else (name,):
        if one == "reid" and name == "all" and view.cfg.data.kind != "nifti":
            console.print("reid: skipped (needs a volume data set: patients = volumes)")
            continue
        started = time.perf_counter()
        result, md = obfuscation.run(view, one)
        result["seconds"] = time.perf_counter() - started
        report.record(view.run, one, result, md)
        console.print(md)


def _run(name: str, ctx) -> tuple[dict, str]:
    from fedseg.attacks import (
        crossdecoder,
        inversion,
        key_recovery,
        membership,
        reid,
        server_inversion,
        surrogate,
    )

    modules = {
        "server-inversion": server_inversion,
        "surrogate": surrogate,
        "cross-decoder": crossdecoder,
        "inversion": inversion,
        "key-recovery": key_recovery,
        "membership": membership,
        "reid": reid,
    }
    return modules[name].run(ctx)
