"""Volumes as volumes: slices with their neighbours as channels (2.5D), a test split made of
whole volumes, predictions put back on each volume's own grid, and predicted volumes written
as NIfTI with their source's affine and header.

A NIfTI loader (``fedseg/data/nifti.py``) keeps, for every volume, what per-volume scoring
needs and the 2D samples do not hold: its grid (shape, voxel spacing in mm), its class map at
native resolution, and the slices without foreground, which are not training samples but
belong to the volume when it is segmented whole.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import nibabel as nib
import numpy as np
from PIL import Image

from fedseg.data.dataset import DataError, SiteData, normalise, resize_image


@dataclass(eq=False)
class Volume:
    """One volume's grid and truth, and its slices that are not samples."""

    path: str  # the image file: predictions are written with its affine and header
    shape: tuple[int, int, int]  # voxels, in the file's axis order
    spacing: tuple[float, float, float]  # mm per voxel, file order (NaN: unknown)
    axis: int  # the slicing axis
    label: np.ndarray  # class map at native resolution, file order (smallest integer type)
    rest_images: np.ndarray  # (M, C, S, S) slices that are not samples (no foreground)
    rest_index: np.ndarray  # (M,) their positions along ``axis``
    rest_spacing: np.ndarray  # (2,) mm per pixel of a resized slice, as the samples'

    @property
    def plane_shape(self) -> tuple[int, int]:
        """(rows, cols) of a slice at native resolution."""
        rows, cols = (n for i, n in enumerate(self.shape) if i != self.axis)
        return rows, cols

    @property
    def depth(self) -> int:
        return self.shape[self.axis]


def slice_stack(volume: np.ndarray, axis: int, size: int, context: int = 1) -> np.ndarray:
    """(Z, context, size, size): every slice along ``axis``, resized and normalised on its own
    (as a 2D loader does), with its ``context // 2`` neighbours on each side as channels."""
    planes = np.moveaxis(volume, axis, 0)
    stack = np.stack([normalise(resize_image(p, size)) for p in planes])
    return with_context(stack, context)


def with_context(planes: np.ndarray, context: int) -> np.ndarray:
    """(Z, S, S) -> (Z, context, S, S): channel j of slice z is slice z + j - context // 2;
    beyond the volume's ends the end slice repeats (the volume has nothing there)."""
    if context < 1 or context % 2 == 0:
        raise ValueError(f"context must be an odd count of slices, got {context}")
    half = context // 2
    index = np.arange(len(planes))[:, None] + np.arange(-half, half + 1)[None, :]
    return planes[np.clip(index, 0, len(planes) - 1)]


def whole_volumes(data: SiteData) -> SiteData:
    """``data`` with every slice of each of its volumes, ordered by volume and position: the
    slices that were not samples (no foreground) come back with an all-background mask.
    Data that is not volumes comes back unchanged."""
    if not data.volumes or data.slice_index is None:
        return data
    images, masks, spacing, groups, names, index = [], [], [], [], [], []
    for group in dict.fromkeys(data.groups.tolist()):
        volume = data.volumes[group]
        mine = np.flatnonzero(data.groups == group)
        m = len(volume.rest_index)
        images += [data.images[mine], volume.rest_images]
        masks += [data.masks[mine], np.zeros((m, *data.masks.shape[1:]), data.masks.dtype)]
        spacing += [data.spacing[mine], np.repeat(volume.rest_spacing[None], m, axis=0)]
        groups += [data.groups[mine], np.full(m, group)]
        file = Path(volume.path).name
        names += [data.names[i] for i in mine] + [f"{file}#{z}" for z in volume.rest_index]
        index += [data.slice_index[mine], volume.rest_index]
    positions = np.concatenate(index)
    volume_rank = {g: i for i, g in enumerate(dict.fromkeys(data.groups.tolist()))}
    all_groups = np.concatenate(groups)
    ranks = np.array([volume_rank[g] for g in all_groups.tolist()], dtype=np.int64)
    order = np.lexsort((positions, ranks))
    emptied = {
        g: dataclasses.replace(
            v,
            rest_images=v.rest_images[:0],
            rest_index=v.rest_index[:0],
        )
        for g, v in data.volumes.items()
    }
    return SiteData(
        name=data.name,
        images=np.concatenate(images)[order],
        masks=np.concatenate(masks)[order],
        spacing=np.concatenate(spacing)[order],
        groups=all_groups[order],
        names=[names[i] for i in order],
        class_names=list(data.class_names),
        slice_index=positions[order],
        volumes=emptied,
        context=data.context,
    )


