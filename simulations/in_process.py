"""Split training without messages: the phase a federation runs (fedseg/split_training.py), its
sites being in-memory fine-tuners called directly. Studies, benchmarks and tests use it, so what
they measure is the federation's own code; only the transport differs. Weights are averaged by
Flower's ``aggregate_arrayrecords``, as over messages."""

from __future__ import annotations

import secrets
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from flwr.app import ArrayRecord, MetricRecord, RecordDict
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

from fedseg.coordinator import Coordinator
from fedseg.finetune import SiteFinetuner
from fedseg.split_training import (
    BackwardCall,
    ForwardCall,
    Replies,
    SplitTraining,
    answer_backward,
    answer_forward,
)

State = dict[str, torch.Tensor]


@dataclass
class InProcessSites:
    """The sites as fine-tuners in this process. ``strict`` (studies, tests): a site's error,
    a dropped site or a refused reply raises at once; otherwise a site that raises fails its
    step as a Flower client would, and drops and refusals are only recorded."""

    tuners: dict[str, SiteFinetuner]
    strict: bool = True
    run_id: int = field(default_factory=lambda: secrets.randbits(62))  # blind masks' labels
    dropped: dict[str, str] = field(default_factory=dict)
    rejected: list[tuple[str, str, int, int]] = field(default_factory=list)

    def _each(self, calls: dict, answer: Callable) -> Replies:
        replies, failed = {}, {}
        for site, call in calls.items():
            try:
                replies[site] = answer(site, call)
            except Exception as err:
                if self.strict:
                    raise
                failed[site] = f"client error: {type(err).__name__}: {err}"
        return replies, failed

    def forward(self, calls: dict[str, ForwardCall], timeout_s: float | None) -> Replies:
        return self._each(
            calls, lambda site, call: answer_forward(self.tuners[site], site, call, self.run_id)
        )

    def backward(self, calls: dict[str, BackwardCall], timeout_s: float | None) -> Replies:
        return self._each(calls, lambda site, call: answer_backward(self.tuners[site], call))

    def average(self, weights: dict[str, State], counts: dict[str, int]) -> State:
        return weighted_mean(weights, counts)

    def nbytes(self, weights: State) -> int:
        return sum(t.numel() * t.element_size() for t in weights.values())

    def drop(self, site: str, reason: str) -> None:
        if self.strict:
            raise RuntimeError(f"{site} dropped out of split training: {reason}")
        self.dropped[site] = reason

    def reject(self, site: str, reason: str, epoch: int, step: int) -> None:
        if self.strict:
            raise ValueError(f"{site}: reply refused at epoch {epoch} step {step}: {reason}")
        self.rejected.append((site, reason, epoch, step))


def weighted_mean(states: dict[str, State], counts: dict[str, int]) -> State:
    """Flower's weighted mean of the sites' weights (integer buffers come back as floats, and
    a site casts them back to its own dtype on adopting them, as over messages)."""
    records = [
        RecordDict({"weights": ArrayRecord(state), "metrics": MetricRecord({"n": counts[site]})})
        for site, state in states.items()
    ]
    return aggregate_arrayrecords(records, "n").to_torch_state_dict()


def split_train(
    coordinator: Coordinator,
    tuners: dict[str, SiteFinetuner],
    on_epoch: Callable[[int, int, float], None] | None = None,
    strict: bool = True,
) -> list[float]:
    """The whole phase as the config says (``training.finetune_epochs``, ``finetune_share``,
    ``finetune_pipeline``); returns the mean loss of each epoch."""
    sizes = {site: len(tuner.data) for site, tuner in tuners.items()}
    return SplitTraining(coordinator, InProcessSites(tuners, strict), sizes).run(on_epoch)
