"""Phase 3: the server trains the unified mapping network, with a checkpoint every round."""

from __future__ import annotations

from pathlib import Path

from fedseg.coordinator import Coordinator
from strategies.common import log


class MappingTraining:
    def __init__(self, coordinator: Coordinator, checkpoint_dir: Path) -> None:
        self.coordinator = coordinator
        self.checkpoint_dir = checkpoint_dir

    def run(self, rounds: int) -> list[float]:
        losses = []
        for r in range(rounds):
            loss = self.coordinator.train_round()
            path = self.coordinator.save_checkpoint(self.checkpoint_dir)
            log.info("UMN round %d/%d: latent MSE %.4f (checkpoint %s)", r + 1, rounds, loss, path)
            losses.append(loss)
        return losses
