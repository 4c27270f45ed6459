"""Phase 1: every hospital trains its image and mask autoencoders on its own data.

By default the weights never leave the sites. With ``training.ae_federation = "fedavg"`` (opt-in)
Flower's FedAvg strategy first averages them round by round, and the sites then adopt the
averaged AEs: every site encodes into one latent space, which the UMN can pool.
"""

from __future__ import annotations

import json

from flwr.app import ArrayRecord, ConfigRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from strategies.common import Federation, SiteInfo, exchange, log, site_progress


class FederatedAutoencoders:
    """Opt-in FedAvg of the AEs: the server sees each site's weights every round (README)."""

    def __init__(self, rounds: int, timeout_s: float | None) -> None:
        self.rounds = rounds
        self.timeout_s = timeout_s

    def run(self, grid: Grid, node_ids: list[int]) -> ArrayRecord:
        n = len(node_ids)
        strategy = FedAvg(
            fraction_train=1.0,
            fraction_evaluate=0.0,
            min_train_nodes=n,
            min_evaluate_nodes=0,
            min_available_nodes=n,
        )
        columns = (TextColumn("autoencoders (FedAvg)"), BarColumn(), MofNCompleteColumn())
        with Progress(*columns, TimeElapsedColumn(), transient=True) as progress:
            task = progress.add_task("fedavg", total=self.rounds)

            def after_round(server_round: int, _arrays: ArrayRecord) -> None:
                progress.update(task, completed=server_round)

            result = strategy.start(
                grid=grid,
                # Empty: round 1 starts from the seeded initialisation every site shares.
                initial_arrays=ArrayRecord(),
                num_rounds=self.rounds,
                timeout=self.timeout_s or 24 * 3600.0,
                train_config=ConfigRecord({"rounds": self.rounds}),
                evaluate_fn=after_round,
            )
        if len(result.arrays) == 0:
            raise RuntimeError("no hospital finished a FedAvg round of the autoencoders")
        losses = result.train_metrics_clientapp.get(self.rounds)
        log.info("FedAvg of the AEs: %d rounds; last round's mean losses %s", self.rounds, losses)
        return result.arrays


class LocalAutoencoderTraining:
    """Weights stay at the sites; the server learns only sizes, class names and losses.

    ``averaged`` (after :class:`FederatedAutoencoders`): the sites adopt these AEs instead of
    training their own.
    """

    def __init__(
        self, timeout_s: float | None, reuse: bool = False, averaged: ArrayRecord | None = None
    ) -> None:
        self.timeout_s = timeout_s
        self.reuse = reuse  # resuming: sites reload the AEs they saved instead of retraining
        self.averaged = averaged

    def run(self, grid: Grid, node_ids: list[int], federation: Federation) -> None:
        def content(_: int) -> RecordDict:
            record = RecordDict({"config": ConfigRecord({"reuse": self.reuse})})
            if self.averaged is not None:
                record["arrays"] = self.averaged
            return record

        with site_progress("autoencoders") as on_reply:
            replies, failed = exchange(
                grid, node_ids, "train.autoencoders", content, self.timeout_s, on_reply
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
            if metrics.get("federated", 0):
                log.info("%s: adopted the federated-averaged AEs", info["site"])
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
