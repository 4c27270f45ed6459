"""Plain-torch training loops, called by the Flower handlers, the server and the baselines.

Every loop runs for a number of epochs or a wall-clock budget, whichever ends first, with a
cosine learning rate driven by that progress, so a run given "10 minutes" uses all ten.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import cast

import numpy as np
import torch
from monai.losses import DiceCELoss
from torch import nn
from torch.nn import functional as F

from fedseg.models.autoencoder import Latents, SkipAutoencoder
from fedseg.models.umn import UnifiedMappingNetwork

Progress = Callable[[int, int, float], None]  # (epoch, epochs, loss)
CHANNELS_LAST = torch.channels_last  # NHWC convolutions: about 1.3x faster training on x86 CPUs


def nhwc(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous(memory_format=CHANNELS_LAST)


def to_nhwc(*nets: nn.Module) -> None:
    for net in nets:
        # Module.to accepts memory_format at run time; torch's overloads omit it.
        net.to(memory_format=CHANNELS_LAST)  # type: ignore[call-overload]


@dataclass
class Budget:
    """Epochs and an optional wall-clock limit (minutes <= 0: epochs only)."""

    epochs: int
    minutes: float = 0.0

    def __post_init__(self) -> None:
        self.start = time.perf_counter()

    def progress(self, epoch: int) -> float:
        frac = epoch / max(self.epochs, 1)
        if self.minutes > 0:
            frac = max(frac, (time.perf_counter() - self.start) / (60 * self.minutes))
        return min(frac, 1.0)

    def done(self, epoch: int) -> bool:
        return self.progress(epoch) >= 1.0

    def elapsed(self) -> float:
        return time.perf_counter() - self.start


def adamw(params, lr: float, weight_decay: float = 1e-4) -> torch.optim.AdamW:
    """AdamW as every training loop here uses it. ``fused``: one kernel for all parameters
    instead of a dozen small ops per tensor; on this CPU a step of the UMN (120 tensors)
    takes 2.1 ms instead of 5.2, of the UNet 1.3 instead of 6.3 (docs/performance.md)."""
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=True)


def segmentation_loss() -> DiceCELoss:
    """Dice over the foreground classes plus cross-entropy over all, as nnU-Net trains (its
    soft Dice leaves the background out), for every segmenter here: split training and the
    UNets it is compared with. With the background in the Dice, a net that predicts only
    background already scores 1/C of it, and split training sat on that for its first 3-4
    epochs on hippocampus (train-batch Dice 0; docs/performance.md, session 35)."""
    return DiceCELoss(softmax=True, to_onehot_y=True, include_background=False)


def cosine_lr(optimizer: torch.optim.Optimizer, base_lr: float, progress: float) -> None:
    for group in optimizer.param_groups:
        scale = group.get("lr_scale", 1.0)
        group["lr"] = scale * base_lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress)))


def augment(
    images: torch.Tensor, masks: torch.Tensor, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random flip, rotation, scale and contrast; masks follow the geometry (nearest)."""
    n = images.shape[0]

    def uniform(low: float, high: float) -> torch.Tensor:
        return low + (high - low) * torch.rand(n, generator=generator)

    angle = uniform(-0.26, 0.26)  # about +-15 degrees
    scale = uniform(0.9, 1.1)
    flip = torch.where(torch.rand(n, generator=generator) < 0.5, -1.0, 1.0)
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0], theta[:, 0, 1] = cos * flip, -sin
    theta[:, 1, 0], theta[:, 1, 1] = sin * flip, cos
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    out_images = F.grid_sample(
        images, grid, mode="bilinear", padding_mode="border", align_corners=False
    )
    out_masks = F.grid_sample(
        masks[:, None].float(), grid, mode="nearest", padding_mode="zeros", align_corners=False
    )[:, 0].long()
    gain = uniform(0.8, 1.25)[:, None, None, None]
    shift = uniform(-0.2, 0.2)[:, None, None, None]
    return out_images * gain + shift, out_masks


Augment = Callable[[torch.Tensor, torch.Tensor, torch.Generator], tuple[torch.Tensor, torch.Tensor]]


def one_hot(masks: torch.Tensor, num_classes: int) -> torch.Tensor:
    return F.one_hot(masks, num_classes).permute(0, 3, 1, 2).float()


def _batches(n: int, batch_size: int, generator: torch.Generator) -> list[torch.Tensor]:
    order = torch.randperm(n, generator=generator)
    return [order[i : i + batch_size] for i in range(0, n, batch_size)]


@dataclass
class AutoencoderStats:
    image_loss: float
    mask_loss: float
    epochs: int
    seconds: float


