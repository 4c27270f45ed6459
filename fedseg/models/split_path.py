"""The split-training path (image encoder -> UMN -> mask decoder) as one pooled network.

It is the architecture's own ceiling: the same layers a federated split-training run trains,
trained like the centralized UNet (pooled data, one copy, no key, no averaging). Its distance
to the UNet is what the architecture costs; its distance to a federated run is what the
federation (SplitFed averaging, keys, the wire) costs. One difference is left: the UMN's input
bases stay the identity here, where a federated run takes them from the first batch it maps.
"""

from __future__ import annotations

import torch
from torch import nn

from fedseg.config import RunConfig
from fedseg.models.umn import build_umn
from fedseg.site import SiteModels

POOLED_SITE = "pooled"


class SplitPathNet(nn.Module):
    def __init__(self, cfg: RunConfig, num_classes: int) -> None:
        super().__init__()
        models = SiteModels.build(cfg, num_classes)
        self.encoder = models.image_ae.encoder
        self.decoder = models.mask_ae.decoder
        self.umn = build_umn(cfg.model, [POOLED_SITE])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        latents, local = self.encoder.encode(x)
        return self.decoder(self.umn(latents, 0), local if self.decoder.local_skips else None)
