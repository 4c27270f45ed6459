"""Phase 3: the server trains the unified mapping network, with a checkpoint every round."""

from __future__ import annotations

from pathlib import Path

from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from fedseg.coordinator import Coordinator
from strategies.common import log


class MappingTraining:
    def __init__(self, coordinator: Coordinator, checkpoint_dir: Path) -> None:
        self.coordinator = coordinator
        self.checkpoint_dir = checkpoint_dir

    def run(self, rounds: int) -> list[float]:
        losses = []
        epochs = rounds * self.coordinator.cfg.training.umn_epochs_per_round
        columns = (TextColumn("UMN"), BarColumn(), TextColumn("{task.fields[status]}"))
        with Progress(*columns, TimeElapsedColumn(), transient=True) as progress:
            task = progress.add_task("umn", total=epochs, status="")

            def on_epoch(epoch: int, _epochs: int, loss: float) -> None:
                progress.update(task, completed=epoch, status=f"epoch {epoch} loss {loss:.4f}")

            for r in range(rounds):
                loss = self.coordinator.train_round(on_epoch=on_epoch)
                path = self.coordinator.save_checkpoint(self.checkpoint_dir)
                log.info("UMN round %d/%d: latent MSE %.4f (%s)", r + 1, rounds, loss, path)
                losses.append(loss)
        return losses
