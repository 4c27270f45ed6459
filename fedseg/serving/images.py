"""Reading a clinician's input and writing the mask back with the input's geometry.

2D files (PNG, JPEG, TIFF) come back as a mask of the same width and height; a NIfTI volume is
segmented slice by slice along the scenario's axis and written with the input's affine and
header, so it overlays the scan in any viewer.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import cast

import nibabel as nib
import numpy as np
from PIL import Image

from fedseg.config import DatasetConfig
from fedseg.data.dataset import DataError, normalise, resize_image, resize_planes
from fedseg.data.nifti import read_volume
from fedseg.data.pairs import IMAGE_SUFFIXES, read_image
from fedseg.data.volumes import save_like, slice_stack, to_plane

NIFTI_SUFFIXES = (".nii", ".nii.gz")


def is_nifti(path: Path) -> bool:
    return path.name.lower().endswith(NIFTI_SUFFIXES)


@dataclass
class Scan:
    """Model-ready slices (N, C, S, S) (C = 1 grey, 3 colour) and what is needed to put a
    mask back in place."""

    path: Path
    images: np.ndarray
    plane_shape: tuple[int, int]  # in-plane size of the input (rows, cols)
    axis: int | None = None  # NIfTI slicing axis; None for a 2D file
    nifti: nib.Nifti1Image | None = None


def read_scan(path: str | Path, size: int, axis: int, channels: int = 1, context: int = 1) -> Scan:
    """The clinician's file as the site's encoder takes it: ``channels`` 3 keeps a colour
    image's colour (a grey file is repeated), 1 reads it as grey, as the loaders do; a
    volume's slices carry ``context`` neighbouring slices as channels (2.5D)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: input file not found")
    if is_nifti(path):
        volume, _ = read_volume(path, label=False)
        images = slice_stack(volume, axis, size, context)  # as the loader made the samples
        images = np.repeat(images, channels, axis=1) if channels > 1 else images
        nifti = cast(nib.Nifti1Image, nib.load(path))  # read above as one (or Nifti2Image)
        plane = tuple(n for i, n in enumerate(volume.shape) if i != axis)
        return Scan(path, images, cast(tuple[int, int], plane), axis, nifti)
    if path.suffix.lower() not in IMAGE_SUFFIXES:
        raise DataError(f"{path}: unsupported input; use PNG, JPEG, TIFF or NIfTI (.nii, .nii.gz)")
    image = read_image(path, channels)
    resized = resize_image(image, size) if channels == 1 else resize_planes(image, size)
    model_ready = normalise(resized).reshape(1, channels, size, size)
    return Scan(path, model_ready, (int(image.shape[-2]), int(image.shape[-1])))


def resize_nearest(mask: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize to (rows, cols) with pixel-centre sampling (no invented classes)."""
    h, w = mask.shape
    rows = np.minimum(((np.arange(shape[0]) + 0.5) * h / shape[0]).astype(np.int64), h - 1)
    cols = np.minimum(((np.arange(shape[1]) + 0.5) * w / shape[1]).astype(np.int64), w - 1)
    return mask.take(rows, axis=0).take(cols, axis=1)


def stored_values(pred: np.ndarray, label_values: list) -> np.ndarray:
    """Class indices -> the values the site's masks store (``data.label_values``); class
    colours (``data.label_colors``) give an (N, H, W, 3) array."""
    if not label_values:
        return pred
    return np.asarray(label_values, dtype=np.int64)[pred]


def mask_values_of(data: DatasetConfig) -> list:
    """What ``write_mask`` writes for each class, as the site's masks store it: its
    label_values, its label_colors, 0/255 for thresholded binary masks, else the class."""
    if data.label_colors:
        return [list(c) for c in data.label_colors]
    if data.mask_threshold >= 0:
        return [0, 255]
    return list(data.label_values)


def write_mask(scan: Scan, pred: np.ndarray, out: str | Path, label_values: list) -> Path:
    """``pred``: (N, S, S) class indices, one per slice of ``scan``. A volume's slices are
    resampled as evaluation puts them back on the volume's grid (``data/volumes.py``)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if scan.nifti is not None:
        classes = int(pred.max(initial=0)) + 1
        native = [to_plane(p, scan.plane_shape, classes) for p in pred]
    else:
        native = [resize_nearest(p, scan.plane_shape) for p in pred]
    planes = stored_values(np.stack(native), label_values)
    dtype = np.uint8 if planes.max(initial=0) < 256 else np.uint16
    if scan.nifti is not None:
        if not is_nifti(out):
            raise DataError(f"{out}: a NIfTI input needs a .nii or .nii.gz output")
        assert scan.axis is not None  # read_scan sets it with nifti
        return save_like(scan.nifti, np.moveaxis(planes, 0, scan.axis), out)
    if out.suffix.lower() not in (".png", ".tif", ".tiff"):
        raise DataError(f"{out}: write a 2D mask as .png or .tif (lossless)")
    Image.fromarray(planes[0].astype(dtype)).save(out)  # (H, W) values or (H, W, 3) colours
    return out
