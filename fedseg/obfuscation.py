"""The inr mode (``mode = "inr"``) without Flower: what a hospital releases, what the server
does with it, and how a hospital scores the network it gets back.

- **A hospital** splits its training images into chunks (:func:`fedseg.privacy.inr.chunk_bounds`
  of ``privacy.inr_chunk``), fits one implicit network per chunk and releases the images it
  re-renders from mixed codes, with the chunk's masks unchanged (:func:`release_chunk`). The
  mixing matrix of a release is derived from the hospital's secret and the release's label
  (run, site, chunk): fresh per run and chunk, identical when a chunk is asked again. Only a
  site whose own config says ``mode = "inr"`` releases images at all.
- **The server** checks each release (:class:`SharedSet`), trains the centralized baseline's
  UNet on the pooled releases (:func:`train_network`: the same network and recipe as the
  centralized UNet on the raw pooled images, so the two differ only in the images), and sends
  its weights back.
- **A hospital** runs that network on its own test images and returns only metrics
  (:func:`score_network`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from fedseg.config import RunConfig
from fedseg.data import SiteData
from fedseg.models.baselines import make_unet
from fedseg.privacy import inr
from fedseg.privacy.keys import read_key_file
from fedseg.protocol import LatentRequest
from fedseg.reference_runs import fit_reference
from fedseg.site import SiteSetup, score_on_test
from fedseg.training import predict

Arrays = dict[str, np.ndarray]
IMAGE_DTYPE = np.float16  # as latents travel
# A released image whose correlation with its original is above this is refused as a copy
# (a fit of this size reaches about 0.9 at rho = 0: test_inr.py).
COPY_CORRELATION = 0.995
INR_SHARED_NAME = "inr_shared.npz"  # in checkpoints/: what the server received
INR_NET_NAME = "inr_unet.pt"  # in checkpoints/: the network it trained on it


def spec(cfg: RunConfig, channels: int) -> inr.InrSpec:
    p = cfg.privacy
    return inr.InrSpec(cfg.model.image_size, channels, p.inr_code_dim, tuple(p.inr_widths))


def release_label(run_id: int, site: str, start: int, stop: int) -> str:
    return f"run {run_id}/{site}/{start}-{stop}"


def check_inr_mode(cfg: RunConfig, site: str) -> None:
    """Images, even re-rendered, leave only if the site's own config says so."""
    if cfg.mode != "inr":
        raise PermissionError(
            f"site {site}: refusing to release re-rendered images: this site's mode is "
            f"{cfg.mode!r}, not 'inr'"
        )


def release_chunk(
    cfg: RunConfig, setup: SiteSetup, request: LatentRequest, run_id: int
) -> tuple[Arrays, dict[str, float]]:
    """One chunk of the site's training set, re-rendered from mixed codes (``images``, fp16,
    zero mean and unit std per image) with its masks (``masks``, uint8); and the fit's figures
    (seconds, 1 - SSIM before and after, parameters, pixels)."""
    site, train = setup.split.name, setup.split.train
    check_inr_mode(cfg, site)
    bounds = (request.start, request.stop)
    if request.split != "train" or bounds not in inr.chunk_bounds(
        len(train), cfg.privacy.inr_chunk
    ):
        raise ValueError(f"{request.split} [{request.start}, {request.stop}) is not a chunk")
    if setup.key_file is None:
        raise ValueError("mode 'inr' draws its mixing from the site's secret: no key file")
    generator = inr.release_generator(
        read_key_file(setup.key_file), release_label(run_id, site, *bounds)
    )
    p = cfg.privacy
    originals = train.images[request.start : request.stop]
    images, stats = inr.obfuscate(
        originals,
        spec(cfg, train.channels),
        p.inr_rho,
        generator,
        p.inr_steps,
        p.inr_lr,
        p.inr_batch,
        seed=cfg.training.seed * 100_003 + request.start,
    )
    check_not_copies(images, originals)
    if train.num_classes > 256:
        raise ValueError(f"{train.num_classes} classes do not fit the uint8 masks")
    arrays: Arrays = {
        "images": images.astype(IMAGE_DTYPE),
        "masks": train.masks[request.start : request.stop].astype(np.uint8),
    }
    figures = {
        "fit_seconds": stats.seconds,
        "loss_start": stats.loss_start,
        "loss_end": stats.loss_end,
        "parameters": stats.parameters,
        "pixels": stats.pixels,
    }
    return arrays, figures


def check_not_copies(released: np.ndarray, originals: np.ndarray) -> None:
    """Refuse a release in which an image is (almost) its original: a bug, never the method."""
    a = released.reshape(len(released), -1).astype(np.float64)
    b = originals.reshape(len(originals), -1).astype(np.float64)
    a = a - a.mean(1, keepdims=True)
    b = b - b.mean(1, keepdims=True)
    corr = (a * b).sum(1) / np.sqrt((a * a).sum(1) * (b * b).sum(1) + 1e-12)
    if (corr > COPY_CORRELATION).any():
        raise RuntimeError(
            f"refusing to release: image {int(np.argmax(corr))} correlates {corr.max():.4f} "
            "with its original"
        )


