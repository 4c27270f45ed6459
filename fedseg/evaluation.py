"""Segmentation metrics (Dice, HD95, ASD) computed with MONAI on integer class maps.

All methods (PPCMI-SF and the UNet baselines) are scored by this one module so their numbers
are comparable. Conventions:

* Class 0 is background and is never scored; only ``class_names[1:]`` appear in the output.
* A class is scored on an image only when it is present in the ground truth. Images where the
  class is absent from the truth but predicted are ignored for that class (Dice via MONAI's
  ``ignore_empty``, distances by masking), as is usual for per-structure metrics.
* A class present in the truth but predicted empty gets Dice 0 and, for HD95/ASD, the image
  diagonal (MONAI returns nan/inf there). Dropping those images instead would reward a model
  that predicts nothing: its distances would be averaged only over the easy images it found.
* Distances are in mm when every image has a known spacing, else in pixels (``units``).

Volume data is also scored per volume (:func:`volume_metrics`): each test volume whole, on its
own grid, in 3D, with the voxel spacing of its NIfTI header; a site reports the mean over its
volumes per class and how many volumes each mean is over, so the means over a federation's
volumes (the Medical Segmentation Decathlon's convention) follow from the sites' metrics alone.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, cast

import numpy as np
import torch
from monai.metrics import DiceMetric, HausdorffDistanceMetric, SurfaceDistanceMetric
from monai.networks.utils import one_hot

_METRICS = ("dice", "hd95", "asd")
_CHUNK = 64  # images per MONAI call


def segmentation_metrics(
    pred: np.ndarray, truth: np.ndarray, class_names: list[str], spacing: np.ndarray | None
) -> dict[str, Any]:
    """Per-class and mean foreground Dice/HD95/ASD of one site's test set.

    ``spacing`` is (N, 2) mm per pixel as (row, column) = (H, W) axes, or (N,) for isotropic
    pixels; ``None`` or any NaN means unknown, and then all distances are in pixels so that
    one site never mixes units.
    """
    num_classes = _check_classes(class_names)
    _check_maps(pred, truth, num_classes)
    spacing_hw = _check_spacing(spacing, len(pred))
    units = "px" if spacing_hw is None else "mm"
    foreground = list(class_names[1:])
    if len(pred) == 0:
        return _assemble({m: [None] * len(foreground) for m in _METRICS}, foreground, units, 0)

    present = _presence(truth, num_classes)  # (N, C-1)
    dice, hd95, asd = _monai_scores(pred, truth, num_classes, spacing_hw)
    diagonal = _diagonals(pred.shape[1:], spacing_hw)[:, None]
    per_class = {
        "dice": _class_means(np.where(present, dice, np.nan)),
        "hd95": _class_means(_worst_if_missing(hd95, present, diagonal)),
        "asd": _class_means(_worst_if_missing(asd, present, diagonal)),
    }
    return _assemble(per_class, foreground, units, len(pred))


def volume_metrics(
    preds: list[np.ndarray],
    truths: list[np.ndarray],
    spacings: list[tuple[float, ...]],
    class_names: list[str],
) -> dict[str, Any]:
    """3D Dice, HD95 and ASD of each volume and foreground class, with MONAI, averaged over the
    volumes: per class (``dice``, ...), their means over classes (``dice_mean``, ...), and the
    count of volumes each class was scored on (``n_scored``).

    ``preds`` and ``truths`` are class maps on each volume's own grid; ``spacings`` its voxel
    size in mm (any NaN: all distances in voxels). The conventions of the per-slice metrics
    hold per volume: a class counts where the truth has it; present but not predicted gives
    Dice 0 and the volume's diagonal as its distances.
    """
    num_classes = _check_classes(class_names)
    if not len(preds) == len(truths) == len(spacings):
        raise ValueError("preds, truths and spacings: one entry per volume")
    units = "mm" if all(np.isfinite(s).all() for s in spacings) else "px"
    scores: dict[str, list[np.ndarray]] = {m: [] for m in _METRICS}
    present = []
    for pred, truth, spacing in zip(preds, truths, spacings, strict=True):
        if pred.shape != truth.shape or pred.ndim != 3:
            raise ValueError(f"volume: prediction {pred.shape} and truth {truth.shape} differ")
        grid = [float(v) for v in spacing] if units == "mm" else [1.0, 1.0, 1.0]
        has = np.array([(truth == c).any() for c in range(1, num_classes)])
        y_pred = _one_hot(pred[None].astype(np.int64), num_classes)
        y = _one_hot(truth[None].astype(np.int64), num_classes)
        dice, hd95, asd = _monai_volume(y_pred, y, grid)
        diagonal = float(np.sqrt(np.sum((np.array(truth.shape) * np.array(grid)) ** 2)))
        scores["dice"].append(np.where(has, dice, np.nan))
        scores["hd95"].append(_worst_if_missing(hd95[None], has[None], np.array([diagonal]))[0])
        scores["asd"].append(_worst_if_missing(asd[None], has[None], np.array([diagonal]))[0])
        present.append(has)
    foreground = list(class_names[1:])
    if not preds:
        return {**_assemble({m: [None] * len(foreground) for m in _METRICS}, foreground, units, 0)}
    per_class = {m: _class_means(np.stack(v)) for m, v in scores.items()}
    out = _assemble(per_class, foreground, units, len(preds))
    out["n_volumes"] = out.pop("n_test")
    out["n_scored"] = dict(zip(foreground, np.stack(present).sum(0).tolist(), strict=True))
    return out


def mean_over_sites(sites: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Unweighted mean over sites, so a large hospital does not hide a poor small one.

    ``units`` is "mixed" when sites report distances in different units; the distance means
    are then only indicative. Where every site scored whole volumes, ``volume`` holds the means
    over all their volumes (:func:`pooled_volume_means`).
    """
    out: dict[str, Any] = {}
    for name in _METRICS:
        values = [s.get(f"{name}_mean") for s in sites.values()]
        out[name] = _mean_or_none(values)
    units = {s.get("units") for s in sites.values()} - {None}
    out["units"] = None if not units else units.pop() if len(units) == 1 else "mixed"
    blocks = [s.get("volume") for s in sites.values()]
    if blocks and all(isinstance(b, dict) for b in blocks):
        out["volume"] = pooled_volume_means(cast(list[dict[str, Any]], blocks))
    return out


