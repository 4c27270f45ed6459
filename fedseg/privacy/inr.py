"""Implicit neural obfuscation (Heinrich & Hansen, MIDL 2024): a hospital shares images
re-rendered by a small NeRV-style network fit jointly to a chunk of its patients, with each
image's code mixed with the other patients' codes (k-anonymity mixing).

- **The network** (:class:`NervRenderer`): one learnable code per image (``E``, n x d), a fully
  connected stem to a ``w0 x s x s`` grid, then stages of 3x3 convolution + pixel shuffle (x2)
  + GELU up to the image size, and a 3x3 convolution to the image channels with a sigmoid.
  It is fit with ``1 - SSIM`` (MONAI's ``SSIMLoss``) to the chunk's images scaled to [0, 1];
  it has fewer parameters (codes included) than the pixels it encodes
  (:func:`compression_ratio`).
- **The mixing** (:func:`mix_codes`): the codes are replaced by ``(I + rho R) E`` with ``R`` an
  n x n standard Gaussian matrix drawn fresh per release, so each rendered image is its own
  code plus ``rho`` times a random combination of the other patients' codes.
  ``rho = 0`` is the identity. The perturbation of a code grows like ``rho * sqrt(n)``: the
  chunk size is part of the privacy setting.
- **What is shared** (:func:`obfuscate`): the rendered images, each re-standardised to zero
  mean and unit std (as every loader in fedseg stores images), paired with the chunk's masks
  unchanged. The network, the codes, ``R`` and the originals stay at the hospital.

A release's ``R`` comes from a generator the caller passes: a hospital derives it from its
secret and the release's label (:func:`release_generator`), so a re-sent chunk is the same
release (no averaging of several mixes) and only the hospital could redraw it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch
from monai.losses import SSIMLoss
from torch import nn

from fedseg.data.dataset import normalise
from fedseg.privacy.keys import derive_bytes


@dataclass(frozen=True)
class InrSpec:
    """The shape of one chunk's network: image size and channels, code size, stage widths
    (from the stem to the last stage; the stem is ``image_size / 2**(len(widths)-1)`` wide)."""

    image_size: int
    channels: int
    code_dim: int
    widths: tuple[int, ...]

    @property
    def stem_size(self) -> int:
        stages = len(self.widths) - 1
        size = self.image_size >> stages
        if size < 1 or size << stages != self.image_size:
            raise ValueError(
                f"image size {self.image_size} is not a multiple of 2**{stages} "
                f"({len(self.widths)} widths)"
            )
        return size


class NervRenderer(nn.Module):
    """Codes -> images: FC stem, then conv + PixelShuffle(2) stages (NeRV, Chen et al. 2021),
    one learnable code per image of the chunk."""

    def __init__(self, n_images: int, spec: InrSpec) -> None:
        super().__init__()
        s, w = spec.stem_size, spec.widths
        self.spec = spec
        self.codes = nn.Parameter(torch.randn(n_images, spec.code_dim))
        self.stem = nn.Sequential(nn.Linear(spec.code_dim, w[0] * s * s), nn.GELU())
        self.stages = nn.Sequential(
            *(
                nn.Sequential(nn.Conv2d(a, 4 * b, 3, padding=1), nn.PixelShuffle(2), nn.GELU())
                for a, b in zip(w[:-1], w[1:], strict=True)
            )
        )
        self.head = nn.Conv2d(w[-1], spec.channels, 3, padding=1)

    def render(self, codes: torch.Tensor) -> torch.Tensor:
        """(n, d) codes -> (n, C, H, W) images in [0, 1]."""
        s = self.spec.stem_size
        x = self.stem(codes).view(len(codes), self.spec.widths[0], s, s)
        return torch.sigmoid(self.head(self.stages(x)))

    def forward(self, index: torch.Tensor) -> torch.Tensor:
        return self.render(self.codes[index])


def parameter_count(net: nn.Module) -> int:
    """Every fitted number: the network's weights and the codes."""
    return sum(p.numel() for p in net.parameters())


def compression_ratio(net: NervRenderer) -> float:
    """Pixels encoded (images x channels x H x W) per fitted parameter (codes included)."""
    spec = net.spec
    pixels = len(net.codes) * spec.channels * spec.image_size**2
    return pixels / parameter_count(net)


def to_unit(images: np.ndarray) -> torch.Tensor:
    """Each image to [0, 1] by its own 0.5 and 99.5 percentiles (the fit's target range)."""
    x = torch.as_tensor(images, dtype=torch.float32)
    flat = x.flatten(1)
    lo = torch.quantile(flat, 0.005, dim=1)[:, None, None, None]
    hi = torch.quantile(flat, 0.995, dim=1)[:, None, None, None]
    return ((x - lo) / (hi - lo).clamp_min(1e-6)).clamp(0, 1)


@dataclass
class FitStats:
    loss_start: float  # 1 - SSIM over the chunk before the first step
    loss_end: float  # ... after the last
    steps: int
    seconds: float
    parameters: int
    pixels: int

    @property
    def ratio(self) -> float:
        return self.pixels / self.parameters