def train_autoencoders(
    images: np.ndarray,
    masks: np.ndarray,
    image_ae: SkipAutoencoder,
    mask_ae: SkipAutoencoder,
    num_classes: int,
    budget: Budget,
    lr: float,
    batch_size: int,
    seed: int,
    on_epoch: Progress | None = None,
    latent_noise: float = 0.0,
    cross_weight: float = 0.0,
) -> AutoencoderStats:
    """Train a site's image AE (MSE) and mask AE (Dice + CE) together on augmented pairs.

    The mask decoder is trained on noisy latents (``latent_noise`` times each latent's own
    spread) so that it decodes the UMN's imperfect predictions into clean masks, instead of
    having only ever seen the encoder's exact outputs.

    ``cross_weight`` > 0 also asks the mask decoder to decode the *image* latents into the mask
    (local labels, local weights: nothing extra leaves the site). Image latents trained for
    reconstruction alone keep texture but bury what separates a nerve from a vessel; this term
    makes them carry it, so the server's mapping network has far less left to learn.
    """
    gen = torch.Generator().manual_seed(seed)
    x_all, y_all = torch.from_numpy(images), torch.from_numpy(masks)
    params = list(image_ae.parameters()) + list(mask_ae.parameters())
    optimizer = adamw(params, lr)
    mask_loss_fn = DiceCELoss(softmax=True)
    to_nhwc(image_ae, mask_ae)
    image_ae.train()
    mask_ae.train()
    epoch, img_loss, msk_loss = 0, float("nan"), float("nan")
    while not budget.done(epoch):
        cosine_lr(optimizer, lr, budget.progress(epoch))
        img_losses, msk_losses = [], []
        for idx in _batches(len(x_all), batch_size, gen):
            x, y = augment(x_all[idx], y_all[idx], gen)
            x, target = nhwc(x), nhwc(one_hot(y, num_classes))
            z_img = image_ae.encoder(x)
            loss_img = F.mse_loss(image_ae.decoder(z_img), x)
            z_msk = _noisy(mask_ae.encoder(target), latent_noise, gen)
            loss_msk = mask_loss_fn(mask_ae.decoder(z_msk), target)
            loss = loss_img + loss_msk
            if cross_weight > 0:
                loss = loss + cross_weight * mask_loss_fn(mask_ae.decoder(z_img), target)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            img_losses.append(loss_img.item())
            msk_losses.append(loss_msk.item())
        epoch += 1
        img_loss, msk_loss = float(np.mean(img_losses)), float(np.mean(msk_losses))
        if on_epoch:
            on_epoch(epoch, budget.epochs, img_loss + msk_loss)
    image_ae.eval()
    mask_ae.eval()
    return AutoencoderStats(img_loss, msk_loss, epoch, budget.elapsed())


def _noisy(latents: Latents, scale: float, generator: torch.Generator) -> Latents:
    if scale <= 0:
        return latents
    out = []
    for z in latents:
        noise = torch.randn(z.shape, generator=generator)
        out.append(z + scale * z.detach().std(dim=(0, 2, 3), keepdim=True) * noise)
    return out


@torch.no_grad()
def encode(ae: SkipAutoencoder, x: torch.Tensor, batch_size: int = 64) -> Latents:
    ae.eval()
    parts = [ae.encoder(nhwc(x[i : i + batch_size])) for i in range(0, len(x), batch_size)]
    return [torch.cat(scale) for scale in zip(*parts, strict=True)]


@torch.no_grad()
def decode_masks(
    mask_ae: SkipAutoencoder,
    latents: Latents,
    image_ae: SkipAutoencoder | None = None,
    images: np.ndarray | torch.Tensor | None = None,
    batch_size: int = 64,
) -> np.ndarray:
    """Class maps from (un-keyed) mask latents. A decoder with local skips also needs the
    images and the site's image autoencoder, whose fine features it reads."""
    mask_ae.eval()
    n = latents[0].shape[0]
    if mask_ae.decoder.local_skips:
        if images is None or image_ae is None:
            raise ValueError(
                "this mask decoder has local skips (model.local_skips): it needs the queried "
                "images and the site's image autoencoder"
            )
        if len(images) != n:
            raise ValueError(f"{len(images)} images for {n} mapped latents")
        images = torch.as_tensor(images)
        image_ae.eval()
    preds = []
    for i in range(0, n, batch_size):
        local = None
        if mask_ae.decoder.local_skips:
            assert image_ae is not None and isinstance(images, torch.Tensor)  # checked above
            local = image_ae.encoder.local_features(nhwc(images[i : i + batch_size]))
        z = [nhwc(z[i : i + batch_size]) for z in latents]
        preds.append(mask_ae.decoder(z, local).argmax(1))
    return torch.cat(preds).numpy().astype(np.int64)


