"""``mode = "inr"`` over Flower: pull each site's released chunks, send the trained network back.

The maths is in ``fedseg/obfuscation.py``; these phases only move messages. A site whose
release fails or is malformed is dropped; what the other sites sent stands.
"""

from __future__ import annotations

from flwr.app import ArrayRecord, ConfigRecord, RecordDict
from flwr.serverapp import Grid
from torch import nn

from fedseg import protocol
from fedseg.obfuscation import SharedSet
from fedseg.privacy.inr import chunk_bounds
from fedseg.protocol import LatentRequest
from strategies.common import Federation, arrays_of, exchange, site_progress
from strategies.evaluation import site_metrics


class ReleaseCollection:
    """Chunk k of every site that has one, round after round, until none is left."""

    def __init__(self, chunk: int, timeout_s: float | None) -> None:
        self.chunk = chunk
        self.timeout_s = timeout_s

    def run(self, grid: Grid, federation: Federation, shared: SharedSet) -> int:
        """Fill ``shared``; returns the bytes received."""
        bounds = {n: chunk_bounds(s.n_train, self.chunk) for n, s in federation.sites.items()}
        received, k = 0, 0
        while pending := [n for n in federation.sites if k < len(bounds.get(n, []))]:

            def request(node_id: int, k: int = k) -> RecordDict:
                start, stop = bounds[node_id][k]
                config = LatentRequest("train", start, stop).to_config()
                return RecordDict({protocol.REQUEST: ConfigRecord(config)})

            with site_progress(f"inr releases, chunk {k + 1}") as on_reply:
                replies, failed = exchange(
                    grid, pending, protocol.INR_RELEASE, request, self.timeout_s, on_reply
                )
            for node_id, reason in failed.items():
                federation.drop(node_id, "inr release", reason)
            for node_id, reply in replies.items():
                site = federation.sites[node_id]
                start, stop = bounds[node_id][k]
                try:
                    arrays = arrays_of(reply.content.array_records.get(protocol.RELEASE), "release")
                    fit = dict(reply.content.metric_records.get(protocol.METRICS, {}))
                    shared.add(site.name, start, stop, arrays, fit)
                except ValueError as err:
                    federation.drop(node_id, "inr release", f"bad release: {err}")
                    continue
                received += sum(a.nbytes for a in arrays.values())
            k += 1
        return received


def evaluate_network(
    grid: Grid, federation: Federation, net: nn.Module, timeout_s: float | None
) -> dict[str, dict]:
    """Send the network to every site; each scores it on its own test split (metrics only)."""
    weights = ArrayRecord(net.state_dict())
    with site_progress("evaluation") as on_reply:
        replies, failed = exchange(
            grid,
            list(federation.sites),
            protocol.INR_EVALUATE,
            lambda _: RecordDict({protocol.WEIGHTS: weights}),
            timeout_s,
            on_reply,
        )
    for node_id, reason in failed.items():
        federation.drop(node_id, "evaluation", reason)
    return site_metrics(federation, replies)
