"""The in-memory form every data source is turned into, so the rest of fedseg sees one shape."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from fedseg.data.volumes import Volume


class DataError(ValueError):
    """Bad input data; the message names the file or field."""


@dataclass
class SiteData:
    """All samples of one hospital (or one split of it), already resized and normalised."""

    name: str
    images: np.ndarray  # (N,C,H,W) float32, C = 1 (grey) or 3 (colour), zero mean / unit std
    #   per image (over all its channels, so colour ratios survive)
    masks: np.ndarray  # (N,H,W) int64 class indices
    spacing: np.ndarray  # (N,2) float64 mm per pixel (row, col) after resizing; NaN = unknown
    groups: np.ndarray  # (N,) str patient / volume id: samples of one patient never get split
    names: list[str]  # per-sample identifier, for reports and overlays
    class_names: list[str]
    # Volume data (fedseg/data/volumes.py): each slice's position along the slicing axis, and
    # each volume's own grid, truth and the slices that are not samples. Empty otherwise.
    slice_index: np.ndarray | None = None  # (N,) int64
    volumes: dict[str, Volume] = field(default_factory=dict)  # group -> its volume
    context: int = 1  # 2.5D: each sample holds this many neighbouring slices as channels

    def __post_init__(self) -> None:
        # Catch loader bugs here rather than as a shape error deep inside training.
        n = len(self.images)
        allowed = (1, 3) if self.context == 1 else (self.context,)
        if self.images.ndim != 4 or self.images.shape[1] not in allowed:
            raise DataError(
                f"{self.name}: images must be (N,C,H,W) with C in {allowed}, "
                f"got {self.images.shape}"
            )
        if self.masks.shape != (n, *self.images.shape[2:]):
            raise DataError(
                f"{self.name}: masks {self.masks.shape} do not match images {self.images.shape}"
            )
        if self.spacing.shape != (n, 2) or len(self.groups) != n or len(self.names) != n:
            raise DataError(f"{self.name}: spacing/groups/names must have {n} entries")
        if self.slice_index is not None and self.slice_index.shape != (n,):
            raise DataError(f"{self.name}: slice_index must have {n} entries")

    def __repr__(self) -> str:
        # The default dataclass repr would print whole image arrays into logs and test output.
        size = "x".join(map(str, self.images.shape[2:]))
        return (
            f"SiteData(name={self.name!r}, n={len(self)}, size={size}, "
            f"groups={len(set(self.groups.tolist()))}, classes={self.class_names}, {self.units})"
        )

    @property
    def channels(self) -> int:
        return int(self.images.shape[1])

    def shown(self, idx: np.ndarray) -> np.ndarray:
        """Images ``idx`` as a person sees them: the centre slice of a 2.5D stack."""
        if self.context == 1:
            return self.images[idx]
        return self.images[idx][:, self.context // 2 : self.context // 2 + 1]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def spacing_known(self) -> bool:
        """True when distances can be reported in mm for every sample."""
        return len(self) > 0 and bool(np.isfinite(self.spacing).all())

    @property
    def units(self) -> str:
        return "mm" if self.spacing_known else "px"

    def __len__(self) -> int:
        return len(self.images)

    def subset(self, idx: np.ndarray | list[int], name: str | None = None) -> SiteData:
        """Select samples (copies, so a split never aliases its parent's arrays)."""
        idx = np.asarray(idx, dtype=np.int64).reshape(-1)
        groups = self.groups[idx]
        kept = set(groups.tolist())
        return SiteData(
            name=self.name if name is None else name,
            images=self.images[idx],
            masks=self.masks[idx],
            spacing=self.spacing[idx],
            groups=groups,
            names=[self.names[i] for i in idx],
            class_names=list(self.class_names),
            slice_index=None if self.slice_index is None else self.slice_index[idx],
            volumes={g: v for g, v in self.volumes.items() if g in kept},
            context=self.context,
        )

    @staticmethod
    def concat(parts: list[SiteData], name: str) -> SiteData:
        """Pool sites (e.g. for the centralized baseline); labels must mean the same everywhere."""
        if not parts:
            raise DataError(f"{name}: nothing to concatenate")
        class_names = parts[0].class_names
        for part in parts[1:]:
            if part.class_names != class_names:
                raise DataError(
                    f"{name}: class_names of {part.name} {part.class_names} differ from "
                    f"{parts[0].name} {class_names}"
                )
        shapes = {p.images.shape[1:] for p in parts}
        if len(shapes) > 1:
            raise DataError(f"{name}: image sizes differ between parts: {sorted(shapes)}")
        indices = [p.slice_index for p in parts]
        return SiteData(
            name=name,
            images=np.concatenate([p.images for p in parts]),
            masks=np.concatenate([p.masks for p in parts]),
            spacing=np.concatenate([p.spacing for p in parts]),
            groups=np.concatenate([p.groups for p in parts]),
            names=[n for p in parts for n in p.names],
            class_names=list(class_names),
            slice_index=None if any(i is None for i in indices) else np.concatenate(indices),  # type: ignore[arg-type]
            volumes={g: v for p in parts for g, v in p.volumes.items()},
            context=parts[0].context,
        )


def normalise(image: np.ndarray) -> np.ndarray:
    """Zero mean, unit std per image: removes scanner gain/offset, which differ per hospital.
    A colour image is normalised over all its channels at once, which keeps its colours."""
    image = image.astype(np.float32, copy=False)
    std = float(image.std())
    if not np.isfinite(std) or std < 1e-8:
        return np.zeros_like(image, dtype=np.float32)
    return ((image - image.mean()) / std).astype(np.float32)


def empty_site(name: str, size: int, class_names: list[str], channels: int = 1) -> SiteData:
    """A site with no samples, so callers need no special case for 'nothing left'."""
    return SiteData(
        name=name,
        images=np.zeros((0, channels, size, size), np.float32),
        masks=np.zeros((0, size, size), np.int64),
        spacing=np.zeros((0, 2), np.float64),
        groups=np.zeros(0, dtype=str),
        names=[],
        class_names=list(class_names),
    )


def resize_image(image: np.ndarray, size: int) -> np.ndarray:
    """Bilinear (area-aware when shrinking) resize of a 2D float image to size x size."""
    from PIL import Image

    if image.shape == (size, size):
        return image.astype(np.float32, copy=False)
    resized = Image.fromarray(np.ascontiguousarray(image, dtype=np.float32)).resize(
        (size, size), Image.Resampling.BILINEAR
    )
    return np.asarray(resized, dtype=np.float32)


def resize_planes(image: np.ndarray, size: int) -> np.ndarray:
    """(C, H, W) -> (C, size, size), each channel as :func:`resize_image`."""
    return np.stack([resize_image(plane, size) for plane in image])


def resize_mask(mask: np.ndarray, size: int) -> np.ndarray:
    """Nearest-neighbour resize, so no class index is invented at a boundary."""
    if mask.shape == (size, size):
        return mask.astype(np.int64, copy=False)
    h, w = mask.shape
    # Pixel-centre sampling, the same convention as the bilinear image resize.
    rows = np.minimum(((np.arange(size) + 0.5) * h / size).astype(np.int64), h - 1)
    cols = np.minimum(((np.arange(size) + 0.5) * w / size).astype(np.int64), w - 1)
    return mask.take(rows, axis=0).take(cols, axis=1).astype(np.int64, copy=False)


def resized_spacing(spacing: tuple[float, float], shape: tuple[int, int], size: int) -> np.ndarray:
    """mm per pixel after resizing: each axis keeps its physical extent."""
    return np.array([spacing[0] * shape[0] / size, spacing[1] * shape[1] / size], np.float64)
