"""2D image/mask pairs in two folders (PNG, JPEG, TIFF), matched by file name stem."""

from __future__ import annotations

import csv
import logging
import os
import re
import warnings
from collections.abc import Callable
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
    resize_planes,
    resized_spacing,
)
from fedseg.data.labels import LabelMap, OpenClasses, raw_mask

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".tif", ".tiff"}
TIFF_SUFFIXES = {".tif", ".tiff"}
PROGRESS_ABOVE = 50  # files; below this a progress bar is just flicker
log = logging.getLogger(__name__)


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


# Largest image (pixels) or volume (voxels) decoded when no config says (data.max_pixels).
MAX_PIXELS = 100_000_000
COLOUR_MODES = {"RGB", "RGBA", "RGBX", "P", "PA", "CMYK", "YCbCr", "LAB", "HSV"}
COLOUR_SPREAD, COLOUR_PIXELS = 0.1, 0.01  # see is_colour
COLOUR_SAMPLE = 8  # colour-mode files decoded to tell real colour from grey stored as RGB


def _planes(array: np.ndarray, source: Path) -> np.ndarray:
    """(H, W) grey or (H, W, 3) colour, singleton and alpha channels dropped."""
    if array.ndim == 3 and array.shape[0] == 1:
        array = array[0]
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim == 3 and array.shape[-1] in (3, 4):
        array = array[..., :3]
    if array.ndim == 2 or (array.ndim == 3 and array.shape[-1] == 3):
        return array
    raise DataError(f"{source}: image must be 2D grayscale or RGB(A), got shape {array.shape}")


def is_colour(array: np.ndarray) -> bool:
    """Whether an (H, W, 3) image really has colour: over 1% of its pixels with a channel
    spread above 10% of the value range. Grey stored as RGB, or tinted grey (us-nerve's
    ultrasound: at most 0.08% of pixels), is not; a fundus photograph (84%) is."""
    if array.ndim != 3:
        return False
    spread = array.max(-1).astype(np.float64) - array.min(-1)
    full = np.iinfo(array.dtype).max if array.dtype.kind in "iu" else float(np.ptp(array)) or 1.0
    return bool((spread > COLOUR_SPREAD * full).mean() > COLOUR_PIXELS)


def _with_channels(array: np.ndarray, channels: int) -> np.ndarray:
    """float32 (H, W) for one channel (luminance of colour), (3, H, W) for three (grey
    repeated, so a grey file in a colour set still loads)."""
    if channels == 1:
        if array.ndim == 3:
            array = array.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
        return array.astype(np.float32, copy=False)
    if array.ndim == 2:
        return np.repeat(array.astype(np.float32)[None], 3, axis=0)
    return np.moveaxis(array.astype(np.float32), -1, 0)


def image_header(path: Path) -> tuple[int, int, bool]:
    """(rows, cols, colour mode) from the file's header, without decoding its pixels."""
    try:
        if path.suffix.lower() in TIFF_SUFFIXES:
            with tifffile.TiffFile(path) as tif:
                shape = tuple(int(n) for n in tif.series[0].shape)
            colour = len(shape) == 3 and shape[-1] in (3, 4)
            rows, cols = shape[-3:-1] if colour else shape[-2:]
            return rows, cols, colour
        with warnings.catch_warnings():  # PIL's bomb warning: check_pixels says it better
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                return im.size[1], im.size[0], im.mode in COLOUR_MODES
    except Image.DecompressionBombError as err:
        raise DataError(f"{path}: image too large to open ({err})") from err
    except Exception as err:  # PIL/tifffile raise many types for a damaged file
        raise DataError(f"{path}: cannot read image ({type(err).__name__}: {err})") from err


def check_pixels(path: Path, rows: int, cols: int, max_pixels: int) -> None:
    """Refuse a file before decoding it: a 140 KB PNG can hold 12000x12000 pixels (3 GB)."""
    if rows * cols > max_pixels:
        raise DataError(
            f"{path}: {cols}x{rows} = {rows * cols:,} pixels is more than data.max_pixels = "
            f"{max_pixels:,}; downscale it, or raise data.max_pixels if the machine has the memory"
        )


def _decode(path: Path, max_pixels: int, kind: str) -> np.ndarray:
    """The stored array of an image file, after a header check of its size."""
    check_pixels(path, *image_header(path)[:2], max_pixels)
    try:
        if path.suffix.lower() in TIFF_SUFFIXES:
            return np.asarray(tifffile.imread(path))
        with Image.open(path) as im:
            if kind == "mask":
                im.load()
                return raw_mask(im)
            if kind == "rgb-mask" or (
                im.mode not in ("1", "L", "I", "F") and not im.mode.startswith("I;16")
            ):
                return np.asarray(im.convert("RGB"))  # palette, LA, RGBA, CMYK, ...
            return np.asarray(im)
    except DataError:
        raise
    except Exception as err:  # PIL/tifffile raise many types for a damaged file
        raise DataError(
            f"{path}: cannot read {kind.split('-')[-1]} ({type(err).__name__}: {err})"
        ) from err


