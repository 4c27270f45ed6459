"""Baselines in the same harness: a centralized UNet on pooled data and one UNet per site.

Same splits, same augmentation, same metrics as the federated run. The centralized UNet is the
privacy-agnostic reference (what sharing all data would give); local UNets show what each
hospital reaches alone.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Literal

import numpy as np
import torch

from fedseg.config import RunConfig
from fedseg.data import SiteData, SiteSplit
from fedseg.data.dataset import resize_mask
from fedseg.figures import Examples
from fedseg.models.baselines import make_unet
from fedseg.models.split_path import SplitPathNet
from fedseg.site import pick_examples, score_test
from fedseg.training import Budget, predict, train_segmenter
from fedseg.training3d import predict_volume, train_volumes, volume_image

Progress = Callable[[int, int, float], None]
Reference = Literal["unet", "split-path"]  # split-path: fedseg.models.split_path, pooled


def reference_net(cfg: RunConfig, train: SiteData, seed: int, reference: Reference = "unet"):
    """The untrained reference network, seeded, with the threads the federated run had."""
    torch.manual_seed(seed)
    torch.set_num_threads(cfg.training.threads)
    if reference == "unet":
        return make_unet(train.num_classes, cfg.baselines.unet_channels, train.channels)
    if reference == "split-path":
        return SplitPathNet(cfg, train.num_classes)
    raise ValueError(f"unknown reference network {reference!r}: 'unet' or 'split-path'")


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
    net = reference_net(cfg, train, seed, reference)
    b = cfg.baselines
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


def _score(
    cfg: RunConfig, net, sites: list[SiteSplit], method: str = "centralized UNet"
) -> tuple[dict, dict[str, Examples], float]:
    metrics, examples, seconds, count = {}, {}, 0.0, 0
    for site in sites:
        started = time.perf_counter()
        pred = predict(net, site.test.images)
        seconds += time.perf_counter() - started
        count += len(site.test)
        metrics[site.name] = score_test(cfg, site.test, pred, (cfg.out_dir, site.name, method))
        pick = pick_examples(site.test, cfg.overlays_per_site)
        # (k, C, H, W): colour stays colour in the overlays
        examples[site.name] = Examples(site.test.shown(pick), site.test.masks[pick], pred[pick])
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
        net, epochs[site.name] = fit_reference(
            cfg, site.train, minutes, cfg.training.seed + i, on_epoch
        )
        m, ex, _ = _score(cfg, net, [site], "local UNet")
        metrics.update(m)
        examples.update(ex)
    return {"sites": metrics, "epochs": epochs}, examples


UNET3D_LEVELS = 4  # the 3D UNet halves a volume 3 times: shapes are padded to multiples of 8


def centralized_unet3d(
    cfg: RunConfig, sites: list[SiteSplit], minutes: float, on_epoch: Progress | None = None
) -> tuple[dict, dict[str, Examples]]:
    """MONAI's 3D UNet trained on the pooled training volumes at their native resolution and
    scored on each site's test volumes: per volume in 3D, and per slice like the 2D methods
    (each slice of its predicted volume resized to the slices' size, as the masks were)."""
    pooled = SiteData.concat([s.train for s in sites], "pooled")
    if not pooled.volumes:
        raise ValueError("baselines.unet3d needs volume data (data.kind = 'nifti')")
    torch.manual_seed(cfg.training.seed)
    torch.set_num_threads(cfg.training.threads)
    b = cfg.baselines
    net = make_unet(pooled.num_classes, b.unet3d_channels, spatial_dims=3)
    multiple = 2 ** (len(b.unet3d_channels) - 1)
    refs = list(pooled.volumes.values())
    started = time.perf_counter()
    epochs = train_volumes(
        net,
        [volume_image(v) for v in refs],
        [v.label for v in refs],
        Budget(b.epochs if minutes <= 0 else 10**6, minutes),
        b.lr,
        b.unet3d_batch_size,
        cfg.training.seed,
        multiple,
        on_epoch,
    )
    train_s = time.perf_counter() - started
    metrics, examples, seconds, count = {}, {}, 0.0, 0
    size = cfg.model.image_size
    for site in sites:
        test = site.test
        started = time.perf_counter()
        volumes = {
            g: predict_volume(net, volume_image(v), multiple) for g, v in test.volumes.items()
        }
        seconds += time.perf_counter() - started
        count += len(volumes)
        positions = test.slice_index if test.slice_index is not None else np.zeros(0, np.int64)
        planes = [
            resize_mask(np.take(volumes[g], int(z), axis=test.volumes[g].axis), size)
            for g, z in zip(test.groups.tolist(), positions.tolist(), strict=True)
        ]
        pred = np.stack(planes) if planes else test.masks.copy()
        where = (cfg.out_dir, site.name, "centralized 3D UNet")
        metrics[site.name] = score_test(cfg, test, pred, where, volumes)
        pick = pick_examples(test, cfg.overlays_per_site)
        examples[site.name] = Examples(test.shown(pick), test.masks[pick], pred[pick])
    return {
        "sites": metrics,
        "parameters": sum(p.numel() for p in net.parameters()),
        "epochs": epochs,
        "train_seconds": train_s,
        "seconds_per_volume": seconds / max(count, 1),
    }, examples
