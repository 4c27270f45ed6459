"""Per-site UMN adapters: a 1x1 affine map plus a small per-pixel nonlinear residual.

A site's keyed latents differ from the shared trunk's features by the site's own encoder and,
in client custody, by its key. KLT is affine over channels, so a 1x1 convolution can undo it
exactly. KNT is not: it interleaves keyed channel mixing with keyed monotone per-channel
bends. The residual ``V phi(U x + d)`` (a 1x1-conv MLP over channels, ``phi`` = SiLU) lets each
site's adapter learn such bends too, without the server ever holding the key::

    adapter(x) = W x + b + V silu(U x + d)

``W`` starts at identity and ``V`` at zero, so every adapter starts as the identity (the UMN
starts exactly where the affine-only adapters did). Checkpoints made before the residual
existed load unchanged: their missing ``U, d, V`` keep the zero-residual start, which is the
older network exactly.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

HIDDEN = 4  # hidden width of the residual, in multiples of the latent channels


class SiteAdapter(nn.Conv2d):
    """1x1 affine map (the ``Conv2d`` itself: ``weight``, ``bias``) plus a nonlinear residual."""

    def __init__(self, channels: int, hidden: int | None = None) -> None:
        super().__init__(channels, channels, 1)
        hidden = hidden or HIDDEN * channels
        self.expand = nn.Conv2d(channels, hidden, 1)
        self.project = nn.Conv2d(hidden, channels, 1)
        assert self.bias is not None and self.project.bias is not None  # bias=True, the default
        with torch.no_grad():
            self.weight.copy_(torch.eye(channels)[:, :, None, None])
            self.bias.zero_()
            self.project.weight.zero_()
            self.project.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) + self.project(F.silu(self.expand(x)))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing, *args):
        # Older checkpoints hold only the affine part: keep the zero residual for them.
        if prefix + "weight" in state_dict and prefix + "expand.weight" not in state_dict:
            for name, tensor in (*self.expand.state_dict().items(),):
                state_dict[prefix + "expand." + name] = tensor.clone()
            for name, tensor in (*self.project.state_dict().items(),):
                state_dict[prefix + "project." + name] = torch.zeros_like(tensor)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing, *args)


def site_adapters(n_sites: int, channels: int) -> nn.ModuleList:
    """One identity-start adapter per site (for one scale and side of the UMN)."""
    return nn.ModuleList(SiteAdapter(channels) for _ in range(n_sites))
