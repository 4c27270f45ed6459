"""An HE-friendly mapping network: what the server can evaluate on CKKS ciphertexts.

Encrypted queries (``privacy.query = "ckks"``, ``fedseg/privacy/ckks.py``) can only use what
CKKS computes cheaply: sums, products with plaintext weights and a few ciphertext squares.
So this network is, per latent scale and per position,

    h = A_s x + a_s                       (1x1: site basis, adapter and stem folded)
    y = Q_s h^2 + L_s h + c_s             (a learned quadratic activation, folded into the head)

with ``x`` the keyed image latents and ``y`` the keyed mask latents, the three scales (1/8,
1/16, 1/32) each with their own weights, as the UMN's stems and heads are. The activation is
``alpha h^2 + beta h`` per hidden channel and scale (``alpha`` starts small, ``beta`` at 1), so
its coefficients fold into the next layer's weights: the encrypted forward is two plaintext
matrix products and one ciphertext square, multiplicative depth 3 (``hidden_layers`` more
hidden layers add 2 each). There is no normalisation, max, division or branching anywhere; the
per-site bases and adapters are affine 1x1 maps (the fast UMN's adapters also have a SiLU
residual, which CKKS cannot evaluate), so they fold into the first and last layer too.

No spatial mixing: the site's encoder and mask decoder do the spatial work, and split
training trains them around this network (rotations across positions would cost a Galois key
and a key switch per step). Channel mixing packs several channels per ciphertext and moves them
with rotations by one block (``fedseg/privacy/ckks.py``).

:meth:`HEMappingNetwork.folded` gives the per-scale matrices the encrypted evaluation uses;
:func:`folded_forward` evaluates them in plaintext (float64), which is what a test compares the
encrypted result with, and what equals the network's forward up to float rounding.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import cast

import numpy as np
import torch
from torch import nn

from fedseg.models.autoencoder import Latents
from fedseg.models.umn import UnifiedMappingNetwork

ALPHA_START = 0.05  # the quadratic coefficient's start: nearly linear, but curved from step one


class AffineAdapter(nn.Conv2d):
    """Identity-start 1x1 affine adapter (no nonlinear residual: it must fold into a matrix)."""

    def __init__(self, channels: int) -> None:
        super().__init__(channels, channels, 1)
        assert self.bias is not None
        with torch.no_grad():
            self.weight.copy_(torch.eye(channels)[:, :, None, None])
            self.bias.zero_()


class PolyActivation(nn.Module):
    """``alpha h^2 + beta h`` per channel, learned; one ciphertext square when encrypted."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.alpha = nn.Parameter(torch.full((channels,), ALPHA_START))
        self.beta = nn.Parameter(torch.ones(channels))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        a, b = self.alpha[None, :, None, None], self.beta[None, :, None, None]
        return a * h * h + b * h


@dataclass
class FoldedLayer:
    """One layer of the folded network at one scale: ``out = quad @ h^2 + lin @ h + bias``
    (``quad`` is None for the first layer, which is affine in the input)."""

    lin: np.ndarray  # (out, in)
    bias: np.ndarray  # (out,)
    quad: np.ndarray | None = None  # (out, in)


