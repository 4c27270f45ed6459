"""Phase 3: the server trains the unified mapping network, with a checkpoint every round."""

from __future__ import annotations

import time
from pathlib import Path

from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from fedseg.coordinator import Coordinator
from strategies.common import log


class MappingTraining:
    """Runs the rounds still to do (all of them, or those after a resumed checkpoint)."""

    def __init__(self, coordinator: Coordinator, checkpoint_dir: Path, prior_seconds: float = 0.0):
        self.coordinator = coordinator
        self.checkpoint_dir = checkpoint_dir
        self.seconds = prior_seconds  # UMN training time over all sessions of this run

    def run(self, rounds: int) -> list[float]:
        losses = []
        per_round = self.coordinator.cfg.training.umn_epochs_per_round
        columns = (TextColumn("UMN"), BarColumn(), TextColumn("{task.fields[status]}"))
        with Progress(*columns, TimeElapsedColumn(), transient=True) as progress:
            task = progress.add_task(
                "umn", total=rounds * per_round, completed=self.coordinator.epoch, status=""
            )

            def on_epoch(epoch: int, _epochs: int, loss: float) -> None:
                progress.update(task, completed=epoch, status=f"epoch {epoch} loss {loss:.4f}")

            for r in range(self.coordinator.round, rounds):
                started = time.perf_counter()
                loss = self.coordinator.train_round(on_epoch=on_epoch)
                self.seconds += time.perf_counter() - started
                path = self.coordinator.save_checkpoint(
                    self.checkpoint_dir, {"umn_seconds": self.seconds}
                )
                log.info("UMN round %d/%d: latent MSE %.4f (%s)", r + 1, rounds, loss, path)
                losses.append(loss)
        return losses