def pooled_volume_means(blocks: list[dict[str, Any]]) -> dict[str, Any]:
    """Per-class means over every volume of several sites, from each site's per-volume means
    and counts (``volume_metrics``): the Decathlon's mean over test volumes."""
    classes = list((blocks[0].get("dice") or {}).keys())
    out: dict[str, Any] = {}
    for name in _METRICS:
        per_class: dict[str, float | None] = {}
        for c in classes:
            pairs = [
                (b[name].get(c), (b.get("n_scored") or {}).get(c, 0))
                for b in blocks
                if isinstance(b.get(name), dict)
            ]
            pairs = [(v, n) for v, n in pairs if v is not None and n]
            total = sum(n for _, n in pairs)
            per_class[c] = sum(v * n for v, n in pairs) / total if total else None
        out[name] = per_class
        out[f"{name}_mean"] = _mean_or_none(list(per_class.values()))
    units = {b.get("units") for b in blocks} - {None}
    out["units"] = None if not units else units.pop() if len(units) == 1 else "mixed"
    out["n_volumes"] = int(sum(int(b.get("n_volumes") or 0) for b in blocks))
    return out


def dice_per_image(pred: np.ndarray, truth: np.ndarray, num_classes: int) -> np.ndarray:
    """Mean foreground Dice of each image, for picking good/bad example images.

    Classes absent from both maps are skipped; an image where truth and prediction are both
    all background scores 1.0 (nothing to find, nothing found), so every entry is finite.
    """
    if num_classes < 2:
        raise ValueError("num_classes: need background plus at least one foreground class")
    _check_maps(pred, truth, num_classes)
    if len(pred) == 0:
        return np.zeros(0, dtype=np.float64)
    metric = DiceMetric(include_background=False, reduction="none", ignore_empty=False)
    parts = []
    for start in range(0, len(pred), _CHUNK):
        p, t = pred[start : start + _CHUNK], truth[start : start + _CHUNK]
        with _quiet_monai():
            # MONAI's metrics return a tensor for tensor inputs (typed as tensor or sequence)
            scores = cast(torch.Tensor, metric(_one_hot(p, num_classes), _one_hot(t, num_classes)))
            parts.append(scores.cpu().numpy())
    dice = np.concatenate(parts, axis=0).astype(np.float64)
    union = _presence(truth, num_classes) | _presence(pred, num_classes)
    scored = np.where(union, dice, 0.0).sum(axis=1)
    counts = union.sum(axis=1)
    return np.where(counts > 0, scored / np.maximum(counts, 1), 1.0)


