"""Keyed latent transform (KLT): an exact bijection on each latent scale.

``z' = P Q z + b`` mixes channels at every pixel with a keyed orthogonal map and adds a keyed
bias. Because P Q is orthogonal, distances between latents are preserved: a mean-squared error
measured in keyed space equals the one in plain space, so the server can train on keyed latents
without losing anything, while the channels it sees are scrambled.

Speed: a query keys three small latent maps and un-keys three more, so per-call overhead, not
arithmetic, is the cost. :class:`LatentTransform` converts each key once (the fused matrix
``M = P Q``, its inverse ``M^T`` and the inverse's bias ``-M^T b``, per dtype) and applies each
scale with one ``linear`` (an addmm) on a (pixels, channels) view: no einsum planning, no
temporaries, and channels-last latents (what the encoders produce) need no copy at all.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

from fedseg.models.autoencoder import Latents
from fedseg.privacy.keys import KeyRing, LatentKey


def _tensors(key: LatentKey, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    mixing = torch.as_tensor(key.mixing, dtype=like.dtype, device=like.device)
    bias = torch.as_tensor(key.bias, dtype=like.dtype, device=like.device)
    return mixing, bias[None, :, None, None]


def apply_klt(z: torch.Tensor, key: LatentKey) -> torch.Tensor:
    """Key one latent scale (B, C, h, w) (reference form; :class:`LatentTransform` is faster)."""
    mixing, bias = _tensors(key, z)
    return torch.einsum("oc,bchw->bohw", mixing, z) + bias


def invert_klt(z: torch.Tensor, key: LatentKey) -> torch.Tensor:
    """Exact inverse: z = (P Q)^T (z' - b)."""
    mixing, bias = _tensors(key, z)
    return torch.einsum("co,bchw->bohw", mixing, z - bias)


class _Affine:
    """``y = W x + v`` over the channels of (B, C, h, w) maps, ``W`` and ``v`` fixed."""

    __slots__ = ("_by_dtype", "_v", "_w")

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor) -> None:
        self._w, self._v = weight, bias  # float64 masters
        self._by_dtype: dict[tuple[torch.dtype, torch.device], tuple] = {}

    def __call__(self, z: torch.Tensor) -> torch.Tensor:
        prepared = self._by_dtype.get((z.dtype, z.device))
        if prepared is None:
            prepared = (self._w.to(z.device, z.dtype), self._v.to(z.device, z.dtype))
            self._by_dtype[(z.dtype, z.device)] = prepared
        # (B, h, w, C) is a view of a channels-last map, so this is one addmm on its pixels;
        # the result is channels-last too (an NCHW input costs one internal copy).
        return F.linear(z.permute(0, 2, 3, 1), *prepared).permute(0, 3, 1, 2)


class LatentTransform:
    """The transform a site applies to its latents; ``None`` keys mean 'transform = none'."""

    def __init__(self, ring: KeyRing | None) -> None:
        self._ring = ring
        self._forward: dict[str, list[_Affine]] = {}
        self._inverse: dict[str, list[_Affine]] = {}
        if ring is None:
            return
        for role, keys in ring.keys.items():
            fwd, inv = [], []
            for key in keys:
                m = torch.from_numpy(key.mixing).double()
                bias = torch.from_numpy(key.bias).double()
                fwd.append(_Affine(m, bias))
                inv.append(_Affine(m.T.contiguous(), -(m.T @ bias)))
            self._forward[role], self._inverse[role] = fwd, inv

    @property
    def enabled(self) -> bool:
        return self._ring is not None

    def forward(self, latents: Latents, role: str) -> Latents:
        if self._ring is None:
            return list(latents)
        return [f(z) for f, z in zip(self._forward[role], latents, strict=True)]

    def inverse(self, latents: Latents, role: str) -> Latents:
        if self._ring is None:
            return list(latents)
        return [f(z) for f, z in zip(self._inverse[role], latents, strict=True)]

    def __repr__(self) -> str:
        return f"LatentTransform(enabled={self.enabled})"
