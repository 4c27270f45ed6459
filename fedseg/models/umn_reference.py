"""The mapping network at the reference PPCMI-SF paper's size, for side-by-side measurement.

The paper describes its unified mapping network as three per-scale blocks with 128, 256, 512
and 1024 channel stages, an inner three-level U and pyramid pooling with bins 1, 3, 5 and 7,
about 58.8 M parameters. This is a reconstruction from that description (the reference code's
exact layer list is not reproduced):

- one per-scale block per latent scale (1/8 -> 128 channels, 1/16 -> 256, 1/32 -> 512): a 1x1
  stem from the latent channels and a residual block of two 3x3 convolutions;
- an inner U with three levels (128 @ 1/8, 256 @ 1/16, 512 @ 1/32) around a 1024-channel
  bottleneck at 1/64, each level taking its scale's block output as well as the level above;
- pyramid pooling (bins 1, 3, 5, 7, 224 channels each, fused by a 3x3 convolution) on the
  bottleneck, as in PSPNet;
- a decoder back up the U (bilinear upsampling, skip concatenation, two 3x3 convolutions) with
  a 1x1 head per scale.

Fully convolutional, so the parameter count does not depend on the input size (59.1 M with 32
latent channels and 3 sites); at 128 px input the bottleneck is 2x2 (the reference code pools
the coarsest latent to nothing at 128; this one clamps the pyramid bins instead). The per-site
canonical bases and identity-start adapters are the fast network's (the subclass only swaps
the trunk), so the coordinator, training and checkpoints work with either.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from fedseg.models.autoencoder import Latents
from fedseg.models.umn import UnifiedMappingNetwork, _up

STAGES = (128, 256, 512, 1024)
BINS = (1, 3, 5, 7)


def _conv(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.GroupNorm(32, cout)]


def double_conv(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(*_conv(cin, cout), nn.ReLU(inplace=True), *_conv(cout, cout), nn.ReLU())


class ResBlock(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.body = nn.Sequential(*_conv(width, width), nn.ReLU(inplace=True), *_conv(width, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x + self.body(x))


class PyramidPooling(nn.Module):
    """PSPNet pooling: bins that exceed the map are clamped to its size."""

    def __init__(self, width: int, bins: tuple[int, ...] = BINS, branch: int = 224) -> None:
        super().__init__()
        self.bins = bins
        self.reduce = nn.ModuleList(
            nn.Sequential(nn.Conv2d(width, branch, 1, bias=False), nn.GroupNorm(32, branch))
            for _ in bins
        )
        self.fuse = nn.Sequential(*_conv(width + branch * len(bins), width), nn.ReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        parts = [x]
        for bin_size, reduce in zip(self.bins, self.reduce, strict=True):
            pooled = F.relu(reduce(F.adaptive_avg_pool2d(x, min(bin_size, h, w))))
            parts.append(F.interpolate(pooled, size=(h, w), mode="bilinear", align_corners=False))
        return self.fuse(torch.cat(parts, 1))


class ReferenceMappingNetwork(UnifiedMappingNetwork):
    """Same interface as :class:`UnifiedMappingNetwork`; ``width`` and ``blocks`` are unused
    (the reference size is fixed)."""

    def __init__(
        self,
        sites: list[str],
        latent_channels: int,
        width: int = 0,
        blocks: int = 0,
        shared_adapters: bool = False,
    ) -> None:
        super().__init__(sites, latent_channels, width, blocks, shared_adapters)

    def _build_trunk(self, c: int, w: int, blocks: int) -> None:
        s1, s2, s3, s4 = STAGES
        self.stems = nn.ModuleList(nn.Conv2d(c, s, 1) for s in (s1, s2, s3))
        self.scale_blocks = nn.ModuleList(ResBlock(s) for s in (s1, s2, s3))
        self.enc = nn.ModuleList(
            [double_conv(s1, s1), double_conv(s1 + s2, s2), double_conv(s2 + s3, s3)]
        )
        self.bottom = double_conv(s3, s4)
        self.context = PyramidPooling(s4)
        self.dec = nn.ModuleList(
            [double_conv(s4 + s3, s3), double_conv(s3 + s2, s2), double_conv(s2 + s1, s1)]
        )
        self.heads = nn.ModuleList(nn.Conv2d(s, c, 1) for s in (s3, s2, s1))

    def trunk(self, aligned: Latents) -> Latents:
        x = [
            blk(stem(z))
            for blk, stem, z in zip(self.scale_blocks, self.stems, aligned, strict=True)
        ]
        e8 = self.enc[0](x[0])
        e16 = self.enc[1](torch.cat([_pool(e8), x[1]], 1))
        e32 = self.enc[2](torch.cat([_pool(e16), x[2]], 1))
        b = self.context(self.bottom(_pool(e32)))
        d32 = self.dec[0](torch.cat([_up(b, e32), e32], 1))
        d16 = self.dec[1](torch.cat([_up(d32, e16), e16], 1))
        d8 = self.dec[2](torch.cat([_up(d16, e8), e8], 1))
        o32, o16, o8 = (head(d) for head, d in zip(self.heads, (d32, d16, d8), strict=True))
        return [o8, o16, o32]


def _pool(x: torch.Tensor) -> torch.Tensor:
    """Halve the resolution (a 1x1 map stays 1x1)."""
    return F.max_pool2d(x, 2, ceil_mode=True)
