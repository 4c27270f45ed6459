"""Phase 1: every hospital trains its image and mask autoencoders on its own data."""

from __future__ import annotations

import json

from flwr.app import ConfigRecord, RecordDict
from flwr.serverapp import Grid

from strategies.common import Federation, SiteInfo, exchange, log, site_progress


class LocalAutoencoderTraining:
    """Weights stay at the sites; the server learns only sizes, class names and losses."""

    def __init__(self, timeout_s: float | None, reuse: bool = False) -> None:
        self.timeout_s = timeout_s
        self.reuse = reuse  # resuming: sites reload the AEs they saved instead of retraining

    def run(self, grid: Grid, node_ids: list[int], federation: Federation) -> None:
        with site_progress("autoencoders") as on_reply:
            replies, failed = exchange(
                grid,
                node_ids,
                "train.autoencoders",
                lambda _: RecordDict({"config": ConfigRecord({"reuse": self.reuse})}),
                self.timeout_s,
                on_reply,
            )
        for node_id, reason in failed.items():
            federation.drop(node_id, "autoencoders", reason)
        for node_id, reply in replies.items():
            metrics = reply.content.metric_records["metrics"]
            info = reply.content.config_records["site"]
            federation.sites[node_id] = SiteInfo(
                node_id=node_id,
                name=str(info["site"]),
                n_train=int(metrics["n_train"]),
                n_test=int(metrics["n_test"]),
                class_names=[str(c) for c in info["class_names"]],
                reused=bool(metrics.get("reused", 0)),
                stats=json.loads(str(info.get("stats_json", "{}"))),
            )
            if metrics.get("reused", 0):
                log.info("%s: reloaded its saved AEs", info["site"])
                continue
            log.info(
                "%s: AEs trained (%d images, %d epochs, %.0fs; image MSE %.4f, mask loss %.4f)",
                info["site"],
                metrics["n_train"],
                metrics["epochs"],
                metrics["seconds"],
                metrics["image_loss"],
                metrics["mask_loss"],
            )