@dataclass
class SiteLatents:
    """What the server holds for one site: its (keyed) image and mask latents."""

    site: str
    image: Latents
    mask: Latents

    def __len__(self) -> int:
        return self.image[0].shape[0]


def train_umn(
    umn: UnifiedMappingNetwork,
    sites: list[SiteLatents],
    budget: Budget,
    lr: float,
    batch_size: int,
    seed: int,
    optimizer: torch.optim.Optimizer | None = None,
    on_epoch: Progress | None = None,
    start_epoch: int = 0,
    adapter_lr_scale: float = 1.0,
) -> tuple[torch.optim.Optimizer, float, int]:
    """Fit the UMN to map each site's image latents to its mask latents (latent MSE).

    Batches are drawn per site (each site has its own adapters), interleaved at random so no
    site dominates the end of an epoch. Returns the optimizer (for checkpoints), the last loss
    and the epoch count.
    """
    gen = torch.Generator().manual_seed(seed + start_epoch)
    if optimizer is None:
        adapters = [p for n, p in umn.named_parameters() if "adapters" in n]
        trunk = [p for n, p in umn.named_parameters() if "adapters" not in n]
        groups = [
            {"params": trunk, "lr_scale": 1.0},
            {"params": adapters, "lr_scale": adapter_lr_scale},
        ]
        optimizer = adamw(groups, lr)
    to_nhwc(umn)
    umn.train()
    epoch, last = start_epoch, float("nan")
    while not budget.done(epoch - start_epoch):
        cosine_lr(optimizer, lr, budget.progress(epoch - start_epoch))
        plan = [
            (s, idx) for s, site in enumerate(sites) for idx in _batches(len(site), batch_size, gen)
        ]
        losses = []
        for k in torch.randperm(len(plan), generator=gen).tolist():
            s, idx = plan[k]
            site = sites[s]
            pred = umn([nhwc(z[idx].float()) for z in site.image], umn.site_index(site.site))
            loss = cast(  # a sum of three scales' losses: a tensor, never the start value 0
                torch.Tensor,
                sum(F.mse_loss(p, t[idx].float()) for p, t in zip(pred, site.mask, strict=True)),
            )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        epoch += 1
        last = float(np.mean(losses))
        if on_epoch:
            on_epoch(epoch, budget.epochs, last)
    umn.eval()
    return optimizer, last, epoch


@torch.no_grad()
def map_latents(umn: UnifiedMappingNetwork, site: str, latents: Latents, batch_size: int = 64):
    umn.eval()
    index = umn.site_index(site)
    n = latents[0].shape[0]
    parts = [
        umn([nhwc(z[i : i + batch_size].float()) for z in latents], index)
        for i in range(0, n, batch_size)
    ]
    return [torch.cat(scale) for scale in zip(*parts, strict=True)]


def train_segmenter(
    net: nn.Module,
    images: np.ndarray,
    masks: np.ndarray,
    num_classes: int,
    budget: Budget,
    lr: float,
    batch_size: int,
    seed: int,
    on_epoch: Progress | None = None,
    augment_fn: Augment = augment,
    channels_last: bool = True,
) -> int:
    """Supervised baseline (MONAI UNet, :func:`segmentation_loss`), with the same augmentation
    as the AEs (``augment_fn``: another, e.g. for volumes; ``channels_last``: 2D images in
    NHWC)."""
    gen = torch.Generator().manual_seed(seed)
    x_all, y_all = torch.from_numpy(images), torch.from_numpy(masks)
    optimizer = adamw(net.parameters(), lr)
    loss_fn = segmentation_loss()
    layout = nhwc if channels_last else (lambda x: x)
    if channels_last:
        to_nhwc(net)
    net.train()
    epoch = 0
    while not budget.done(epoch):
        cosine_lr(optimizer, lr, budget.progress(epoch))
        losses = []
        for idx in _batches(len(x_all), batch_size, gen):
            x, y = augment_fn(x_all[idx], y_all[idx], gen)
            loss = loss_fn(net(layout(x)), y[:, None])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        epoch += 1
        if on_epoch:
            on_epoch(epoch, budget.epochs, float(np.mean(losses)))
    net.eval()
    return epoch


@torch.no_grad()
def predict(net: nn.Module, images: np.ndarray, batch_size: int = 32) -> np.ndarray:
    net.eval()
    x = torch.from_numpy(images)
    preds = [net(nhwc(x[i : i + batch_size])).argmax(1) for i in range(0, len(x), batch_size)]
    return torch.cat(preds).numpy().astype(np.int64)
