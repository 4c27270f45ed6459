"""Baselines in the same harness: a centralized UNet on pooled data and one UNet per site.

Same splits, same augmentation, same metrics as the federated run. The centralized UNet is the
privacy-agnostic reference (what sharing all data would give); local UNets show what each
hospital reaches alone.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Literal

import torch

from fedseg.config import RunConfig
from fedseg.data import SiteData, SiteSplit
from fedseg.figures import Examples
from fedseg.models.baselines import make_unet
from fedseg.models.split_path import SplitPathNet
from fedseg.site import evaluate_predictions, pick_examples
from fedseg.training import Budget, predict, train_segmenter

Progress = Callable[[int, int, float], None]
Reference = Literal["unet", "split-path"]  # split-path: fedseg.models.split_path, pooled


def fit_reference(
    cfg: RunConfig,
    train: SiteData,
    minutes: float,
    seed: int,
    on_epoch: Progress | None,
    reference: Reference = "unet",
):
    """A reference network trained on ``train`` (the centralized UNet's recipe: its channels,
    epochs or ``minutes``, learning rate, augmentation); also the inr mode's server network."""
    torch.manual_seed(seed)
    torch.set_num_threads(cfg.training.threads)  # the same threads the federated run had
    b = cfg.baselines
    if reference == "unet":
        net = make_unet(train.num_classes, b.unet_channels, train.channels)
    elif reference == "split-path":
        net = SplitPathNet(cfg, train.num_classes)
    else:
        raise ValueError(f"unknown reference network {reference!r}: 'unet' or 'split-path'")
    epochs = train_segmenter(
        net,
        train.images,
        train.masks,
        train.num_classes,
        Budget(b.epochs if minutes <= 0 else 10**6, minutes),
        b.lr,
        cfg.training.batch_size,
        seed,
        on_epoch,
    )
    return net, epochs


def _score(cfg: RunConfig, net, sites: list[SiteSplit]) -> tuple[dict, dict[str, Examples], float]:
    metrics, examples, seconds, count = {}, {}, 0.0, 0
    for site in sites:
        started = time.perf_counter()
        pred = predict(net, site.test.images)
        seconds += time.perf_counter() - started
        count += len(site.test)
        metrics[site.name] = evaluate_predictions(site.test, pred)
        pick = pick_examples(site.test, cfg.overlays_per_site)
        # (k, C, H, W): colour stays colour in the overlays
        examples[site.name] = Examples(site.test.images[pick], site.test.masks[pick], pred[pick])
    return metrics, examples, seconds / max(count, 1)


def centralized_unet(
    cfg: RunConfig,
    sites: list[SiteSplit],
    minutes: float,
    on_epoch: Progress | None = None,
    reference: Reference = "unet",
) -> tuple[dict, dict[str, Examples]]:
    """Train on the pooled training data of all sites; score on each site's test split.
    ``reference="split-path"`` trains the federated run's own layers this way instead."""
    pooled = SiteData.concat([s.train for s in sites], "pooled")
    started = time.perf_counter()
    net, epochs = fit_reference(cfg, pooled, minutes, cfg.training.seed, on_epoch, reference)
    train_s = time.perf_counter() - started
    metrics, examples, per_image = _score(cfg, net, sites)
    extra = {"epochs": epochs, "train_seconds": train_s, "seconds_per_image": per_image}
    return {
        "sites": metrics,
        "parameters": sum(p.numel() for p in net.parameters()),
        **extra,
    }, examples


def local_unets(
    cfg: RunConfig, sites: list[SiteSplit], minutes: float, on_epoch: Progress | None = None
) -> tuple[dict, dict[str, Examples]]:
    """One UNet per site, trained and scored on that site alone."""
    metrics, examples, epochs = {}, {}, {}
    for i, site in enumerate(sites):
        seed = cfg.training.seed + i
        net, epochs[site.name] = fit_reference(cfg, site.train, minutes, seed, on_epoch)
        m, ex, _ = _score(cfg, net, [site])
        metrics.update(m)
        examples.update(ex)
    return {"sites": metrics, "epochs": epochs}, examples