# --------------------------------------------------------------------------- validation


def _check_classes(class_names: list[str]) -> int:
    if len(class_names) < 2:
        raise ValueError("class_names: need background plus at least one foreground class")
    return len(class_names)


def _check_maps(pred: np.ndarray, truth: np.ndarray, num_classes: int) -> None:
    """Fail early with the field name: a bad map deep in MONAI gives an opaque error."""
    for name, arr in (("pred", pred), ("truth", truth)):
        if not isinstance(arr, np.ndarray):
            raise TypeError(f"{name}: expected a numpy array, got {type(arr).__name__}")
        if arr.ndim != 3:
            raise ValueError(f"{name}: expected shape (N, H, W), got {arr.shape}")
        if not np.issubdtype(arr.dtype, np.integer):
            raise ValueError(f"{name}: expected an integer class map, got dtype {arr.dtype}")
        if arr.size and (arr.min() < 0 or arr.max() >= num_classes):
            raise ValueError(
                f"{name}: class values must lie in [0, {num_classes - 1}], "
                f"got [{arr.min()}, {arr.max()}]"
            )
    if pred.shape != truth.shape:
        raise ValueError(f"pred: shape {pred.shape} does not match truth shape {truth.shape}")


def _check_spacing(spacing: np.ndarray | None, n: int) -> np.ndarray | None:
    """Return (N, 2) float spacing, or None when any of it is unknown."""
    if spacing is None:
        return None
    arr = np.asarray(spacing, dtype=np.float64)
    if arr.ndim == 1:
        arr = np.repeat(arr[:, None], 2, axis=1)
    if arr.shape != (n, 2):
        raise ValueError(f"spacing: expected shape ({n}, 2) or ({n},), got {arr.shape}")
    if np.isnan(arr).any():
        return None
    if not np.isfinite(arr).all() or (arr <= 0).any():
        raise ValueError("spacing: values must be positive and finite (or NaN for unknown)")
    return arr


# --------------------------------------------------------------------------- computation