@dataclass
class SharedSet:
    """What the server received: each site's released chunks, checked."""

    image_shape: tuple[int, int, int]  # (C, H, W)
    num_classes: int
    images: list[np.ndarray] = field(default_factory=list)
    masks: list[np.ndarray] = field(default_factory=list)
    origin: list[tuple[str, int, int]] = field(default_factory=list)  # (site, start, stop)
    fits: list[dict[str, Any]] = field(default_factory=list)

    def add(self, site: str, start: int, stop: int, arrays: Arrays, fit: dict) -> None:
        """A release of images [start, stop) of ``site``; ValueError if malformed."""
        if set(arrays) != {"images", "masks"}:
            raise ValueError(f"a release holds images and masks, got {sorted(arrays)}")
        images, masks = arrays["images"], arrays["masks"]
        n = stop - start
        if images.shape != (n, *self.image_shape) or images.dtype != IMAGE_DTYPE:
            raise ValueError(f"images {images.shape} {images.dtype}: {n} x {self.image_shape}?")
        if masks.shape != (n, *self.image_shape[1:]) or masks.dtype != np.uint8:
            raise ValueError(f"masks {masks.shape} {masks.dtype} do not match the images")
        if not np.isfinite(images).all():
            raise ValueError("images are not finite")
        if masks.size and int(masks.max()) >= self.num_classes:
            raise ValueError(f"mask value {int(masks.max())} >= {self.num_classes} classes")
        self.images.append(images)
        self.masks.append(masks)
        self.origin.append((site, start, stop))
        self.fits.append({"site": site, "start": start, "stop": stop, **fit})

    def __len__(self) -> int:
        return sum(len(m) for m in self.masks)

    def as_site_data(self, class_names: list[str]) -> SiteData:
        groups = np.array([f"{s}/{i}" for s, a, b in self.origin for i in range(a, b)])
        return SiteData(
            name="shared",
            images=np.concatenate(self.images).astype(np.float32),
            masks=np.concatenate(self.masks).astype(np.int64),
            spacing=np.full((len(self), 2), np.nan),
            groups=groups,
            names=list(groups),
            class_names=list(class_names),
        )

    def to_arrays(self) -> Arrays:
        """The server's view, for the attack suite (checkpoints/inr_shared.npz)."""
        return {
            "images": np.concatenate(self.images),
            "masks": np.concatenate(self.masks),
            "site": np.array([s for s, a, b in self.origin for _ in range(a, b)]),
            "index": np.concatenate([np.arange(a, b) for _, a, b in self.origin]),
        }

    def summary(self) -> dict[str, Any]:
        ratios = [f["pixels"] / f["parameters"] for f in self.fits]
        seconds = [f["fit_seconds"] for f in self.fits]
        losses = [f["loss_end"] for f in self.fits]
        sent = sum(a.nbytes + m.nbytes for a, m in zip(self.images, self.masks, strict=True))
        return {
            "chunks": self.fits,
            "images": len(self),
            "compression_ratio_min": min(ratios, default=None),
            "compression_ratio_mean": float(np.mean(ratios)) if ratios else None,
            "fit_seconds_per_chunk": float(np.mean(seconds)) if seconds else None,
            "ssim_loss_mean": float(np.mean(losses)) if losses else None,
            "shared_bytes": int(sent),
        }


def train_network(
    cfg: RunConfig, shared: SiteData, on_epoch=None
) -> tuple[nn.Module, dict[str, Any]]:
    """The centralized baseline's UNet and recipe (``baselines.*``, epochs only) on what the
    sites shared."""
    started = time.perf_counter()
    net, epochs = fit_reference(cfg, shared, 0.0, cfg.training.seed, on_epoch)
    info = {
        "epochs": epochs,
        "seconds": time.perf_counter() - started,
        "parameters": sum(p.numel() for p in net.parameters()),
    }
    return net, info


def score_network(
    cfg: RunConfig, setup: SiteSetup, state: dict[str, torch.Tensor]
) -> dict[str, Any]:
    """Run the server's network on this site's own test images and score it here; only the
    metrics leave (overlays are drawn locally)."""
    started = time.perf_counter()
    check_inr_mode(cfg, setup.split.name)
    test = setup.split.test
    net = make_unet(test.num_classes, cfg.baselines.unet_channels, test.channels)
    net.load_state_dict(state)  # a network of another shape is refused here
    metrics = score_on_test(cfg, setup, predict(net, test.images))
    metrics["decode_seconds"] = time.perf_counter() - started
    return metrics
