"""Phase 1: every hospital registers, and (paper preset) trains its image and mask
autoencoders on its own data. The weights never leave the sites."""

from __future__ import annotations

import json
from collections.abc import Mapping

from flwr.app import ConfigRecord, RecordDict
from flwr.serverapp import Grid

from fedseg import protocol
from fedseg.deploy.registry import check_site_name
from strategies.common import Federation, SiteInfo, arrays_of, exchange, log, site_progress


class LocalAutoencoderTraining:
    """Weights stay at the sites; the server learns only sizes, class names and losses."""

    def __init__(self, timeout_s: float | None, reuse: bool = False, ckks: bool = False) -> None:
        self.timeout_s = timeout_s
        self.reuse = reuse  # resuming: sites reload the AEs they saved instead of retraining
        self.ckks = ckks  # privacy.query = "ckks": a registration brings the CKKS public keys

    def run(self, grid: Grid, node_ids: list[int], federation: Federation) -> None:
        def content(_: int) -> RecordDict:
            return RecordDict({protocol.CONFIG: ConfigRecord({"reuse": self.reuse})})

        with site_progress("sites registering") as on_reply:
            replies, failed = exchange(
                grid, node_ids, protocol.REGISTER, content, self.timeout_s, on_reply
            )
        for node_id, reason in failed.items():
            federation.drop(node_id, "autoencoders", reason)
        for node_id, reply in sorted(replies.items()):  # the first node to claim a name keeps it
            metrics = reply.content.metric_records.get(protocol.METRICS)
            info = reply.content.config_records.get(protocol.SITE)
            try:
                site = registration(
                    node_id, metrics, info, federation.by_name(), federation.registry
                )
                if self.ckks:
                    site.ckks_keys = arrays_of(
                        reply.content.array_records.get(protocol.CKKS_KEYS), protocol.CKKS_KEYS
                    )
            except (KeyError, TypeError, ValueError) as err:
                federation.drop(node_id, "autoencoders", f"registration refused: {err}")
                continue
            federation.sites[node_id] = site
            if metrics.get("reused", 0):
                log.info("%s: reloaded its saved AEs", site.name)
            elif not metrics.get("epochs", 0):  # split training starts from the seeded models
                log.info("%s: registered (%d training images)", site.name, site.n_train)
            else:
                log.info(
                    "%s: AEs trained (%d images, %d epochs, %.0fs; image MSE %.4f, mask loss %.4f)",
                    site.name,
                    site.n_train,
                    metrics.get("epochs", 0),
                    metrics.get("seconds", 0.0),
                    metrics.get("image_loss", float("nan")),
                    metrics.get("mask_loss", float("nan")),
                )


def registration(
    node_id: int,
    metrics: Mapping,
    info: Mapping,
    taken: dict[str, SiteInfo],
    registry: Mapping[int, str] | None = None,
) -> SiteInfo:
    """A site's registration (its reply's metrics and site records), checked: a name no other
    node holds (it names files and report rows), the name the operator recorded for this node
    where there is a registry (``fedseg/deploy/registry.py``), at least one training and one
    test image, and parseable statistics."""
    if metrics is None or info is None:
        raise ValueError("no metrics or site record")
    name = check_site_name(str(info["site"]))
    if registry is not None:
        if node_id not in registry:
            raise ValueError(f"node {node_id} is not in the coordinator's registry")
        if registry[node_id] != name:
            raise ValueError(f"node {node_id} is registered as {registry[node_id]!r}, not {name!r}")
    if name in taken:
        raise ValueError(f"site name {name!r} is already held by node {taken[name].node_id}")
    n_train, n_test = int(metrics["n_train"]), int(metrics["n_test"])
    if n_train < 1 or n_test < 1:
        raise ValueError(f"{n_train} training and {n_test} test images")
    stats = json.loads(str(info.get("stats_json", "{}")))
    return SiteInfo(
        node_id=node_id,
        name=name,
        n_train=n_train,
        n_test=n_test,
        class_names=[str(c) for c in info["class_names"]],
        reused=bool(metrics.get("reused", 0)),
        stats=stats if isinstance(stats, dict) else {},
    )