def _monai_scores(
    pred: np.ndarray, truth: np.ndarray, num_classes: int, spacing: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Raw (N, C-1) Dice, HD95 and symmetric ASD, in chunks to bound one-hot memory."""
    chunks = []
    for start in range(0, len(pred), _CHUNK):
        part = slice(start, start + _CHUNK)
        sp = None if spacing is None else spacing[part]
        chunks.append(_monai_chunk(pred[part], truth[part], num_classes, sp))
    return tuple(np.concatenate(c, axis=0) for c in zip(*chunks, strict=True))  # type: ignore[return-value]


def _monai_chunk(
    pred: np.ndarray, truth: np.ndarray, num_classes: int, spacing: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    y_pred, y = _one_hot(pred, num_classes), _one_hot(truth, num_classes)
    # MONAI wants a list of per-image lists of Python floats; numpy float32 is rejected.
    monai_spacing = None if spacing is None else spacing.astype(float).tolist()
    dice_metric = DiceMetric(include_background=False, reduction="none", ignore_empty=True)
    hd_metric = HausdorffDistanceMetric(percentile=95, include_background=False, reduction="none")
    asd_metric = SurfaceDistanceMetric(symmetric=True, include_background=False, reduction="none")
    with _quiet_monai():  # tensors in, so tensors out (MONAI types them as tensor or sequence)
        dice = cast(torch.Tensor, dice_metric(y_pred, y))
        hd95 = cast(torch.Tensor, hd_metric(y_pred, y, spacing=monai_spacing))
        asd = cast(torch.Tensor, asd_metric(y_pred, y, spacing=monai_spacing))
    return tuple(t.cpu().numpy().astype(np.float64) for t in (dice, hd95, asd))  # type: ignore[return-value]


def _monai_volume(
    y_pred: torch.Tensor, y: torch.Tensor, spacing: list[float]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(C-1,) Dice, HD95 and symmetric ASD of one volume (one-hot, batch of one)."""
    dice_metric = DiceMetric(include_background=False, reduction="none", ignore_empty=True)
    hd_metric = HausdorffDistanceMetric(percentile=95, include_background=False, reduction="none")
    asd_metric = SurfaceDistanceMetric(symmetric=True, include_background=False, reduction="none")
    with _quiet_monai():  # tensors in, so tensors out
        dice = cast(torch.Tensor, dice_metric(y_pred, y))
        hd95 = cast(torch.Tensor, hd_metric(y_pred, y, spacing=spacing))
        asd = cast(torch.Tensor, asd_metric(y_pred, y, spacing=spacing))
    return tuple(t.cpu().numpy()[0].astype(np.float64) for t in (dice, hd95, asd))  # type: ignore[return-value]


def _one_hot(labels: np.ndarray, num_classes: int) -> torch.Tensor:
    labels_t = torch.from_numpy(labels.astype(np.int64))[:, None]
    return one_hot(labels_t, num_classes, dtype=torch.float64, dim=1)


def _presence(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """(N, C-1) bool: foreground class c+1 occurs in image n."""
    flat = labels.reshape(len(labels), -1)
    return np.stack([(flat == c).any(axis=1) for c in range(1, num_classes)], axis=1)


def _diagonals(shape_hw: tuple[int, ...], spacing: np.ndarray | None) -> np.ndarray:
    """Image diagonal per image in the current units: the worst possible distance."""
    h, w = shape_hw
    if spacing is None:
        return np.array([math.hypot(h, w)])
    return np.hypot(h * spacing[:, 0], w * spacing[:, 1])


def _worst_if_missing(values: np.ndarray, present: np.ndarray, diagonal: np.ndarray) -> np.ndarray:
    """Keep distances where the class is in the truth; nan/inf there -> the diagonal."""
    worst = np.broadcast_to(diagonal, values.shape)
    filled = np.where(np.isfinite(values), values, worst)
    return np.where(present, filled, np.nan)


def _class_means(values: np.ndarray) -> list[float | None]:
    """Per-class mean over images where the class was scored; None if never scored."""
    out: list[float | None] = []
    for column in values.T:
        finite = column[~np.isnan(column)]
        out.append(float(finite.mean()) if finite.size else None)
    return out


def _assemble(
    per_class: dict[str, list[float | None]], foreground: list[str], units: str, n: int
) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for name in _METRICS:
        result[name] = dict(zip(foreground, per_class[name], strict=True))
    for name in _METRICS:
        result[f"{name}_mean"] = _mean_or_none(per_class[name])
    result["units"] = units
    result["n_test"] = int(n)
    return result


def _mean_or_none(values: list[Any]) -> float | None:
    kept = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    return float(np.mean(kept)) if kept else None


@contextmanager
def _quiet_monai() -> Iterator[None]:
    """Silence MONAI's per-image 'is all 0' and deprecation chatter; the cases are handled."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*is all 0.*")
        warnings.filterwarnings("ignore", message=r".*always_return_as_numpy.*")
        yield
