"""Phase 4: the inference path on every test split; only metrics come back.

Each site sends keyed test image latents, the server maps them, the site un-keys, decodes and
scores its own predictions. Images, masks and predictions never leave the site.
"""

from __future__ import annotations

import json
import time

import numpy as np
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from fedseg import protocol
from fedseg.coordinator import Coordinator
from fedseg.privacy import ckks
from fedseg.protocol import SegmentRequest
from fedseg.results import SiteScores
from fedseg.wire import check_fields, unpack
from strategies.common import Federation, arrays_of, exchange, site_progress, to_record
from strategies.latents import LatentCollection


class SegmentationEvaluation:
    def __init__(
        self,
        coordinator: Coordinator,
        chunk_size: int,
        timeout_s: float | None,
    ) -> None:
        self.coordinator = coordinator
        self.chunk_size = chunk_size
        self.timeout_s = timeout_s
        self.query_bytes, self.queries = 0, 0  # encrypted: ciphertext bytes and images received

    def run(self, grid: Grid, federation: Federation) -> tuple[dict[str, dict], float]:
        """Per-site metrics, and the server's mapping time per query (seconds)."""
        if self.coordinator.cfg.privacy.query == "ckks":
            return self.run_encrypted(grid, federation)
        queries: dict[str, list[dict[str, np.ndarray]]] = {}

        def collect(site: str, arrays: dict[str, np.ndarray], asked: int) -> int:
            check_fields(arrays, ("image",), len(self.coordinator.shapes))
            unpack(arrays, "image", self.coordinator.shapes, max_items=asked)
            queries.setdefault(site, []).append(arrays)
            return len(next(iter(arrays.values())))

        totals = {n: s.n_test for n, s in federation.sites.items()}
        LatentCollection("test", self.chunk_size, self.timeout_s).run(
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

        with site_progress("evaluation") as on_reply:
            replies, failed = exchange(
                grid,
                list(mapped),
                protocol.SEGMENT,
                lambda n: RecordDict({protocol.MAPPED: to_record(mapped[n])}),
                self.timeout_s,
                on_reply,
            )
        for node_id, reason in failed.items():
            federation.drop(node_id, "evaluation", reason)
        return site_metrics(federation, replies), map_seconds / max(n_items, 1)

    def run_encrypted(self, grid: Grid, federation: Federation) -> tuple[dict[str, dict], float]:
        """``privacy.query = "ckks"``: each site (whose CKKS public keys came with its
        registration) sends the ciphertexts of its test latents chunk by chunk; the server maps
        them encrypted and sends the mapped ciphertexts back for the site to decrypt, decode
        and score."""
        chunk = min(self.chunk_size, CKKS_CHUNK)
        parts: dict[int, list[dict[str, np.ndarray]]] = {}
        map_seconds, n_items, offset = 0.0, 0, 0
        while pending := [n for n, s in federation.sites.items() if s.n_test > offset]:
            stop = {n: min(offset + chunk, federation.sites[n].n_test) for n in pending}
            with site_progress(f"encrypted queries from {offset}") as on_reply:
                replies, failed = exchange(
                    grid,
                    pending,
                    protocol.SEGMENT,
                    lambda n, o=offset, s=stop: _segment_step(protocol.SEGMENT_QUERY, o, s[n]),
                    self.timeout_s,
                    on_reply,
                )
            for node_id, reason in failed.items():
                federation.drop(node_id, CKKS_PHASE, reason)
            for node_id, reply in replies.items():
                started = time.perf_counter()
                try:
                    out = self._map_encrypted(federation, node_id, reply, stop[node_id] - offset)
                except (KeyError, ValueError) as err:
                    federation.drop(node_id, CKKS_PHASE, f"bad encrypted query: {err}")
                    parts.pop(node_id, None)
                    continue
                map_seconds += time.perf_counter() - started
                n_items += stop[node_id] - offset
                parts.setdefault(node_id, []).append(out)
            offset += chunk

        mapped = {n: ckks.concat(p) for n, p in parts.items() if n in federation.sites}

        def decode(node_id: int) -> RecordDict:
            content = _segment_step(protocol.SEGMENT_DECODE)
            content[protocol.MAPPED] = to_record(mapped[node_id])
            return content

        with site_progress("evaluation") as on_reply:
            replies, failed = exchange(
                grid, list(mapped), protocol.SEGMENT, decode, self.timeout_s, on_reply
            )
        for node_id, reason in failed.items():
            federation.drop(node_id, CKKS_PHASE, reason)
        return site_metrics(federation, replies), map_seconds / max(n_items, 1)

    def _map_encrypted(
        self, federation: Federation, node_id: int, reply: Message, asked: int
    ) -> dict[str, np.ndarray]:
        """One chunk of a site's encrypted queries, mapped; counts its ciphertext bytes."""
        query = arrays_of(reply.content.array_records[protocol.CKKS_QUERY], protocol.CKKS_QUERY)
        out = self.coordinator.map_encrypted(federation.sites[node_id].name, query, asked)
        if int(json.loads(out[ckks.HEADER].tobytes())["items"]) != asked:
            raise ValueError(f"the query does not hold the {asked} images asked for")
        self.query_bytes += sum(a.nbytes for a in query.values())
        self.queries += asked
        return out


def _segment_step(step: str, start: int = 0, stop: int = 0) -> RecordDict:
    request = SegmentRequest(step, start, stop)
    return RecordDict({protocol.REQUEST: ConfigRecord(request.to_config())})


CKKS_PHASE = "evaluation (ckks)"
CKKS_CHUNK = 16  # images per encrypted query message (0.74 MiB each at 128 px)


def site_metrics(federation: Federation, replies: dict[int, Message]) -> dict[str, dict]:
    """Each replying site's checked metrics; a site whose metrics are refused is dropped."""
    metrics = {}
    for node_id, reply in replies.items():
        site = federation.sites[node_id]
        try:
            text = str(reply.content.config_records[protocol.RESULT]["metrics_json"])
            metrics[site.name] = checked_metrics(text, site.n_test)
        except (KeyError, ValueError) as err:  # forged or malformed: refused, the others stand
            federation.drop(node_id, "evaluation", f"metrics refused: {err}")
    return metrics


def _check_scores(metrics: dict, where: str) -> None:
    for name in ("dice", "hd95", "asd"):
        per_class = metrics.get(name, {})
        values = [metrics.get(f"{name}_mean")]
        values += list(per_class.values()) if isinstance(per_class, dict) else [per_class]
        for value in values:
            if value is None:
                continue
            if not isinstance(value, (int, float)) or not np.isfinite(value) or value < 0:
                raise ValueError(f"{where}{name} = {value!r} is not a score")
            if name == "dice" and value > 1:
                raise ValueError(f"{where}dice = {value} is outside [0, 1]")


def checked_metrics(text: str, n_test: int) -> dict:
    """A site's evaluation metrics, refused unless they are JSON, scores are scores (Dice in
    [0, 1], distances >= 0) and the image count is the one the site registered."""
    try:
        metrics = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"no metrics JSON ({err})") from err
    if not isinstance(metrics, dict):
        raise ValueError("metrics JSON is not an object")
    _check_scores(metrics, "")
    volume = metrics.get("volume")
    if volume is not None:  # per-volume scores of whole test volumes (fedseg/evaluation.py)
        if not isinstance(volume, dict):
            raise ValueError("volume metrics are not an object")
        _check_scores(volume, "volume ")
    if metrics.get("n_test") != n_test:
        raise ValueError(f"scored {metrics.get('n_test')} images, registered {n_test}")
    SiteScores.from_dict(metrics)  # every field the results record needs, or refused by name
    return metrics