def is_whole(data: SiteData) -> bool:
    """Whether ``data`` is volume data holding every slice of each of its volumes (a test
    split that :func:`whole_volumes` made), so that it can be scored per volume."""
    if not data.volumes or data.slice_index is None or not len(data):
        return False
    for group in dict.fromkeys(data.groups.tolist()):
        positions = data.slice_index[data.groups == group]
        if sorted(positions.tolist()) != list(range(data.volumes[group].depth)):
            return False
    return True


def to_plane(pred: np.ndarray, shape: tuple[int, int], num_classes: int) -> np.ndarray:
    """A (S, S) class map resampled to (rows, cols): each class's indicator is resized
    (bilinear, area-aware when shrinking) and the largest wins, so classes keep their extent
    instead of nearest neighbour's jagged picks."""
    if tuple(pred.shape) == tuple(shape):
        return pred.astype(np.int64, copy=False)
    planes = [
        np.asarray(
            Image.fromarray((pred == c).astype(np.float32)).resize(
                (shape[1], shape[0]), Image.Resampling.BILINEAR
            )
        )
        for c in range(num_classes)
    ]
    return np.argmax(np.stack(planes), axis=0).astype(np.int64)


def predicted_volumes(data: SiteData, pred: np.ndarray) -> dict[str, np.ndarray]:
    """Each volume's predicted class map on its own grid (file order), from the predictions of
    ``data``'s slices: slices in order along the axis, each resampled to the native plane.
    Every slice of a volume must be there (:func:`whole_volumes`)."""
    if pred.shape != data.masks.shape:
        raise ValueError(f"prediction shape {pred.shape} != the slices' {data.masks.shape}")
    if data.slice_index is None:
        raise ValueError(f"{data.name}: not volume data (no slice positions)")
    out = {}
    for group in dict.fromkeys(data.groups.tolist()):
        volume = data.volumes[group]
        mine = np.flatnonzero(data.groups == group)
        positions = data.slice_index[mine]
        if sorted(positions.tolist()) != list(range(volume.depth)):
            raise ValueError(
                f"{data.name}: volume {group} has {len(set(positions.tolist()))} of its "
                f"{volume.depth} slices; score whole volumes (evaluation.per_volume)"
            )
        planes = [
            to_plane(pred[i], volume.plane_shape, data.num_classes)
            for i in mine[np.argsort(positions)]
        ]
        out[group] = np.moveaxis(np.stack(planes), 0, volume.axis)
    return out


def save_like(source: str | Path | nib.Nifti1Image, labels: np.ndarray, out: str | Path) -> Path:
    """A class map as NIfTI with ``source``'s affine and header (integer type, no scaling),
    so it overlays the scan in any viewer."""
    image = source if isinstance(source, nib.Nifti1Image) else nib.load(source)
    image = cast(nib.Nifti1Image, image)
    if tuple(labels.shape) != tuple(image.shape[:3]):
        raise DataError(f"{out}: labels {labels.shape} do not fit the source's {image.shape}")
    dtype = np.uint8 if labels.max(initial=0) < 256 else np.uint16
    header = image.header.copy()
    header.set_data_dtype(dtype)
    header.set_slope_inter(1.0, 0.0)  # class values as stored, never rescaled
    data = labels.astype(dtype).reshape(image.shape)  # (X, Y, Z, 1) sources keep theirs
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, image.affine, header), out)
    return out


def write_volumes(
    volumes: dict[str, np.ndarray], refs: dict[str, Volume], folder: str | Path
) -> list[Path]:
    """Each predicted volume as ``<folder>/<volume>.nii.gz`` beside nothing else: the site's
    own disk, like its models (predictions are patient data)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    return [
        save_like(refs[g].path, labels, folder / f"{g}.nii.gz") for g, labels in volumes.items()
    ]