class SeparableSsimLoss(nn.Module):
    """MONAI's ``SSIMLoss`` (2D, Gaussian window 11, sigma 1.5, no padding, k1 0.01, k2 0.03,
    mean over pixels and images), with the five local moments blurred by two band-matrix
    products (the window is separable): the same value (tests/test_inr.py compares them), and
    4x less time per fitting step on a CPU, where the backward pass of MONAI's single-channel
    11x11 convolutions took three quarters of it."""

    def __init__(self, data_range: float = 1.0, win: int = 11, sigma: float = 1.5) -> None:
        super().__init__()
        dist = torch.arange((1 - win) / 2, (1 + win) / 2, 1.0)
        g = torch.exp(-((dist / sigma) ** 2) / 2)
        self.window: torch.Tensor
        self.register_buffer("window", g / g.sum())
        self.c1, self.c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2

    def _band(self, size: int) -> torch.Tensor:
        """(size - win + 1, size): the window as a matrix (a valid 1D convolution)."""
        win = self.window
        out = torch.zeros(size - len(win) + 1, size, dtype=win.dtype)
        for i in range(len(out)):
            out[i, i : i + len(win)] = win
        return out

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        stack = torch.stack([x, y, x * x, y * y, x * y])  # (5, n, c, h, w)
        blurred = self._band(h) @ stack @ self._band(w).T  # matrix products: fast backward
        mx, my, mxx, myy, mxy = blurred.unbind(0)
        sx, sy, sxy = mxx - mx * mx, myy - my * my, mxy - mx * my
        cs = (2 * sxy + self.c2) / (sx + sy + self.c2)
        ssim = (2 * mx * my + self.c1) / (mx * mx + my * my + self.c1) * cs
        return 1 - ssim.mean()


def ssim_loss(net: NervRenderer, target: torch.Tensor, batch: int = 32) -> float:
    """1 - SSIM of the whole chunk's rendering (no mixing), with MONAI's ``SSIMLoss``."""
    loss = SSIMLoss(spatial_dims=2, data_range=1.0)
    with torch.no_grad():
        parts = [
            float(loss(net(torch.arange(i, min(i + batch, len(target)))), target[i : i + batch]))
            * len(target[i : i + batch])
            for i in range(0, len(target), batch)
        ]
    return sum(parts) / len(target)


def fit(
    images: np.ndarray,
    spec: InrSpec,
    steps: int,
    lr: float,
    batch: int,
    seed: int,
) -> tuple[NervRenderer, FitStats]:
    """Fit one network to a chunk of images ((n, C, H, W), any scale) with 1 - SSIM: ``steps``
    Adam steps on ``batch`` images each, cosine learning rate. The loss before and after is
    MONAI's ``SSIMLoss`` over the whole chunk."""
    started = time.perf_counter()
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    target = to_unit(images)
    net = NervRenderer(len(target), spec)
    loss_fn = SeparableSsimLoss()
    optimizer = torch.optim.Adam(net.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, max(steps, 1), lr * 0.05)
    loss_start = ssim_loss(net, target)
    batch = min(batch, len(target))
    order = torch.randperm(len(target), generator=gen)
    for step in range(steps):
        at = (step * batch) % len(target)
        if at + batch > len(target):
            order = torch.randperm(len(target), generator=gen)
            at = 0
        index = order[at : at + batch]
        loss = loss_fn(net(index), target[index])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    net.eval()
    stats = FitStats(
        loss_start=loss_start,
        loss_end=ssim_loss(net, target),
        steps=steps,
        seconds=time.perf_counter() - started,
        parameters=parameter_count(net),
        pixels=int(target.numel()),
    )
    return net, stats


def mix_codes(codes: torch.Tensor, rho: float, generator: torch.Generator) -> torch.Tensor:
    """k-anonymity mixing: ``(I + rho R) E`` with ``R`` an n x n standard Gaussian drawn from
    ``generator`` (fresh per release); ``rho = 0`` returns the codes unchanged."""
    n = len(codes)
    r = torch.randn(n, n, generator=generator, dtype=codes.dtype)
    return (torch.eye(n, dtype=codes.dtype) + rho * r) @ codes


def release_generator(secret: bytes, label: str) -> torch.Generator:
    """The generator of one release's ``R``: from the hospital's secret and the release's
    label (run, site, chunk), so nobody else can redraw it and a retried chunk is the same."""
    seed = int.from_bytes(derive_bytes(secret, f"fedseg-inr-mixing/{label}", 8), "big")
    return torch.Generator().manual_seed(seed >> 1)  # torch seeds are < 2**63


@torch.no_grad()
def render(net: NervRenderer, rho: float, generator: torch.Generator) -> np.ndarray:
    """The chunk re-rendered from mixed codes, each image re-standardised as loaders store
    images (zero mean, unit std): (n, C, H, W) float32."""
    codes = mix_codes(net.codes.detach(), rho, generator)
    images = torch.cat([net.render(codes[i : i + 32]) for i in range(0, len(codes), 32)])
    return np.stack([normalise(im) for im in images.numpy()])


def obfuscate(
    images: np.ndarray,
    spec: InrSpec,
    rho: float,
    generator: torch.Generator,
    steps: int,
    lr: float,
    batch: int,
    seed: int,
) -> tuple[np.ndarray, FitStats]:
    """Fit a network to the chunk, then render it from mixed codes: what the hospital shares
    (its masks go beside these unchanged)."""
    net, stats = fit(images, spec, steps, lr, batch, seed)
    return render(net, rho, generator), stats


def chunk_bounds(n: int, chunk: int) -> list[tuple[int, int]]:
    """[start, stop) of each chunk of ``n`` images: ``ceil(n / chunk)`` chunks as equal as
    possible (68 images at 64 make two of 34, not 64 and a network for 4)."""
    if n <= 0:
        return []
    k = -(-n // chunk)
    edges = np.linspace(0, n, k + 1).round().astype(int)
    return [(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:], strict=True)]
