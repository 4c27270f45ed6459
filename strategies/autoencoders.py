"""Phase 1: every hospital trains its image and mask autoencoders on its own data.

By default the weights never leave the sites. With ``training.ae_federation = "fedavg"`` (opt-in)
Flower's FedAvg strategy first averages them round by round, and the sites then adopt the
averaged AEs: every site encodes into one latent space, which the UMN can pool.
"""

from __future__ import annotations

import json
from collections.abc import Mapping

from flwr.app import ArrayRecord, ConfigRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from fedseg.deploy.registry import check_site_name
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
        for node_id, reply in sorted(replies.items()):  # the first node to claim a name keeps it
            metrics = reply.content.metric_records.get("metrics")
            info = reply.content.config_records.get("site")
            try:
                site = registration(
                    node_id, metrics, info, federation.by_name(), federation.registry
                )
            except (KeyError, TypeError, ValueError) as err:
                federation.drop(node_id, "autoencoders", f"registration refused: {err}")
                continue
            federation.sites[node_id] = site
            if metrics.get("reused", 0):
                log.info("%s: reloaded its saved AEs", site.name)
            elif metrics.get("federated", 0):
                log.info("%s: adopted the federated-averaged AEs", site.name)
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
