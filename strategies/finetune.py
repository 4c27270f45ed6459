"""Split training over Flower messages: the phase itself is ``fedseg/split_training.py``; this
module is its :class:`~fedseg.split_training.SiteLink` (requests to records and back) and the
progress line. Replies are decoded here, and what does not decode is handed on as a problem
the phase refuses by name, not raised."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from fedseg import protocol
from fedseg.coordinator import Coordinator
from fedseg.split_training import (
    BackwardCall,
    BackwardReply,
    ForwardCall,
    ForwardReply,
    Replies,
    SplitTraining,
)
from strategies.common import Federation, arrays_of, exchange, log, to_record

PHASE = "fine-tuning"


class FlowerSites:
    """The sites of a federation, reached through the grid. Weights travel as Flower's
    ``ArrayRecord`` and are averaged by Flower's ``aggregate_arrayrecords``."""

    def __init__(self, grid: Grid, federation: Federation) -> None:
        self.grid, self.federation = grid, federation
        self.node = {site.name: node_id for node_id, site in federation.sites.items()}

    def _exchange(self, message_type: str, calls: dict, encode, timeout_s) -> tuple[dict, dict]:
        site_of = {self.node[s]: s for s in calls}
        replies, failed = exchange(
            self.grid,
            list(site_of),
            message_type,
            lambda node_id: encode(calls[site_of[node_id]]),
            timeout_s,
        )
        return (
            {site_of[n]: r for n, r in replies.items()},
            {site_of[n]: reason for n, reason in failed.items()},
        )

    def forward(self, calls: dict[str, ForwardCall], timeout_s: float | None) -> Replies:
        replies, failed = self._exchange(protocol.FINETUNE_FORWARD, calls, _forward, timeout_s)
        return {s: _forward_reply(r) for s, r in replies.items()}, failed

    def backward(self, calls: dict[str, BackwardCall], timeout_s: float | None) -> Replies:
        replies, failed = self._exchange(protocol.FINETUNE_BACKWARD, calls, _backward, timeout_s)
        return {s: _backward_reply(r) for s, r in replies.items()}, failed

    def average(self, weights: dict[str, RecordDict], counts: dict[str, int]) -> ArrayRecord:
        return aggregate_arrayrecords(list(weights.values()), "num-examples")

    def nbytes(self, weights: Any) -> int:
        record = weights[protocol.WEIGHTS] if isinstance(weights, RecordDict) else weights
        return sum(a.numpy().nbytes for a in record.values())

    def drop(self, site: str, reason: str) -> None:
        self.federation.drop(self.node[site], PHASE, reason)

    def reject(self, site: str, reason: str, epoch: int, step: int) -> None:
        self.federation.reject(self.node[site], PHASE, reason, epoch=epoch, step=step)


def _forward(call: ForwardCall) -> RecordDict:
    content = RecordDict()
    if call.blinded_sum is not None:
        content[protocol.BLINDED] = to_record({"sum": call.blinded_sum})
    if call.weights is not None:
        content[protocol.WEIGHTS] = call.weights
    if call.grad is not None:
        content[protocol.GRAD] = to_record(call.grad)
    content[protocol.REQUEST] = ConfigRecord(call.request.to_config())
    return content


def _backward(call: BackwardCall) -> RecordDict:
    content = RecordDict({protocol.MAPPED: to_record(call.mapped)})
    if call.owed is not None:
        content[protocol.GRAD] = to_record(call.owed)
    content[protocol.REQUEST] = ConfigRecord(call.request.to_config())
    return content


def _latents(reply: Message, answer: ForwardReply | BackwardReply) -> None:
    record = reply.content.array_records.get(protocol.LATENTS)
    if record is None:
        return
    try:
        answer.latents = arrays_of(record)
    except ValueError as err:
        answer.problems["latents"] = str(err)


def _forward_reply(reply: Message) -> ForwardReply:
    """The weights stay a record (content and its ``num-examples``) for Flower's mean."""
    content = reply.content
    answer = ForwardReply(done=protocol.DONE in content.config_records)
    _latents(reply, answer)
    blinded = content.array_records.get(protocol.BLINDED)
    if blinded is not None:
        vector = blinded["sum"].numpy() if "sum" in blinded else None
        answer.blinded = vector if isinstance(vector, np.ndarray) else None
    if protocol.WEIGHTS in content.array_records and content.metric_records:
        answer.weights = content
    return answer


def _backward_reply(reply: Message) -> BackwardReply:
    content = reply.content
    answer = BackwardReply(grad=None, loss=float("nan"))
    try:
        answer.grad = arrays_of(content.array_records.get(protocol.GRAD), protocol.GRAD)
    except ValueError as err:
        answer.problems["grad"] = str(err)
    try:
        answer.loss = float(content.metric_records[protocol.METRICS]["loss"])
    except (KeyError, TypeError, ValueError) as err:
        answer.problems["loss"] = f"no loss: {err}"
    _latents(reply, answer)
    return answer


class SplitFinetuning:
    """Phase 3 of a run (the default): split training over the grid, with a progress line and
    the UMN's checkpoint at the end."""

    def __init__(
        self, coordinator: Coordinator, checkpoint_dir: Path, timeout_s: float | None
    ) -> None:
        self.coordinator = coordinator
        self.checkpoint_dir = checkpoint_dir
        self.timeout_s = timeout_s
        self.seconds = 0.0
        self.share_bytes: list[int] = []
        self.share_seconds: list[float] = []
        self.absent: list[list[str]] = []
        self.epoch_end_seconds: list[float] = []  # since the phase began, at each epoch's end

    def run(self, grid: Grid, federation: Federation) -> list[float]:
        """Mean training loss of each epoch."""
        started = time.perf_counter()
        cfg = self.coordinator.cfg
        sizes = {site.name: site.n_train for site in federation.sites.values()}
        phase = SplitTraining(
            self.coordinator,
            FlowerSites(grid, federation),
            sizes,
            self.timeout_s,
            cfg.federation.round_timeout_s or self.timeout_s,
        )
        columns = (TextColumn("fine-tuning"), BarColumn(), TextColumn("{task.fields[status]}"))
        timers = (TimeElapsedColumn(), TimeRemainingColumn())
        with Progress(*columns, *timers, transient=True) as progress:
            task = progress.add_task("finetune", total=phase.epochs, status="")

            def on_epoch(done: int, epochs: int, loss: float) -> None:
                self.epoch_end_seconds.append(time.perf_counter() - started)
                progress.update(task, completed=done, status=f"loss {loss:.4f}")

            losses = phase.run(on_epoch)
        self.share_bytes, self.share_seconds = phase.share_bytes, phase.share_seconds
        self.absent = phase.absent
        path = self.coordinator.save_checkpoint(self.checkpoint_dir, {"finetuned": phase.epochs})
        self.seconds = time.perf_counter() - started
        log.info("fine-tuned UMN saved to %s (%.0f s)", path, self.seconds)
        return losses