class HEMappingNetwork(UnifiedMappingNetwork):
    """Same interface as :class:`UnifiedMappingNetwork` (bases, adapters, ``forward``), so the
    coordinator, split training and checkpoints work unchanged; ``blocks`` is unused."""

    def __init__(
        self,
        sites: list[str],
        latent_channels: int,
        width: int,
        blocks: int = 0,
        shared_adapters: bool = False,
        hidden_layers: int = 1,
    ) -> None:
        self.hidden_layers = hidden_layers
        super().__init__(sites, latent_channels, width, blocks, shared_adapters)
        n_adapters = 1 if shared_adapters else len(sites)
        c = latent_channels
        self.in_adapters = nn.ModuleList(
            nn.ModuleList(AffineAdapter(c) for _ in range(n_adapters)) for _ in range(3)
        )
        self.out_adapters = nn.ModuleList(
            nn.ModuleList(AffineAdapter(c) for _ in range(n_adapters)) for _ in range(3)
        )

    def _build_trunk(self, c: int, w: int, blocks: int) -> None:
        if self.hidden_layers < 1:
            raise ValueError("the HE mapping network needs at least one hidden layer")
        self.stems = nn.ModuleList(nn.Conv2d(c, w, 1) for _ in range(3))
        self.acts = nn.ModuleList(
            nn.ModuleList(PolyActivation(w) for _ in range(3)) for _ in range(self.hidden_layers)
        )
        self.mixes = nn.ModuleList(
            nn.ModuleList(nn.Conv2d(w, w, 1) for _ in range(3))
            for _ in range(self.hidden_layers - 1)
        )
        self.heads = nn.ModuleList(nn.Conv2d(w, c, 1) for _ in range(3))

    @property
    def depth(self) -> int:
        """Multiplicative depth of the encrypted forward: a plaintext product per layer and a
        ciphertext square per hidden layer."""
        return 1 + 2 * self.hidden_layers

    def trunk(self, aligned: Latents) -> Latents:
        out = []
        for s, z in enumerate(aligned):
            h = self.stems[s](z)
            for layer in range(self.hidden_layers):
                h = self._act(layer, s)(h)
                h = self._mix(layer, s)(h)
            out.append(h)
        return out

    def _act(self, layer: int, scale: int) -> PolyActivation:
        return cast(PolyActivation, cast(nn.ModuleList, self.acts[layer])[scale])

    def _mix(self, layer: int, scale: int) -> nn.Conv2d:
        """The layer after activation ``layer``: a hidden mixing layer, or the head."""
        if layer == self.hidden_layers - 1:
            return cast(nn.Conv2d, self.heads[scale])
        return cast(nn.Conv2d, cast(nn.ModuleList, self.mixes[layer])[scale])

    def _adapter(self, side: str, scale: int, index: int) -> nn.Conv2d:
        adapters = self.in_adapters if side == "in" else self.out_adapters
        return cast(nn.Conv2d, cast(nn.ModuleList, adapters[scale])[index])

    @torch.no_grad()
    def folded(self, site: str) -> list[list[FoldedLayer]]:
        """Per scale, the layers the encrypted forward evaluates for ``site`` (float64): the
        input basis, adapter and stem folded into the first; each activation's coefficients
        folded into the layer after it; the head, output adapter and output basis into the
        last."""
        index = self.site_index(site)
        a = 0 if self.shared_adapters else index
        scales = []
        for s in range(3):
            basis_w, basis_b = _affine_basis(self.in_basis[index, s], self.in_offset[index, s])
            ad_w, ad_b = _conv_affine(self._adapter("in", s, a))
            stem_w, stem_b = _conv_affine(cast(nn.Conv2d, self.stems[s]))
            w = stem_w @ ad_w @ basis_w
            b = stem_w @ (ad_w @ basis_b + ad_b) + stem_b
            layers = [FoldedLayer(lin=w, bias=b)]
            for layer in range(self.hidden_layers):
                act = self._act(layer, s)
                alpha = act.alpha.double().numpy()
                beta = act.beta.double().numpy()
                last = layer == self.hidden_layers - 1
                mw, mb = _conv_affine(self._mix(layer, s))
                if last:
                    oa_w, oa_b = _conv_affine(self._adapter("out", s, a))
                    ob_w, ob_b = _affine_basis(self.out_basis[index, s], self.out_offset[index, s])
                    post_w = ob_w @ oa_w
                    mb = ob_w @ (oa_w @ mb + oa_b) + ob_b
                    mw = post_w @ mw
                layers.append(
                    FoldedLayer(lin=mw * beta[None, :], bias=mb, quad=mw * alpha[None, :])
                )
            scales.append(layers)
        return scales


def _conv_affine(conv: nn.Conv2d) -> tuple[np.ndarray, np.ndarray]:
    w = conv.weight.detach().double()[:, :, 0, 0].numpy()
    b = (
        conv.bias.detach().double().numpy()
        if conv.bias is not None
        else np.zeros(w.shape[0], dtype=np.float64)
    )
    return w, b


def _affine_basis(weight: torch.Tensor, offset: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    return weight.detach().double().numpy(), offset.detach().double().numpy()


def folded_forward(scales: list[list[FoldedLayer]], latents: list[np.ndarray]) -> list[np.ndarray]:
    """The folded network in float64 on (N, C, h, w) arrays: the plaintext twin of the
    encrypted evaluation, operation for operation."""
    out = []
    for layers, z in zip(scales, latents, strict=True):
        n, c, hh, ww = z.shape
        x = z.astype(np.float64).transpose(1, 0, 2, 3).reshape(c, -1)
        h = layers[0].lin @ x + layers[0].bias[:, None]
        for layer in layers[1:]:
            assert layer.quad is not None
            h = layer.quad @ (h * h) + layer.lin @ h + layer.bias[:, None]
        out.append(h.reshape(-1, n, hh, ww).transpose(1, 0, 2, 3))
    return out
