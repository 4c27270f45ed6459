"""Phase 4: the inference path on every test split; only metrics come back.

Each site sends keyed test image latents, the server maps them, the site un-keys, decodes and
scores its own predictions. Images, masks and predictions never leave the site.
"""

from __future__ import annotations

import json
import time

import numpy as np
from flwr.app import ConfigRecord, RecordDict
from flwr.serverapp import Grid

from fedseg.coordinator import Coordinator
from strategies.common import Federation, exchange, site_progress, to_record
from strategies.latents import LatentCollection


class SegmentationEvaluation:
    def __init__(
        self,
        coordinator: Coordinator,
        chunk_size: int,
        timeout_s: float | None,
        models: str = "",
    ) -> None:
        self.coordinator = coordinator
        self.chunk_size = chunk_size
        self.timeout_s = timeout_s
        # "last-epoch": the sites' and the server's last split-training epoch instead of their
        # weight average (the caller swaps the UMN: Coordinator.last_epoch_umn).
        self.models = models

    def run(self, grid: Grid, federation: Federation) -> tuple[dict[str, dict], float]:
        """Per-site metrics, and the server's mapping time per query (seconds)."""
        queries: dict[str, list[dict[str, np.ndarray]]] = {}

        def collect(site: str, arrays: dict[str, np.ndarray]) -> int:
            queries.setdefault(site, []).append(arrays)
            return len(next(iter(arrays.values())))

        totals = {n: s.n_test for n, s in federation.sites.items()}
        LatentCollection("test", self.chunk_size, self.timeout_s, self.models).run(
            grid, federation, totals, collect
        )

        mapped, map_seconds, n_items = {}, 0.0, 0
        for node_id, site in list(federation.sites.items()):
            if site.name not in queries:
                continue
            started = time.perf_counter()
            try:
                parts = [
                    self.coordinator.map_query(site.name, q) for q in queries.get(site.name, [])
                ]
            except ValueError as err:
                federation.drop(node_id, "evaluation", f"bad query: {err}")
                continue
            map_seconds += time.perf_counter() - started
            n_items += site.n_test
            mapped[node_id] = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

        request = ConfigRecord({"models": self.models})
        with site_progress(f"evaluation {self.models}".strip()) as on_reply:
            replies, failed = exchange(
                grid,
                list(mapped),
                "evaluate.segment",
                lambda n: RecordDict({"mapped": to_record(mapped[n]), "request": request}),
                self.timeout_s,
                on_reply,
            )
        for node_id, reason in failed.items():
            federation.drop(node_id, "evaluation", reason)
        metrics = {
            federation.sites[n].name: json.loads(
                str(r.content.config_records["result"]["metrics_json"])
            )
            for n, r in replies.items()
        }
        return metrics, map_seconds / max(n_items, 1)