def read_image(path: Path, channels: int = 1, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """A float32 image, (H, W) for ``channels`` = 1 or (3, H, W) for 3; unreadable files,
    oversized files and NaN/inf pixels are errors naming the file."""
    array = _with_channels(_planes(_decode(path, max_pixels, "image"), path), channels)
    if not np.isfinite(array).all():
        raise DataError(f"{path}: image contains NaN or inf values")
    return array


def read_mask(path: Path, rgb: bool = False, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Stored mask values: 2D, or (H, W, 3) as stored (the label map collapses them; see
    :class:`LabelMap`). ``rgb``: a palette mask's colours instead of its indices."""
    return _decode(path, max_pixels, "rgb-mask" if rgb else "mask")


def folder_channels(folder: Path) -> int:
    """3 when a folder's images are colour, else 1 (``data.channels = 0``): colour-mode files
    are decoded (a few) to tell real colour from grey stored as RGB. Unreadable files are
    skipped here; the loader and the data check name them."""

    def colour(path: Path, decode: bool) -> bool:
        try:
            if not decode:
                return image_header(path)[2]
            return is_colour(_planes(_decode(path, MAX_PIXELS, "image"), path))
        except DataError:
            return False

    files = list(list_files(folder).values())
    candidates = [path for path in files if colour(path, decode=False)][:COLOUR_SAMPLE]
    return 3 if any(colour(path, decode=True) for path in candidates) else 1


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


Pair = tuple[str, Path, Path]  # stem, image file, mask file


def match_pairs(folder: Path, cfg: DatasetConfig) -> tuple[list[Pair], list[str]]:
    """Image/mask pairs by file stem (``max_items`` of them) and one problem per file that
    has no partner, so a check can report them all at once."""
    folder = Path(folder)
    image_dir, masks_dir = folder / cfg.image_dir, mask_folder(folder, cfg.mask_dir)
    images, masks = list_files(image_dir), list_files(masks_dir)
    if not images:
        raise DataError(f"{image_dir}: no image files (PNG, JPEG or TIFF)")
    problems = [
        f"{path}: no mask with the same name in {masks_dir}"
        for stem, path in images.items()
        if stem not in masks
    ]
    problems += [
        f"{path}: no image with the same name in {image_dir}"
        for stem, path in masks.items()
        if stem not in images
    ]
    stems = sorted(stem for stem in images if stem in masks)
    if cfg.max_items > 0:
        stems = stems[: cfg.max_items]
    return [(stem, images[stem], masks[stem]) for stem in stems], problems


def mask_values(mask: np.ndarray) -> set[int]:
    """The distinct stored values of a class-index mask (an open label map's evidence)."""
    flat = mask.ravel()
    if flat.size and 0 <= int(flat.min()) and int(flat.max()) < 1 << 16:
        return set(np.flatnonzero(np.bincount(flat)).tolist())
    return set(np.unique(flat).tolist())


def resolve_classes(labels: LabelMap, values: set[int], source: str) -> OpenClasses:
    """The set's classes; a notice (0/255 read as two classes) is logged once per load."""
    classes = labels.resolve(values, source)
    if classes.notice:
        log.info("%s", classes.notice)
    return classes


def load_pairs(
    folder: Path,
    cfg: DatasetConfig,
    size: int,
    name: str,
    channels: int = 0,
    select: Callable[[np.ndarray], np.ndarray] | None = None,
) -> SiteData:
    """Load, map labels, resize and normalise every image/mask pair of one folder.
    ``channels``: 1 grey or 3 colour (0 = ``cfg.channels``, else what the images are).
    ``select``: from every pair's group, the sorted indices of the pairs to keep; the others
    are not decoded unless the classes are open (inferred from every mask)."""
    folder = Path(folder)
    pairs, problems = match_pairs(folder, cfg)
    if problems:
        raise DataError(problems[0] + (f" (and {len(problems) - 1} more)" if problems[1:] else ""))
    groups = np.array([group_of(stem, cfg.group_regex) for stem, _, _ in pairs], dtype=str)
    labels = LabelMap.from_config(cfg)
    if select is not None and not labels.open:
        keep = select(groups)
        pairs, groups, select = [pairs[i] for i in keep], groups[keep], None
    channels = channels or cfg.channels or folder_channels(folder / cfg.image_dir)
    table = read_spacing_csv(Path(cfg.spacing_csv), cfg.spacing_column) if cfg.spacing_csv else None

    def load_one(pair: Pair) -> tuple[np.ndarray, np.ndarray, np.ndarray, set[int]]:
        stem, image_path, mask_path = pair
        image = read_image(image_path, channels, cfg.max_pixels)
        raw = read_mask(mask_path, labels.needs_rgb, cfg.max_pixels)
        mask = labels.apply(raw, str(mask_path))
        if image.shape[-2:] != mask.shape:
            rows, cols = image.shape[-2:]
            raise DataError(
                f"{image_path} is {rows}x{cols} but {mask_path} is {mask.shape[0]}x{mask.shape[1]}"
            )
        if table is not None:
            mm = table.get(image_path.name, table.get(stem))
            if mm is None:
                raise DataError(f"{image_path}: not listed in spacing CSV {cfg.spacing_csv}")
        else:
            mm = cfg.spacing_mm if cfg.spacing_mm > 0 else float("nan")
        resized = resize_image(image, size) if channels == 1 else resize_planes(image, size)
        return (
            normalise(resized).reshape(channels, size, size),
            resize_mask(mask, size),
            resized_spacing((mm, mm), mask.shape, size),
            mask_values(mask) if labels.open else set(),
        )

    # Decoding releases the GIL, so a few threads roughly divide the loading time.
    workers = min(4, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        results = list(
            track(
                pool.map(load_one, pairs),
                total=len(pairs),
                description=f"loading {name}",
                transient=True,
                disable=len(pairs) <= PROGRESS_ABOVE,
            )
        )
    xs, ys, spacings, values = zip(*results, strict=True)
    classes = resolve_classes(labels, set().union(*values), str(mask_folder(folder, cfg.mask_dir)))
    data = SiteData(
        name=name,
        images=np.stack(xs),
        masks=classes.apply(np.stack(ys)),
        spacing=np.stack(spacings),
        groups=groups,
        names=[image_path.name for _, image_path, _ in pairs],
        class_names=classes.class_names,
    )
    return data if select is None else data.subset(select(groups), name)
