"""Per-UMN-round participation: each round the server asks every hospital for fresh latents.

A round in this pipeline is one UMN round. Before it, every hospital that trained its
autoencoders is asked for the next items of its training stream (new augmented copies) or,
with ``round_items = 0``, a heartbeat. A hospital that errors or misses the deadline is listed
as dropped in that round and simply sends nothing new; the server still trains on what it
holds, so the round goes on with the rest. The next round asks it again: if it answers it has
rejoined, and continues its stream where it left off.
"""

from __future__ import annotations

from flwr.app import ConfigRecord, RecordDict
from flwr.serverapp import Grid

from fedseg import protocol
from fedseg.coordinator import Coordinator
from fedseg.protocol import RoundRequest
from strategies.common import Federation, arrays_of, exchange, log


class RoundParticipation:
    def __init__(
        self,
        coordinator: Coordinator,
        federation: Federation,
        items_per_round: dict[int, int],
        deadline_s: float | None,
    ) -> None:
        self.coordinator = coordinator
        self.federation = federation
        self.items = items_per_round  # node -> items asked for each round
        self.deadline_s = deadline_s
        collected = coordinator.collected()
        self.next_item = {n: collected.get(s.name, 0) for n, s in federation.sites.items()}
        self.down: set[int] = set()  # nodes that missed the previous round
        self.history: list[dict] = []

    def run(self, grid: Grid, rnd: int) -> dict:
        """Round ``rnd`` (1-based); returns its record (present, dropped, rejoined sites)."""
        roster = sorted(self.federation.sites)

        def request(node_id: int) -> RecordDict:
            start = self.next_item[node_id]
            stop = start + self.items.get(node_id, 0)
            ask = RoundRequest(rnd, start, stop, deadline_s=float(self.deadline_s or 0.0))
            return RecordDict({protocol.REQUEST: ConfigRecord(ask.to_config())})

        replies, failed = exchange(grid, roster, protocol.ROUND, request, self.deadline_s)
        names = {n: self.federation.sites[n].name for n in roster}
        for node_id, reply in replies.items():
            if protocol.LATENTS in reply.content.array_records:
                try:
                    arrays = arrays_of(reply.content.array_records[protocol.LATENTS])
                    self.next_item[node_id] += self.coordinator.add_chunk(
                        names[node_id], arrays, self.items.get(node_id, 0)
                    )
                except ValueError as err:  # malformed payload: refuse it, count as dropped
                    failed[node_id] = f"bad payload: {err}"
        for node_id, reason in failed.items():
            log.warning("%s dropped out of UMN round %d: %s", names[node_id], rnd, reason)
            self.federation.dropped.append(
                {"phase": "umn_round", "round": rnd, "site": names[node_id], "reason": reason}
            )
        present = [n for n in roster if n not in failed]
        rejoined = [names[n] for n in present if n in self.down]
        for name in rejoined:
            log.info("%s rejoined in UMN round %d", name, rnd)
        self.down = set(failed)
        record = {
            "round": rnd,
            "present": [names[n] for n in present],
            "dropped": sorted(names[n] for n in failed),
            "rejoined": rejoined,
        }
        self.history.append(record)
        return record
