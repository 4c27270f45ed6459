"""Phase 2: pull keyed latents from every hospital, chunk by chunk.

Chunks keep each message small and bounded; a site whose chunk fails is dropped from the phase
without losing what the other sites sent.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from flwr.app import ConfigRecord, RecordDict
from flwr.serverapp import Grid

from fedseg import protocol
from fedseg.protocol import LatentRequest
from strategies.common import Federation, arrays_of, exchange, site_progress

Sink = Callable[[str, dict[str, np.ndarray], int], int]  # (site, arrays, items asked)


class LatentCollection:
    def __init__(self, split: str, chunk_size: int, timeout_s: float | None) -> None:
        self.split = split
        self.chunk_size = chunk_size
        self.timeout_s = timeout_s

    def run(self, grid: Grid, federation: Federation, totals: dict[int, int], sink: Sink) -> int:
        """Ask each node for items [0, totals[node]); hand each chunk to ``sink``. Returns bytes."""
        offset, received = 0, 0
        while True:
            pending = [n for n in federation.sites if totals.get(n, 0) > offset]
            if not pending:
                return received

            def request(node_id: int, start: int = offset) -> RecordDict:
                stop = min(start + self.chunk_size, totals[node_id])
                request = LatentRequest(self.split, start, stop).to_config()
                return RecordDict({protocol.REQUEST: ConfigRecord(request)})

            label = f"latents/{self.split} from {offset}"
            with site_progress(label) as on_reply:
                replies, failed = exchange(
                    grid, pending, protocol.LATENTS_QUERY, request, self.timeout_s, on_reply
                )
            for node_id, reason in failed.items():
                federation.drop(node_id, f"latents/{self.split}", reason)
            for node_id, reply in replies.items():
                asked = min(offset + self.chunk_size, totals[node_id]) - offset
                try:
                    arrays = arrays_of(reply.content.array_records.get(protocol.LATENTS))
                    sink(federation.sites[node_id].name, arrays, asked)
                except ValueError as err:  # malformed payload: refuse it, keep the others
                    federation.drop(node_id, f"latents/{self.split}", f"bad payload: {err}")
                    continue
                received += sum(a.nbytes for a in arrays.values())
            offset += self.chunk_size
