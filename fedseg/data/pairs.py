"""2D image/mask pairs in two folders (PNG, JPEG, TIFF), matched by file name stem."""

from __future__ import annotations

import csv
import os
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import tifffile
from PIL import Image
from rich.progress import track

from fedseg.config import DatasetConfig
from fedseg.data.dataset import (
    DataError,
    SiteData,
    normalise,
    resize_image,
    resize_mask,
    resized_spacing,
)
from fedseg.data.labels import LabelMap, mask_to_2d

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".tif", ".tiff"}
TIFF_SUFFIXES = {".tif", ".tiff"}
PROGRESS_ABOVE = 50  # files; below this a progress bar is just flicker


def list_files(folder: Path) -> dict[str, Path]:
    """Image files by stem; two files with one stem would make matching ambiguous."""
    if not folder.is_dir():
        raise DataError(f"{folder}: folder not found")
    files: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if path.name.startswith(".") or path.suffix.lower() not in IMAGE_SUFFIXES:
            continue
        if path.stem in files:
            raise DataError(f"{path}: same name stem as {files[path.stem]}")
        files[path.stem] = path
    return files


def mask_folder(folder: Path, mask_dir: str) -> Path:
    """cfg.mask_dir, else masks/ when present, else labels/ (the two common layouts)."""
    if mask_dir:
        return folder / mask_dir
    return folder / "masks" if (folder / "masks").is_dir() else folder / "labels"


def _gray(array: np.ndarray, source: Path) -> np.ndarray:
    """Luminance as float32; colour in medical images is almost always a viewer artefact."""
    if array.ndim == 3 and array.shape[0] == 1:
        array = array[0]
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim == 3 and array.shape[-1] in (3, 4):
        array = array[..., :3].astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
    if array.ndim != 2:
        raise DataError(f"{source}: image must be 2D grayscale or RGB(A), got shape {array.shape}")
    return array.astype(np.float32, copy=False)


def read_image(path: Path) -> np.ndarray:
    """A 2D float32 image; unreadable files and NaN/inf pixels are errors naming the file."""
    try:
        if path.suffix.lower() in TIFF_SUFFIXES:
            array = tifffile.imread(path)
        else:
            with Image.open(path) as im:
                if im.mode not in ("1", "L", "I", "F") and not im.mode.startswith("I;16"):
                    array = np.asarray(im.convert("RGB"))  # palette, LA, RGBA, CMYK, ...
                else:
                    array = np.asarray(im)
    except Exception as err:  # PIL/tifffile raise many types for a damaged file
        raise DataError(f"{path}: cannot read image ({type(err).__name__}: {err})") from err
    array = _gray(np.asarray(array), path)
    if not np.isfinite(array).all():
        raise DataError(f"{path}: image contains NaN or inf values")
    return array


def read_mask(path: Path) -> np.ndarray:
    """Stored label values, one channel (see :func:`mask_to_2d`)."""
    try:
        if path.suffix.lower() in TIFF_SUFFIXES:
            return mask_to_2d(tifffile.imread(path), str(path))
        with Image.open(path) as im:
            im.load()
            return mask_to_2d(im, str(path))
    except DataError:
        raise
    except Exception as err:
        raise DataError(f"{path}: cannot read mask ({type(err).__name__}: {err})") from err


def read_spacing_csv(path: Path, column: str) -> dict[str, float]:
    """mm per pixel by file name (and by stem, in case the CSV names another extension)."""
    try:
        with path.open(newline="") as f:
            rows = list(csv.reader(f))
    except OSError as err:
        raise DataError(f"{path}: cannot read spacing CSV ({err})") from err
    if not rows:
        raise DataError(f"{path}: spacing CSV is empty")
    header = [h.strip() for h in rows[0]]
    if column:
        if column not in header:
            raise DataError(f"{path}: no column {column!r} (columns: {header})")
        col = header.index(column)
    else:
        matches = [i for i, h in enumerate(header) if "pixel size" in h.lower()]
        if not matches:
            raise DataError(f"{path}: no column naming 'pixel size' (columns: {header})")
        col = matches[0]
    table: dict[str, float] = {}
    for line, row in enumerate(rows[1:], start=2):
        if not row or not row[0].strip():
            continue
        try:
            value = float(row[col])
        except (IndexError, ValueError) as err:
            raise DataError(f"{path}:{line}: bad spacing value in column {header[col]!r}") from err
        if not (np.isfinite(value) and value > 0):
            raise DataError(f"{path}:{line}: spacing must be positive, got {value}")
        key = row[0].strip()
        table[key] = value
        table.setdefault(Path(key).stem, value)
    return table


def group_of(stem: str, pattern: str) -> str:
    """Patient id from the file stem, so a patient's images stay on one side of every split."""
    if not pattern:
        return stem
    match = re.search(pattern, stem)
    if match is None:
        return stem
    return match.group(1) if match.groups() else match.group(0)


def load_pairs(folder: Path, cfg: DatasetConfig, size: int, name: str) -> SiteData:
    """Load, map labels, resize and normalise every image/mask pair of one folder."""
    folder = Path(folder)
    images = list_files(folder / cfg.image_dir)
    masks = list_files(mask_folder(folder, cfg.mask_dir))
    if not images:
        raise DataError(f"{folder / cfg.image_dir}: no image files (PNG, JPEG or TIFF)")
    for stem, path in images.items():
        if stem not in masks:
            raise DataError(
                f"{path}: no mask with the same name in {mask_folder(folder, cfg.mask_dir)}"
            )
    for stem, path in masks.items():
        if stem not in images:
            raise DataError(f"{path}: no image with the same name in {folder / cfg.image_dir}")
    stems = sorted(images)
    if cfg.max_items > 0:
        stems = stems[: cfg.max_items]

    table = read_spacing_csv(Path(cfg.spacing_csv), cfg.spacing_column) if cfg.spacing_csv else None
    labels = LabelMap(cfg.label_values, cfg.class_names)

    def load_one(stem: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
        image_path, mask_path = images[stem], masks[stem]
        image = read_image(image_path)
        mask = labels.apply(read_mask(mask_path), str(mask_path))
        if image.shape != mask.shape:
            raise DataError(
                f"{image_path} is {image.shape[0]}x{image.shape[1]} but {mask_path} is "
                f"{mask.shape[0]}x{mask.shape[1]}"
            )
        if table is not None:
            mm = table.get(image_path.name, table.get(stem))
            if mm is None:
                raise DataError(f"{image_path}: not listed in spacing CSV {cfg.spacing_csv}")
        else:
            mm = cfg.spacing_mm if cfg.spacing_mm > 0 else float("nan")
        return (
            normalise(resize_image(image, size)),
            resize_mask(mask, size),
            resized_spacing((mm, mm), image.shape, size),
            int(mask.max()),
        )

    # Decoding releases the GIL, so a few threads roughly divide the loading time.
    workers = min(4, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        results = list(
            track(
                pool.map(load_one, stems),
                total=len(stems),
                description=f"loading {name}",
                transient=True,
                disable=len(stems) <= PROGRESS_ABOVE,
            )
        )
    xs, ys, spacings, max_classes = zip(*results, strict=True)
    return SiteData(
        name=name,
        images=np.stack(xs)[:, None],
        masks=np.stack(ys),
        spacing=np.stack(spacings),
        groups=np.array([group_of(stem, cfg.group_regex) for stem in stems], dtype=str),
        names=[images[stem].name for stem in stems],
        class_names=labels.class_names_for(max(max_classes)),
    )
