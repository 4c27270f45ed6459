"""Keyed latent transform (KLT): an exact bijection on each latent scale.

``z' = P Q z + b`` mixes channels at every pixel with a keyed orthogonal map and adds a keyed
bias. Because P Q is orthogonal, distances between latents are preserved: a mean-squared error
measured in keyed space equals the one in plain space, so the server can train on keyed latents
without losing anything, while the channels it sees are scrambled.
"""

from __future__ import annotations

import torch

from fedseg.models.autoencoder import Latents
from fedseg.privacy.keys import KeyRing, LatentKey


def _tensors(key: LatentKey, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    mixing = torch.as_tensor(key.mixing, dtype=like.dtype, device=like.device)
    bias = torch.as_tensor(key.bias, dtype=like.dtype, device=like.device)
    return mixing, bias[None, :, None, None]


def apply_klt(z: torch.Tensor, key: LatentKey) -> torch.Tensor:
    """Key one latent scale (B, C, h, w)."""
    mixing, bias = _tensors(key, z)
    return torch.einsum("oc,bchw->bohw", mixing, z) + bias


def invert_klt(z: torch.Tensor, key: LatentKey) -> torch.Tensor:
    """Exact inverse: z = (P Q)^T (z' - b)."""
    mixing, bias = _tensors(key, z)
    return torch.einsum("co,bchw->bohw", mixing, z - bias)


class LatentTransform:
    """The transform a site applies to its latents; ``None`` keys mean 'transform = none'."""

    def __init__(self, ring: KeyRing | None) -> None:
        self._ring = ring

    @property
    def enabled(self) -> bool:
        return self._ring is not None

    def forward(self, latents: Latents, role: str) -> Latents:
        if self._ring is None:
            return list(latents)
        return [apply_klt(z, k) for z, k in zip(latents, self._ring.keys[role], strict=True)]

    def inverse(self, latents: Latents, role: str) -> Latents:
        if self._ring is None:
            return list(latents)
        return [invert_klt(z, k) for z, k in zip(latents, self._ring.keys[role], strict=True)]

    def __repr__(self) -> str:
        return f"LatentTransform(enabled={self.enabled})"
