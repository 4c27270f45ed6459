"""The message plumbing every phase shares: send to many nodes, keep who answered and who not."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
from flwr.app import Array, ArrayRecord, Message, RecordDict
from flwr.serverapp import Grid
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from fedseg.wire import MAX_PAYLOAD_BYTES, WireError

log = logging.getLogger("fedseg.server")
# Replies are polled quickly at first, then every 20 ms: a pull is an in-memory lookup in
# simulation and one small request to the SuperLink in deployment, while a split-training step
# is two exchanges of a few hundred ms each; a 100 ms cap added ~45 ms to each (us-nerve: a step
# took 1.16 s, 1.07 s with this cap).
PULL_INTERVAL_S = (0.005, 0.02)  # first and longest wait between two pulls


@contextmanager
def site_progress(label: str) -> Iterator[Callable[[int, int, int], None]]:
    """A progress line of one phase over the sites: how many answered, how many failed."""
    columns = (TextColumn(label), BarColumn(), TextColumn("{task.fields[status]}"))
    with Progress(*columns, TimeElapsedColumn(), transient=True) as progress:
        task = progress.add_task(label, total=None, status="")

        def on_reply(done: int, failed: int, total: int) -> None:
            status = f"{done}/{total} sites" + (f", {failed} failed" if failed else "")
            progress.update(task, total=total, completed=done + failed, status=status)

        yield on_reply


@dataclass
class SiteInfo:
    node_id: int
    name: str
    n_train: int
    n_test: int
    class_names: list[str]
    reused: bool = False  # reloaded its saved AEs (resume) instead of training new ones
    stats: dict = field(default_factory=dict)  # the site's aggregate data statistics (non-IID)
    # privacy.query = "ckks": its CKKS public bundle, sent once with its registration
    ckks_keys: dict[str, np.ndarray] | None = field(default=None, repr=False)


@dataclass
class Federation:
    """Who takes part, and who dropped out of which phase (and why)."""

    sites: dict[int, SiteInfo] = field(default_factory=dict)
    dropped: list[dict] = field(default_factory=list)
    # Replies refused for one step or round (malformed, extreme, oversized): the site stays.
    rejected: list[dict] = field(default_factory=list)
    # node id -> site name as the operator registered it (deployment); None: trust the names
    # the nodes report (a simulation's nodes are the run's own).
    registry: dict[int, str] | None = None

    def drop(self, node_id: int, phase: str, reason: str) -> None:
        site = self.sites.pop(node_id, None)
        name = site.name if site else f"node {node_id}"
        log.warning("%s dropped out of %s: %s", name, phase, reason)
        self.dropped.append({"phase": phase, "site": name, "reason": reason})

    def reject(self, node_id: int, phase: str, reason: str, **where: int) -> None:
        """Refuse one reply: logged and recorded, the site takes part in the next step."""
        name = self.sites[node_id].name if node_id in self.sites else f"node {node_id}"
        log.warning("%s: reply refused in %s %s: %s", name, phase, where or "", reason)
        self.rejected.append({"phase": phase, "site": name, **where, "reason": reason})

    def by_name(self) -> dict[str, SiteInfo]:
        return {s.name: s for s in self.sites.values()}


def wait_for_nodes(grid: Grid, expected: int, timeout_s: float) -> list[int]:
    """In simulation the node list can be empty at first: wait until they have registered."""
    deadline = time.monotonic() + timeout_s
    while True:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= expected or time.monotonic() > deadline:
            if len(nodes) < expected:
                log.warning(
                    "only %d of %d nodes registered after %.0fs", len(nodes), expected, timeout_s
                )
            return nodes
        time.sleep(0.5)


def exchange(
    grid: Grid,
    node_ids: list[int],
    message_type: str,
    content: Callable[[int], RecordDict],
    timeout: float | None,
    on_reply: Callable[[int, int, int], None] | None = None,
) -> tuple[dict[int, Message], dict[int, str]]:
    """Send one message per node; return (replies by node, failure reason by node).

    Replies are pulled as they come (as ``Grid.send_and_receive`` does) so that ``on_reply``
    can show how many sites have answered.
    """
    messages = [Message(content(n), dst_node_id=n, message_type=message_type) for n in node_ids]
    replies, failed = {}, {}
    pending = set(grid.push_messages(messages))
    del messages
    end = time.time() + (timeout or 0.0)
    wait = PULL_INTERVAL_S[0]
    while pending and (timeout is None or time.time() < end):
        for reply in grid.pull_messages(pending):
            pending.discard(reply.metadata.reply_to_message_id)
            src = reply.metadata.src_node_id
            if reply.has_error():
                failed[src] = f"client error: {short_reason(reply.error.reason)}"
            else:
                replies[src] = reply
            if on_reply is not None:
                on_reply(len(replies), len(failed), len(node_ids))
        if pending:
            time.sleep(wait)
            wait = min(2 * wait, PULL_INTERVAL_S[1])
    for n in node_ids:
        if n not in replies and n not in failed:
            failed[n] = f"no reply within {timeout}s"
    return replies, failed


def arrays_of(record: ArrayRecord | None, name: str = "latents") -> dict[str, np.ndarray]:
    """A reply's arrays, checked for presence and total size on the received bytes, before
    anything is converted (a 1 GiB reply costs no fp32 copy)."""
    if record is None:
        raise WireError(f"no {name!r} record in the reply")
    size = sum(len(a.data) for a in record.values())
    if size > MAX_PAYLOAD_BYTES:
        raise WireError(f"{name!r} record of {size} bytes exceeds {MAX_PAYLOAD_BYTES}")
    try:
        return {k: v.numpy() for k, v in record.items()}
    except (TypeError, ValueError) as err:
        raise WireError(f"{name!r} record does not decode: {err}") from err


def to_record(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: Array(v) for k, v in arrays.items()})


def short_reason(reason: str, limit: int = 300) -> str:
    """The useful last line of a client's traceback (Ray wraps it in several layers)."""
    lines = [ln.strip() for ln in reason.splitlines() if ln.strip()]
    last = lines[-1] if lines else reason
    last = last.split("Message: ")[-1].rstrip("'>")
    return last[:limit]
