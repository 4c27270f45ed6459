"""Phase 3: the server trains the unified mapping network, with a checkpoint every round."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from fedseg.coordinator import Coordinator
from strategies.common import log


class MappingTraining:
    """Runs the rounds still to do (all of them, or those after a resumed checkpoint)."""

    def __init__(self, coordinator: Coordinator, checkpoint_dir: Path, prior_seconds: float = 0.0):
        self.coordinator = coordinator
        self.checkpoint_dir = checkpoint_dir
        self.seconds = prior_seconds  # UMN training time over all sessions of this run
        self.round_seconds: list[dict] = []  # per round: participation and UMN training time

    def run(self, rounds: int, before_round: Callable[[int], str] | None = None) -> list[float]:
        """``before_round(r)`` (1-based) runs the round's participation and returns a status
        line for the progress view (who is in, who dropped)."""
        losses: list[float] = []
        if rounds == 0:  # split training only (the default): no latent-MSE phase to show
            return losses
        per_round = self.coordinator.cfg.training.umn_epochs_per_round
        columns = (TextColumn("UMN"), BarColumn(), TextColumn("{task.fields[status]}"))
        timers = (TimeElapsedColumn(), TimeRemainingColumn())
        with Progress(*columns, *timers, transient=True) as progress:
            task = progress.add_task(
                "umn", total=rounds * per_round, completed=self.coordinator.epoch, status=""
            )

            sites = {"status": ""}  # the current round's participation, if any

            def on_epoch(epoch: int, _epochs: int, loss: float) -> None:
                text = f"epoch {epoch} loss {loss:.4f} {sites['status']}"
                progress.update(task, completed=epoch, status=text)

            for r in range(self.coordinator.round, rounds):
                started = time.perf_counter()
                if before_round is not None:
                    sites["status"] = f"| round {r + 1}/{rounds}: {before_round(r + 1)}"
                    progress.update(task, status=sites["status"])
                contact = time.perf_counter() - started
                started = time.perf_counter()
                loss = self.coordinator.train_round(on_epoch=on_epoch)
                train_s = time.perf_counter() - started
                self.seconds += train_s
                self.round_seconds.append(
                    {"round": r + 1, "participation": contact, "umn": train_s, "loss": loss}
                )
                path = self.coordinator.save_checkpoint(
                    self.checkpoint_dir, {"umn_seconds": self.seconds}
                )
                log.info("UMN round %d/%d: latent MSE %.4f (%s)", r + 1, rounds, loss, path)
                losses.append(loss)
        return losses
