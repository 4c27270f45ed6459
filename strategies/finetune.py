"""Phase 3b (opt-in, ``training.finetune_epochs``): split-learning fine-tuning over messages.

Each step is two exchanges with every site that has a batch left in the epoch:
``train.finetune_forward`` (the site applies the previous step's encoder gradient, if any, and
sends keyed image latents) and ``train.finetune_backward`` (the site decodes the mapped latents
and sends the loss gradient). fedseg/finetune.py has the why and the maths; this is plumbing.
A site that fails or sends a bad payload drops out; the others go on.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
from flwr.app import ConfigRecord, RecordDict
from flwr.serverapp import Grid
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from fedseg.coordinator import Coordinator
from fedseg.finetune import finetune_steps
from strategies.common import Federation, arrays_of, exchange, log, to_record

FINAL_STEP = -1  # a forward request with this step only applies the last gradient and saves


class SplitFinetuning:
    def __init__(
        self, coordinator: Coordinator, checkpoint_dir: Path, timeout_s: float | None
    ) -> None:
        self.coordinator = coordinator
        self.checkpoint_dir = checkpoint_dir
        self.timeout_s = timeout_s
        self.seconds = 0.0

    def run(self, grid: Grid, federation: Federation) -> list[float]:
        """Mean training loss of each epoch."""
        started = time.perf_counter()
        epochs = self.coordinator.cfg.training.finetune_epochs
        batch = self.coordinator.cfg.training.batch_size
        steps = {n: finetune_steps(s.n_train, batch) for n, s in federation.sites.items()}
        pending: dict[int, tuple[int, int, dict[str, np.ndarray]]] = {}
        losses: list[float] = []
        columns = (TextColumn("fine-tuning"), BarColumn(), TextColumn("{task.fields[status]}"))
        with Progress(*columns, TimeElapsedColumn(), transient=True) as progress:
            task = progress.add_task("finetune", total=epochs, status="")
            for epoch in range(epochs):
                epoch_losses: list[float] = []
                for step in range(max(steps.values(), default=0)):
                    active = [n for n in federation.sites if step < steps[n]]
                    epoch_losses += self._step(grid, federation, active, epoch, step, pending)
                losses.append(float(np.mean(epoch_losses)) if epoch_losses else float("nan"))
                progress.update(task, completed=epoch + 1, status=f"loss {losses[-1]:.4f}")
                log.info("fine-tuning epoch %d/%d: Dice+CE %.4f", epoch + 1, epochs, losses[-1])
            final = [n for n in pending if n in federation.sites]
            self._forward(grid, federation, final, FINAL_STEP, FINAL_STEP, pending)
        path = self.coordinator.save_checkpoint(self.checkpoint_dir, {"finetuned": epochs})
        self.seconds = time.perf_counter() - started
        log.info("fine-tuned UMN saved to %s (%.0f s)", path, self.seconds)
        return losses

    def _forward_request(
        self,
        node_id: int,
        epoch: int,
        step: int,
        pending: dict[int, tuple[int, int, dict[str, np.ndarray]]],
    ) -> RecordDict:
        epochs = self.coordinator.cfg.training.finetune_epochs
        request = {"epoch": epoch, "epochs": epochs, "step": step, "start": epoch == 0 == step}
        content = RecordDict()
        if node_id in pending:
            prev_epoch, prev_step, grad = pending.pop(node_id)
            request.update({"grad_epoch": prev_epoch, "grad_step": prev_step})
            content["grad"] = to_record(grad)
        content["request"] = ConfigRecord(request)
        return content

    def _forward(self, grid, federation, nodes, epoch, step, pending) -> dict:
        """Apply each site's pending encoder gradient; ask for the step's latents (if any)."""
        replies, failed = exchange(
            grid,
            nodes,
            "train.finetune_forward",
            lambda n: self._forward_request(n, epoch, step, pending),
            self.timeout_s,
        )
        for node_id, reason in failed.items():
            federation.drop(node_id, "fine-tuning", reason)
        return replies

    def _step(self, grid, federation, active, epoch, step, pending) -> list[float]:
        names = {n: federation.sites[n].name for n in active}
        replies = self._forward(grid, federation, active, epoch, step, pending)
        mapped = {}
        for node_id, reply in replies.items():
            try:
                latents = arrays_of(reply.content.array_records["latents"])
                mapped[node_id] = self.coordinator.finetune_forward(names[node_id], latents)
            except (KeyError, ValueError) as err:
                federation.drop(node_id, "fine-tuning", f"bad latents: {err}")
        epochs = self.coordinator.cfg.training.finetune_epochs
        request = ConfigRecord({"epoch": epoch, "epochs": epochs, "step": step})
        replies, failed = exchange(
            grid,
            list(mapped),
            "train.finetune_backward",
            lambda n: RecordDict({"mapped": to_record(mapped[n]), "request": request}),
            self.timeout_s,
        )
        for node_id, reason in failed.items():
            federation.drop(node_id, "fine-tuning", reason)
        grads, losses, by_name = {}, [], {}
        for node_id, reply in replies.items():
            try:
                grads[names[node_id]] = arrays_of(reply.content.array_records["grad"])
                losses.append(float(reply.content.metric_records["metrics"]["loss"]))
                by_name[names[node_id]] = node_id
            except KeyError as err:
                federation.drop(node_id, "fine-tuning", f"reply without {err}")
        answers, refused = self.coordinator.finetune_backward(grads, epoch, epochs)
        for name, reason in refused.items():
            federation.drop(by_name[name], "fine-tuning", f"bad gradient: {reason}")
        for name, grad in answers.items():
            pending[by_name[name]] = (epoch, step, grad)
        return losses
