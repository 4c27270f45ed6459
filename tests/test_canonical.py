"""Canonical coordinates: the server's key-free alignment of each site's latent basis."""

from __future__ import annotations

import pytest
import torch

from fedseg.models.canonical import canonical_basis
from fedseg.models.umn import UnifiedMappingNetwork


def _skewed_latents(n: int = 64, c: int = 8) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    spread = torch.linspace(3.0, 0.5, c)[None, :, None, None]  # distinct variances
    return torch.randn(n, c, 4, 4, generator=gen).exp() * spread  # skewed: signs are fixed


def _canonical(z: torch.Tensor, whiten: bool) -> torch.Tensor:
    weight, bias = canonical_basis(z, whiten).to_canonical()
    return torch.einsum("oc,bchw->bohw", weight, z) + bias[None, :, None, None]


@pytest.mark.parametrize("whiten", [True, False])
def test_coordinates_do_not_depend_on_an_orthogonal_key(whiten):
    z = _skewed_latents()
    q, _ = torch.linalg.qr(torch.randn(8, 8, generator=torch.Generator().manual_seed(1)))
    keyed = torch.einsum("oc,bchw->bohw", q, z) + torch.randn(8)[None, :, None, None]
    torch.testing.assert_close(_canonical(z, whiten), _canonical(keyed, whiten), atol=1e-4, rtol=0)


def test_whitened_axes_have_unit_variance_and_the_map_inverts():
    z = _skewed_latents()
    basis = canonical_basis(z, whiten=True)
    c = _canonical(z, True)
    variances = c.permute(0, 2, 3, 1).reshape(-1, 8).var(0)
    torch.testing.assert_close(variances, torch.ones(8), atol=0.02, rtol=0)
    weight, bias = basis.from_canonical()
    back = torch.einsum("oc,bchw->bohw", weight, c) + bias[None, :, None, None]
    torch.testing.assert_close(back, z, atol=1e-4, rtol=1e-4)


def test_umn_adapters_start_in_the_sites_bases():
    z = [_skewed_latents(c=8)[:, :, : 8 // s, : 8 // s] for s in (1, 2, 4)]
    umn = UnifiedMappingNetwork(["a", "b"], 8, 16, 1)
    bases = [canonical_basis(x, whiten=True) for x in z]
    umn.start_in_canonical_bases("b", bases, [canonical_basis(x, whiten=False) for x in z])
    with torch.no_grad():
        aligned = umn.in_adapters[0][1](umn._in_basis(z[0], 1, 0))
    torch.testing.assert_close(aligned, _canonical(z[0], True), atol=1e-5, rtol=0)
    with pytest.raises(KeyError, match="unknown site 'c'"):
        umn.start_in_canonical_bases("c", bases, bases)


def test_rejects_bad_latents():
    with pytest.raises(ValueError, match="NaN"):
        canonical_basis(torch.full((2, 4, 2, 2), float("nan")), whiten=True)
    with pytest.raises(ValueError, match=r"\(N, C, h, w\)"):
        canonical_basis(torch.zeros(4, 2), whiten=True)
