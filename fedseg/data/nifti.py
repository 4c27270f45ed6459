"""3D NIfTI volumes cut into 2D slices; every slice keeps its volume as its group."""

from __future__ import annotations

import dataclasses
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import cast

import nibabel as nib
import numpy as np
from rich.progress import track

from fedseg.config import AUTO_CONTEXT, DatasetConfig
from fedseg.data.dataset import (
    DataError,
    SiteData,
    empty_site,
    resize_mask,
    resized_spacing,
)
from fedseg.data.labels import LabelMap
from fedseg.data.pairs import MAX_PIXELS, PROGRESS_ABOVE, mask_folder, mask_values, resolve_classes
from fedseg.data.volumes import Volume, slice_stack


def volume_stem(path: Path) -> str:
    """File name without .nii / .nii.gz: the patient (group) id."""
    name = path.name
    for suffix in (".nii.gz", ".nii"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def list_volumes(folder: Path) -> list[Path]:
    if not folder.is_dir():
        raise DataError(f"{folder}: folder not found")
    return sorted(
        p for p in folder.iterdir() if p.name.endswith((".nii", ".nii.gz")) and p.name[0] != "."
    )


def volume_shape(path: Path) -> tuple[int, ...]:
    """The volume's shape from its header, without reading its voxels."""
    try:
        return tuple(int(n) for n in cast(nib.Nifti1Image, nib.load(path)).shape)
    except Exception as err:  # nibabel raises several types for damaged files
        raise DataError(f"{path}: cannot read NIfTI volume ({type(err).__name__}: {err})") from err


def check_voxels(path: Path, shape: tuple[int, ...], max_pixels: int) -> None:
    """Refuse a volume before reading it when it holds more than ``max_pixels`` voxels."""
    voxels = int(np.prod(shape))
    if voxels > max_pixels:
        raise DataError(
            f"{path}: {'x'.join(map(str, shape))} = {voxels:,} voxels is more than "
            f"data.max_pixels = {max_pixels:,}; raise data.max_pixels if the machine has the memory"
        )


def read_volume(
    path: Path, label: bool, max_pixels: int = MAX_PIXELS
) -> tuple[np.ndarray, tuple[float, ...]]:
    """3D array and voxel size (mm); trailing singleton dims (X,Y,Z,1) are dropped."""
    check_voxels(path, volume_shape(path), max_pixels)
    try:
        # .nii/.nii.gz load as Nifti1Image or its subclass Nifti2Image
        img = cast(nib.Nifti1Image, nib.load(path))
        data = np.asarray(img.dataobj) if label else img.get_fdata(dtype=np.float32)
        # A zero voxel size means the header does not know it: report pixels, not 0 mm.
        zooms = tuple(float(z) if z > 0 else float("nan") for z in img.header.get_zooms())
    except Exception as err:  # nibabel raises several types for damaged files
        raise DataError(f"{path}: cannot read NIfTI volume ({type(err).__name__}: {err})") from err
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise DataError(f"{path}: expected a 3D volume, got shape {data.shape}")
    if not label and not np.isfinite(data).all():
        raise DataError(f"{path}: volume contains NaN or inf values")
    return data, zooms[:3]


def match_volumes(folder: Path, cfg: DatasetConfig) -> tuple[list[Path], list[str]]:
    """Image volumes with a label volume of the same name (``max_items`` of them), and one
    problem per volume without its partner."""
    image_dir, label_dir = folder / cfg.image_dir, mask_folder(folder, cfg.mask_dir)
    volumes = list_volumes(image_dir)
    if not volumes:
        raise DataError(f"{image_dir}: no .nii or .nii.gz volumes")
    labels_present = {p.name for p in list_volumes(label_dir)}
    problems = [
        f"{path}: no label volume with the same name in {label_dir}"
        for path in volumes
        if path.name not in labels_present
    ]
    problems += [
        f"{label_dir / name}: no image volume with the same name"
        for name in sorted(labels_present - {p.name for p in volumes})
    ]
    volumes = [p for p in volumes if p.name in labels_present]
    return (volumes[: cfg.max_items] if cfg.max_items > 0 else volumes), problems


def load_nifti(folder: Path, cfg: DatasetConfig, size: int, name: str) -> SiteData:
    """Slices along ``cfg.axis``; empty slices are dropped unless asked for (they dominate),
    but kept with their volume (``SiteData.volumes``), which a test split scores whole.
    ``cfg.context_slices`` > 1: each slice's neighbours are its extra channels (2.5D)."""
    folder = Path(folder)
    if cfg.axis not in (0, 1, 2):
        raise DataError(f"axis must be 0, 1 or 2, got {cfg.axis}")
    label_dir = mask_folder(folder, cfg.mask_dir)
    volumes, problems = match_volumes(folder, cfg)
    if problems:
        raise DataError(problems[0] + (f" (and {len(problems) - 1} more)" if problems[1:] else ""))
    label_map = LabelMap.from_config(cfg)

    context = cfg.context_slices or AUTO_CONTEXT  # 0: not resolved by a run: volumes, so 3
    Slice = tuple[np.ndarray, np.ndarray, np.ndarray, str, str, int]
    #           image, mask, spacing, group, name, position

    def load_volume(path: Path) -> tuple[list[Slice], set[int], Volume]:
        label_path = label_dir / path.name
        image, zooms = read_volume(path, label=False, max_pixels=cfg.max_pixels)
        raw, _ = read_volume(label_path, label=True, max_pixels=cfg.max_pixels)
        if image.shape != raw.shape:
            raise DataError(f"{path} has shape {image.shape} but {label_path} has {raw.shape}")
        label = label_map.apply(raw, str(label_path), volume=True)
        # the two of three voxel sizes not along the axis
        in_plane = cast(tuple[float, float], tuple(z for i, z in enumerate(zooms) if i != cfg.axis))
        stack = slice_stack(image, cfg.axis, size, context)  # every slice, neighbours as channels
        planes = np.moveaxis(label, cfg.axis, 0)
        spacing = resized_spacing(in_plane, planes.shape[1:], size)
        group = volume_stem(path)
        kept = [z for z in range(len(planes)) if cfg.keep_empty_slices or planes[z].any()]
        slices = [
            (stack[z], resize_mask(planes[z], size), spacing, group, f"{path.name}#{z}", z)
            for z in kept
        ]
        rest = np.setdiff1d(np.arange(len(planes)), kept)
        volume = Volume(
            path=str(path),
            shape=cast(tuple[int, int, int], tuple(int(n) for n in image.shape)),
            spacing=cast(tuple[float, float, float], tuple(zooms)),
            axis=cfg.axis,
            label=label.astype(np.min_scalar_type(max(int(label.max(initial=0)), 1))),
            rest_images=stack[rest],
            rest_index=rest.astype(np.int64),
            rest_spacing=spacing,
        )
        return slices, mask_values(label) if label_map.open else set(), volume

    workers = min(4, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        results = list(
            track(
                pool.map(load_volume, volumes),
                total=len(volumes),
                description=f"loading {name}",
                transient=True,
                disable=len(volumes) <= PROGRESS_ABOVE,
            )
        )
    classes = resolve_classes(label_map, set().union(*(v for _, v, _ in results)), str(label_dir))
    slices = [one for volume_slices, _, _ in results for one in volume_slices]
    kept = {
        volume_stem(Path(volume.path)): dataclasses.replace(
            volume, label=classes.apply(volume.label.astype(np.int64)).astype(volume.label.dtype)
        )
        for _, _, volume in results
    }
    if not slices:
        return empty_site(name, size, classes.class_names, channels=context)
    images, masks, spacing, groups, names, positions = zip(*slices, strict=True)
    return SiteData(
        name=name,
        images=np.stack(images),
        masks=classes.apply(np.stack(masks)),
        spacing=np.stack(spacing),
        groups=np.array(groups, dtype=str),
        names=list(names),
        class_names=classes.class_names,
        slice_index=np.array(positions, dtype=np.int64),
        volumes=kept,
        context=context,
    )
