"""Synthetic hospitals: a learnable organ/lesion task whose look differs from site to site.

Real federations differ in scanner gain, contrast, noise and case mix; each synthetic site draws
those from its index so that a demo shows the same kind of heterogeneity without any data.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from fedseg.data.dataset import SiteData, normalise

CLASS_NAMES = ["background", "organ", "lesion"]


@dataclass(frozen=True)
class SiteStyle:
    """How one synthetic hospital's scanner and patients look."""

    offset: float  # background level
    contrast: float  # organ - background
    lesion_contrast: float  # lesion - organ (sign differs between sites: like a modality change)
    noise: float  # additive Gaussian std
    speckle: float  # multiplicative noise std (ultrasound-like)
    blur: int  # box-blur radius in pixels at 128 px
    texture: float  # amplitude of smooth background texture
    lesions: tuple[int, int]  # min/max lesions per image
    organ_size: tuple[float, float]  # semi-axis range, fraction of the half-width
    lesion_size: tuple[float, float]  # semi-axis range, fraction of the half-width
    spacing_mm: float  # mm per pixel at 256 px


def site_style(index: int, seed: int) -> SiteStyle:
    """Deterministic per-site parameters: index sets the broad style, seed jitters it."""
    rng = np.random.default_rng([seed, index, 1_000_003])
    big = index % 3 == 2
    return SiteStyle(
        offset=float(0.2 + 0.25 * (index % 4) + rng.uniform(-0.05, 0.05)),
        contrast=float(rng.uniform(0.35, 0.6) * (1.0 if index % 2 == 0 else 0.8)),
        lesion_contrast=float(rng.uniform(0.3, 0.45) * (1 if index % 2 == 0 else -1)),
        noise=float(0.06 + 0.04 * (index % 3) + rng.uniform(0, 0.02)),
        speckle=float(0.25 if index % 4 == 1 else 0.0),
        blur=int(index % 3),
        texture=float(rng.uniform(0.05, 0.15)),
        lesions=(1, 2) if index % 2 == 0 else (1, 4),
        organ_size=(0.45, 0.7) if big else (0.3, 0.55),
        lesion_size=(0.08, 0.18) if index % 2 == 0 else (0.05, 0.12),
        spacing_mm=float(0.6 + 0.1 * (index % 5)),
    )


def _ellipse(
    yy: np.ndarray, xx: np.ndarray, cy: float, cx: float, ry: float, rx: float, angle: float
) -> np.ndarray:
    c, s = np.cos(angle), np.sin(angle)
    dy, dx = yy - cy, xx - cx
    u, v = c * dx + s * dy, -s * dx + c * dy
    return (u / rx) ** 2 + (v / ry) ** 2 <= 1.0


def _box_blur(image: np.ndarray, radius: int) -> np.ndarray:
    """Separable box blur via cumulative sums (no SciPy needed)."""
    if radius <= 0:
        return image
    k = 2 * radius + 1
    for axis in (0, 1):
        padded = np.pad(
            image, [(radius + 1, radius) if a == axis else (0, 0) for a in (0, 1)], "edge"
        )
        c = np.cumsum(padded, axis=axis, dtype=np.float64)
        hi = np.take(c, np.arange(k, c.shape[axis]), axis=axis)
        lo = np.take(c, np.arange(0, c.shape[axis] - k), axis=axis)
        image = ((hi - lo) / k).astype(np.float32)
    return image


def _texture(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Smooth random field: a coarse grid upsampled bicubically."""
    coarse = rng.standard_normal((cells, cells)).astype(np.float32)
    return np.asarray(Image.fromarray(coarse).resize((size, size), Image.Resampling.BICUBIC))


def _sample(
    style: SiteStyle, rng: np.random.Generator, size: int, yy: np.ndarray, xx: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    mask = np.zeros((size, size), np.int64)
    ry, rx = rng.uniform(*style.organ_size, size=2)
    cy, cx = rng.uniform(-0.25, 0.25, size=2)
    angle = rng.uniform(0, np.pi)
    organ = _ellipse(yy, xx, cy, cx, ry, rx, angle)
    mask[organ] = 1
    for _ in range(rng.integers(style.lesions[0], style.lesions[1] + 1)):
        # Mostly inside the organ, sometimes straddling its border.
        r, t = np.sqrt(rng.uniform(0, 1)) * 0.85, rng.uniform(0, 2 * np.pi)
        ly = cy + r * ry * np.sin(t)
        lx = cx + r * rx * np.cos(t)
        lry, lrx = rng.uniform(*style.lesion_size, size=2)
        mask[_ellipse(yy, xx, ly, lx, lry, lrx, rng.uniform(0, np.pi))] = 2

    image = style.offset + style.texture * _texture(rng, size, 6)
    organ_level = style.contrast * (1 + 0.15 * rng.standard_normal())
    lesion_level = organ_level + style.lesion_contrast * (1 + 0.15 * rng.standard_normal())
    image = image + np.where(mask == 1, organ_level, 0.0) + np.where(mask == 2, lesion_level, 0.0)
    image = image + 0.5 * style.texture * _texture(rng, size, 16) * (mask > 0)  # organ texture
    image = _box_blur(image.astype(np.float32), round(style.blur * size / 128))
    if style.speckle > 0:
        image = image * (1 + style.speckle * rng.standard_normal((size, size)))
    image = image + style.noise * rng.standard_normal((size, size))
    return image.astype(np.float32), mask


def synthetic_site(index: int, n: int, size: int, seed: int, name: str = "") -> SiteData:
    """``n`` images of site ``index``; image i depends only on (seed, index, i), not on n."""
    name = name or f"hospital-{index + 1}"
    style = site_style(index, seed)
    grid = (np.arange(size, dtype=np.float32) + 0.5) / size * 2 - 1
    yy, xx = np.meshgrid(grid, grid, indexing="ij")
    images, masks = [], []
    for i in range(n):
        rng = np.random.default_rng([seed, index, i])
        image, mask = _sample(style, rng, size, yy, xx)
        images.append(normalise(image))
        masks.append(mask)
    mm = style.spacing_mm * 256 / size
    return SiteData(
        name=name,
        images=np.stack(images)[:, None] if n else np.zeros((0, 1, size, size), np.float32),
        masks=np.stack(masks) if n else np.zeros((0, size, size), np.int64),
        spacing=np.full((n, 2), mm, np.float64),
        groups=np.array([f"{name}-{i}" for i in range(n)], dtype=str),
        names=[f"{name}-{i}.synthetic" for i in range(n)],
        class_names=list(CLASS_NAMES),
    )
