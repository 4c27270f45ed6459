"""Stored mask values -> class indices: every hospital encodes its labels differently."""

from __future__ import annotations

import numpy as np
from PIL import Image

from fedseg.data.dataset import DataError


def default_class_names(n: int) -> list[str]:
    return ["background"] + [f"class{i}" for i in range(1, n)]


class LabelMap:
    """Maps stored mask values (e.g. JSRT's 0/150/200/250) to class indices 0..K-1.

    With no ``label_values`` the stored value *is* the class; with no ``class_names`` either,
    the number of classes is open until the data has been seen (see :meth:`class_names_for`).
    """

    def __init__(self, label_values: list[int] | None = None, class_names: list[str] | None = None):
        values = [int(v) for v in (label_values or [])]
        names = list(class_names or [])
        if len(set(values)) != len(values):
            raise DataError(f"label_values has duplicates: {values}")
        if values and names and len(values) != len(names):
            raise DataError(
                f"label_values has {len(values)} entries {values} but class_names has "
                f"{len(names)} {names}"
            )
        if values and not names:
            names = default_class_names(len(values))
        self.label_values = values or list(range(len(names)))
        self.class_names = names
        self.open = not values and not names  # identity with an unknown number of classes

    @property
    def num_classes(self) -> int | None:
        return None if self.open else len(self.class_names)

    def class_names_for(self, max_class: int) -> list[str]:
        """Final class names once the largest class index in the data is known."""
        if self.open:
            return default_class_names(max(max_class + 1, 2))
        return list(self.class_names)

    def apply(self, raw: np.ndarray, source: str) -> np.ndarray:
        """Class index per pixel; any value outside the map is an error naming ``source``."""
        raw = np.asarray(raw)
        if raw.dtype == bool:
            raw = raw.astype(np.uint8)
        if raw.dtype.kind == "f":
            if not np.isfinite(raw).all() or not np.array_equal(raw, np.round(raw)):
                raise DataError(f"{source}: mask has non-integer values")
            raw = raw.astype(np.int64)
        if raw.dtype.kind not in "iu":
            raise DataError(f"{source}: mask has unsupported dtype {raw.dtype}")
        if raw.size == 0:
            return raw.astype(np.int64)
        lo, hi = int(raw.min()), int(raw.max())
        if self.open:
            if lo < 0:
                raise DataError(f"{source}: mask has negative values (min {lo})")
            return raw.astype(np.int64)
        # A lookup table over the value range is much faster than np.unique on big masks.
        if hi - lo < 1 << 20:
            lut = np.full(hi - lo + 1, -1, np.int64)
            for cls, value in enumerate(self.label_values):
                if lo <= value <= hi:
                    lut[value - lo] = cls
            out = lut[raw.astype(np.int64) - lo]
            if (out >= 0).all():
                return out
            bad = np.unique(raw[out < 0])
        else:
            known = np.isin(raw, self.label_values)
            if known.all():
                sorter = np.argsort(self.label_values)
                pos = np.searchsorted(np.asarray(self.label_values)[sorter], raw)
                return sorter[pos].astype(np.int64)
            bad = np.unique(raw[~known])
        shown = ", ".join(str(v) for v in bad[:10]) + (", ..." if len(bad) > 10 else "")
        raise DataError(
            f"{source}: unexpected mask value(s) {shown}; expected label_values {self.label_values}"
        )


def mask_to_2d(array: np.ndarray | Image.Image, source: str) -> np.ndarray:
    """One channel of stored label values from whatever the mask file holds.

    RGB(A) masks (HC18 stores 0/255 in all three channels) collapse to the max over the colour
    channels, alpha ignored; palette images keep their indices (us-nerve stores classes 0/1/2
    as palette indices, and their colours would be meaningless as labels).
    """
    if isinstance(array, Image.Image):
        if array.mode in ("LA", "PA"):
            array = np.asarray(array)[..., 0]
        elif array.mode == "1":
            array = np.asarray(array, dtype=np.uint8)
        else:
            array = np.asarray(array)  # 'P' gives the indices, not the colours
    mask: np.ndarray = np.asarray(array)
    if mask.ndim == 3 and mask.shape[-1] == 1:
        mask = mask[..., 0]
    if mask.ndim == 3 and mask.shape[-1] in (3, 4):
        # Elementwise maximum: much faster than a reduction over a length-3 axis.
        mask = np.maximum(np.maximum(mask[..., 0], mask[..., 1]), mask[..., 2])
    if mask.ndim != 2:
        raise DataError(f"{source}: mask must be 2D or RGB(A), got shape {mask.shape}")
    return mask
