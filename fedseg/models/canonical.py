"""Canonical coordinates of a site's latent space, computed by the server from what it holds.

Every site trains its own autoencoders, and with ``client`` custody its latents are also mixed
by a keyed orthogonal map the server never learns. Both differences are, at each pixel, an
affine change of channel basis. Principal axes undo that without any key: the covariance of
``z' = R z + b`` (R orthogonal) is ``R C R^T``, so its eigenvectors are R times those of
``C`` and projecting ``z' - mean`` on them gives the same coordinates as projecting ``z - mean``
on C's. Each axis's sign is fixed by the sign of its third moment, so the coordinates agree
with and without the key (up to axes of equal variance or zero skew).

The server initialises each site's 1x1 adapters with these coordinates, so the UMN starts in a
shared, well-conditioned basis in either custody instead of learning each site's basis from a
random start. This is also a plain statement of what KLT does not hide: the eigenvalue spectrum
and the principal-axis coordinates of a site's latents survive any orthogonal key.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

EIGEN_FLOOR = 1e-3  # relative to the mean eigenvalue: keeps near-empty axes from blowing up


@dataclass
class CanonicalBasis:
    """``c = scale^-1 * axes^T (z - mean)`` per pixel; ``z = axes (scale * c) + mean``."""

    mean: torch.Tensor  # (C,)
    axes: torch.Tensor  # (C, C), columns are principal axes, sign-fixed
    scale: torch.Tensor  # (C,) per-axis standard deviation (whitening) or one global value

    def to_canonical(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Weight (C, C) and bias (C,) of the 1x1 map z -> c."""
        weight = self.axes.T / self.scale[:, None]
        return weight, -weight @ self.mean

    def from_canonical(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Weight and bias of the 1x1 map c -> z."""
        return self.axes * self.scale[None, :], self.mean.clone()


def canonical_basis(latents: torch.Tensor, whiten: bool) -> CanonicalBasis:
    """Principal axes of one latent scale (N, C, h, w), each pixel a sample.

    ``whiten`` gives every axis unit variance (good for inputs); otherwise one global scale
    keeps the geometry, so a mean-squared error in canonical space is the one in latent space
    divided by a constant (good for outputs).
    """
    if latents.ndim != 4:
        raise ValueError(f"latents must be (N, C, h, w), got shape {tuple(latents.shape)}")
    x = latents.detach().double().permute(0, 2, 3, 1).reshape(-1, latents.shape[1])
    if not torch.isfinite(x).all():
        raise ValueError("latents contain NaN or infinite values")
    mean = x.mean(0)
    x = x - mean
    cov = x.T @ x / max(len(x) - 1, 1)
    eigenvalues, axes = torch.linalg.eigh(cov)
    order = torch.argsort(eigenvalues, descending=True)
    eigenvalues, axes = eigenvalues[order].clamp_min(0), axes[:, order]
    skew = ((x @ axes) ** 3).mean(0)
    axes = axes * torch.where(skew < 0, -1.0, 1.0).to(axes)[None, :]
    floor = EIGEN_FLOOR * eigenvalues.mean().clamp_min(1e-12)
    if whiten:
        scale = (eigenvalues + floor).sqrt()
    else:
        scale = eigenvalues.mean().clamp_min(1e-12).sqrt().expand(len(eigenvalues)).clone()
    return CanonicalBasis(mean.float(), axes.float(), scale.float())
