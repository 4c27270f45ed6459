"""Phase 3b (opt-in, ``training.finetune_epochs``): split-learning fine-tuning over messages.

Each step is two exchanges with every site that has a batch left in the epoch:
``train.finetune_forward`` (the site applies the previous step's encoder gradient, if any, and
sends keyed image latents) and ``train.finetune_backward`` (the site decodes the mapped latents
and sends the loss gradient). With ``training.finetune_pipeline`` the backward exchange also
carries the previous step's encoder gradient and brings back the next batch's latents, so a
step is one exchange (plus one per epoch to start). fedseg/finetune.py has the why and the
maths; this is plumbing.
With ``training.finetune_share`` the sites' encoders and decoders are one model. ``blind`` (the
default) collects them after every epoch (a forward request at ``SHARE_STEP``) as masked uint64
vectors, adds them modulo 2^64 (fedseg/privacy/blind.py) and sends the masked sum, with the names
of the sites in it, with each site's next request: the server never holds a readable weight.
``average`` (SplitFed, the reference) collects the weights themselves and sends Flower's
weighted average. A site that fails a training step or sends a bad payload drops out; the
others go on. A site that fails a blind aggregation round
is only absent from that sum: it keeps its own weights and joins the next one.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from fedseg import protocol
from fedseg.coordinator import Coordinator
from fedseg.finetune import finetune_steps
from fedseg.privacy.blind import add_blinded
from fedseg.protocol import BLINDED, FINAL_STEP, SHARE_STEP, FinetuneRequest
from strategies.common import Federation, arrays_of, exchange, log, to_record


class SplitFinetuning:
    def __init__(
        self, coordinator: Coordinator, checkpoint_dir: Path, timeout_s: float | None
    ) -> None:
        self.coordinator = coordinator
        self.checkpoint_dir = checkpoint_dir
        self.timeout_s = timeout_s
        self.seconds = 0.0
        self.share = coordinator.cfg.training.finetune_share
        # Shared weights each site takes with its next message (finetune_share).
        self._adopt: dict[int, ArrayRecord] = {}
        # blind: the masked sum each site unmasks with its next message, with its epoch and
        # the names of the sites added into it.
        self._adopt_blind: dict[int, tuple[ArrayRecord, int, list[str]]] = {}
        self.share_bytes: list[int] = []  # bytes in + out of each epoch's aggregation
        self.share_seconds: list[float] = []  # its wall-clock (the sites' work included)
        self.absent: list[list[str]] = []  # blind: sites missing from each aggregation round

    def run(self, grid: Grid, federation: Federation) -> list[float]:
        """Mean training loss of each epoch."""
        started = time.perf_counter()
        epochs = self.coordinator.cfg.training.finetune_epochs
        batch = self.coordinator.cfg.training.batch_size
        steps = {n: finetune_steps(s.n_train, batch) for n, s in federation.sites.items()}
        pending: dict[int, tuple[int, int, dict[str, np.ndarray]]] = {}
        losses: list[float] = []
        columns = (TextColumn("fine-tuning"), BarColumn(), TextColumn("{task.fields[status]}"))
        timers = (TimeElapsedColumn(), TimeRemainingColumn())
        with Progress(*columns, *timers, transient=True) as progress:
            task = progress.add_task("finetune", total=epochs, status="")
            for epoch in range(epochs):
                if not federation.sites:
                    break
                epoch_losses: list[float] = []
                ahead: dict[int, dict[str, np.ndarray]] = {}  # finetune_pipeline
                for step in range(max(steps[n] for n in federation.sites)):
                    active = [n for n in federation.sites if step < steps[n]]
                    epoch_losses += self._step(
                        grid, federation, active, (epoch, step), pending, ahead, steps
                    )
                share_started = time.perf_counter()
                if self.share == "average":
                    mean = self._collect(grid, federation, list(federation.sites), pending)
                    self._adopt = dict.fromkeys(federation.sites, mean) if mean else {}
                elif self.share == "blind":
                    self._collect_blind(grid, federation, epoch, pending)
                if self.share in ("average", "blind"):
                    self.share_seconds.append(time.perf_counter() - share_started)
                losses.append(float(np.mean(epoch_losses)) if epoch_losses else float("nan"))
                progress.update(task, completed=epoch + 1, status=f"loss {losses[-1]:.4f}")
                log.info("fine-tuning epoch %d/%d: Dice+CE %.4f", epoch + 1, epochs, losses[-1])
            final = [
                n
                for n in federation.sites
                if n in pending or n in self._adopt or n in self._adopt_blind
            ]
            self._forward(grid, federation, final, FINAL_STEP, FINAL_STEP, pending)
        path = self.coordinator.save_checkpoint(self.checkpoint_dir, {"finetuned": epochs})
        self.seconds = time.perf_counter() - started
        log.info("fine-tuned UMN saved to %s (%.0f s)", path, self.seconds)
        return losses

    def _collect(self, grid, federation, nodes, pending) -> ArrayRecord | None:
        """The sites' shared weights (after the gradient each is owed), averaged by Flower's
        ``aggregate_arrayrecords`` weighted by training images; None if no site answered."""
        replies = self._forward(grid, federation, nodes, SHARE_STEP, SHARE_STEP, pending)
        records = []
        # Sites in name order, not reply order: the weighted mean's float sum depends on it.
        for node_id, reply in sorted(replies.items(), key=lambda kv: federation.sites[kv[0]].name):
            if protocol.WEIGHTS in reply.content.array_records and reply.content.metric_records:
                records.append(reply.content)
            else:
                federation.drop(node_id, "fine-tuning", "share reply without weights")
        mean = aggregate_arrayrecords(records, "num-examples") if records else None
        received = sum(_nbytes(r[protocol.WEIGHTS]) for r in records)
        self.share_bytes.append(received + len(federation.sites) * _nbytes(mean))
        return mean

    def _collect_blind(self, grid, federation, epoch: int, pending) -> None:
        """Every site's masked weights, added modulo 2^64; each site gets the masked sum and
        the names of the sites in it with its next request. A site whose reply is not one uint64
        vector of the common length is dropped, never added (it would corrupt the sum)."""
        nodes = list(federation.sites)
        replies, failed = exchange(
            grid,
            nodes,
            protocol.FINETUNE_FORWARD,
            lambda n: self._forward_request(n, SHARE_STEP, SHARE_STEP, pending, epoch),
            self.coordinator.cfg.federation.round_timeout_s or self.timeout_s,
        )
        # A site that fails or misses the deadline is absent from this round only: it keeps
        # its own weights, trains on, and joins the next sum. (A malformed vector is dropped.)
        absent = sorted(federation.sites[n].name for n in failed)
        for node_id, reason in failed.items():
            name = federation.sites[node_id].name
            log.warning("%s absent from aggregation round %d: %s", name, epoch + 1, reason)
        self.absent.append(absent)
        vectors: dict[int, np.ndarray] = {}
        for node_id, reply in replies.items():
            record = reply.content.array_records.get(BLINDED)
            vector = record["sum"].numpy() if record is not None and "sum" in record else None
            if vector is None or vector.dtype != np.uint64 or vector.ndim != 1:
                federation.drop(node_id, "fine-tuning", "share reply without a blinded vector")
            else:
                vectors[node_id] = vector
        lengths = [len(v) for v in vectors.values()]
        common = max(set(lengths), key=lengths.count) if lengths else 0
        for node_id in [n for n, v in vectors.items() if len(v) != common]:
            federation.drop(
                node_id,
                "fine-tuning",
                f"blinded vector of {len(vectors.pop(node_id))} values, not {common}",
            )
        if not vectors:
            return
        total = to_record({"sum": add_blinded(vectors.values())})
        names = sorted(federation.sites[n].name for n in vectors)
        self._adopt_blind = {n: (total, epoch, names) for n in vectors}
        received = sum(v.nbytes for v in vectors.values())
        self.share_bytes.append(received + len(vectors) * _nbytes(total))

    def _forward_request(
        self,
        node_id: int,
        epoch: int,
        step: int,
        pending: dict[int, tuple[int, int, dict[str, np.ndarray]]],
        share_epoch: int | None = None,
    ) -> RecordDict:
        epochs = self.coordinator.cfg.training.finetune_epochs
        request = FinetuneRequest(epoch, epochs, step, start=epoch == 0 == step)
        request.share_epoch = share_epoch
        content = RecordDict()
        if node_id in self._adopt_blind:
            total, request.blind_epoch, request.blind_sites = self._adopt_blind.pop(node_id)
            content[BLINDED] = total
        if node_id in self._adopt:
            content[protocol.WEIGHTS] = self._adopt.pop(node_id)
        if node_id in pending:
            request.grad_epoch, request.grad_step, grad = pending.pop(node_id)
            content[protocol.GRAD] = to_record(grad)
        content[protocol.REQUEST] = ConfigRecord(request.to_config())
        return content

    def _forward(self, grid, federation, nodes, epoch, step, pending, share_epoch=None) -> dict:
        """Apply each site's pending encoder gradient; ask for the step's latents (if any)."""
        replies, failed = exchange(
            grid,
            nodes,
            protocol.FINETUNE_FORWARD,
            lambda n: self._forward_request(n, epoch, step, pending, share_epoch),
            self.timeout_s,
        )
        for node_id, reason in failed.items():
            federation.drop(node_id, "fine-tuning", reason)
        return replies

    def _step(self, grid, federation, active, at, pending, ahead, steps) -> list[float]:
        """One batch at every active site. ``ahead`` holds latents a site sent with its last
        gradient (``training.finetune_pipeline``); the others are asked for theirs first."""
        epoch, step = at
        asked = [n for n in active if n not in ahead]
        if asked:
            for node_id, reply in self._forward(
                grid, federation, asked, epoch, step, pending
            ).items():
                ahead[node_id] = reply.content.array_records.get(protocol.LATENTS)
        mapped = self._map(federation, active, at, ahead)
        replies, failed = exchange(
            grid,
            list(mapped),
            protocol.FINETUNE_BACKWARD,
            lambda n: self._backward_request(n, at, mapped[n], pending, steps),
            self.timeout_s,
        )
        for node_id, reason in failed.items():
            federation.drop(node_id, "fine-tuning", reason)
        pipeline = self.coordinator.cfg.training.finetune_pipeline
        for node_id, reply in replies.items():
            if pipeline and step + 1 < steps[node_id]:
                ahead[node_id] = reply.content.array_records.get(protocol.LATENTS)
        return self._step_server(federation, replies, at, pending)

    def _map(self, federation, active, at, ahead) -> dict[int, dict[str, np.ndarray]]:
        """The server's forward pass of each site's batch; a refused batch is skipped (the
        site goes on with the next step). Sites in name order, not reply order: the server's
        first batch fixes the UMN's input bases, and the order of its updates should not
        depend on who answered first."""
        mapped = {}
        records = {n: ahead.pop(n, None) for n in active}
        names = {n: federation.sites[n].name for n in active if n in federation.sites}
        for node_id, name in sorted(names.items(), key=lambda item: item[1]):
            record = records[node_id]
            try:
                mapped[node_id] = self.coordinator.finetune_forward(name, arrays_of(record))
            except ValueError as err:
                federation.reject(node_id, "fine-tuning", f"latents: {err}", **_where(at))
        return mapped

    def _backward_request(self, node_id, at, mapped, pending, steps) -> RecordDict:
        """The mapped latents to decode; pipelined, also the last batch's encoder gradient
        and the ask for the next batch."""
        epoch, step = at
        request = FinetuneRequest(epoch, self.coordinator.cfg.training.finetune_epochs, step)
        content = RecordDict({protocol.MAPPED: to_record(mapped)})
        if self.coordinator.cfg.training.finetune_pipeline:
            if node_id in pending:
                request.grad_epoch, request.grad_step, grad = pending.pop(node_id)
                content[protocol.GRAD] = to_record(grad)
            if step + 1 < steps[node_id]:
                request.next_step = step + 1
        content[protocol.REQUEST] = ConfigRecord(request.to_config())
        return content

    def _step_server(self, federation, replies, at, pending) -> list[float]:
        """The UMN's backward pass and step on the sites' gradients; each site is owed the
        gradient for its image latents. Returns the sites' losses."""
        epoch, step = at
        grads, losses, by_name = {}, [], {}
        # Sites in name order, not reply order: the losses' order (and their float mean) and
        # the order of the gradients the UMN sums must not depend on who answered first.
        for node_id, reply in sorted(replies.items(), key=lambda kv: federation.sites[kv[0]].name):
            name = federation.sites[node_id].name
            try:
                grad = arrays_of(reply.content.array_records.get(protocol.GRAD), protocol.GRAD)
                loss = float(reply.content.metric_records[protocol.METRICS]["loss"])
                if not np.isfinite(loss) or loss < 0:
                    raise ValueError(f"loss {loss} is not a loss")
            except (KeyError, TypeError, ValueError) as err:
                federation.reject(node_id, "fine-tuning", f"gradient: {err}", **_where(at))
                continue
            grads[name], by_name[name] = grad, node_id
            losses.append(loss)
        epochs = self.coordinator.cfg.training.finetune_epochs
        answers, refused = self.coordinator.finetune_backward(grads, epoch, epochs)
        for name, reason in refused.items():
            federation.reject(by_name[name], "fine-tuning", f"gradient: {reason}", **_where(at))
        for name, grad in answers.items():
            pending[by_name[name]] = (epoch, step, grad)
        return losses


def _where(at: tuple[int, int]) -> dict[str, int]:
    return {"epoch": at[0] + 1, "step": at[1] + 1}  # 1-based, as the log says


def _nbytes(record: ArrayRecord | None) -> int:
    return sum(a.numpy().nbytes for a in record.values()) if record is not None else 0
