"""Stored mask values -> class indices: every hospital encodes its labels differently.

Four ways a mask set can be read (``[data]``, docs/data.md):

- ``label_values``: the stored value of each class (JSRT's 0/150/200/250);
- ``label_colors``: the RGB colour of each class, within ``label_color_tolerance`` (colour-coded
  masks, compressed or not);
- ``mask_threshold``: binary masks, stored value > threshold is foreground (JPEG noise);
- none of them: the stored value is the class when the set says so unambiguously (0/1/2 ...,
  or exactly 0/255 as two classes, with a notice); anything else is an error that says which of
  the three to set. A mask set never silently becomes 256 classes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
from PIL import Image

from fedseg.config import DatasetConfig
from fedseg.data.dataset import DataError

Mode = Literal["values", "colors", "threshold", "open"]
# Without a label map the stored value is the class only below this: a mask set with larger
# values means something a label map must say (JSRT's 250 is not the 251st class).
OPEN_MAX_CLASSES = 32
BINARY_255 = frozenset({0, 255})
SUGGEST_VALUES_UP_TO = 16  # distinct values listed as a ready label_values suggestion


def default_class_names(n: int) -> list[str]:
    return ["background"] + [f"class{i}" for i in range(1, n)]


@dataclass(frozen=True)
class OpenClasses:
    """What an open (no label map) mask set means, once all its values have been seen."""

    class_names: list[str]
    lut: np.ndarray | None  # stored value -> class, where it is not the identity
    notice: str | None  # said once to the user (0/255 read as two classes)

    def apply(self, masks: np.ndarray) -> np.ndarray:
        return masks if self.lut is None else self.lut[masks]


class LabelMap:
    """Maps stored masks (one channel or RGB) to class indices 0..K-1 (see the module doc).

    With no map at all the number of classes is open until the whole set has been seen:
    :meth:`apply` returns the stored values and :meth:`resolve` says what they mean.
    """

    def __init__(
        self,
        label_values: list[int] | None = None,
        class_names: list[str] | None = None,
        *,
        threshold: float = -1.0,
        colors: list[list[int]] | None = None,
        tolerance: float = 40.0,
    ):
        values = [int(v) for v in (label_values or [])]
        names = list(class_names or [])
        palette = [tuple(int(c) for c in colour) for colour in (colors or [])]
        ways = [w for w, used in (("label_values", values), ("label_colors", palette)) if used]
        if threshold >= 0:
            ways.append("mask_threshold")
        if len(ways) > 1:
            raise DataError(f"{' and '.join(ways)} are alternatives: give one")
        if len(set(values)) != len(values):
            raise DataError(f"label_values has duplicates: {values}")
        if any(len(c) != 3 for c in palette) or len(set(palette)) != len(palette):
            raise DataError(f"label_colors must be distinct [r, g, b] triplets, got {colors}")
        self.mode: Mode = (
            "values"
            if values
            else "colors"
            if palette
            else "threshold"
            if threshold >= 0
            else "open"
        )
        n = {"values": len(values), "colors": len(palette), "threshold": 2, "open": 0}[self.mode]
        if n and names and len(names) != n:
            what = {"values": values, "colors": palette, "threshold": "a threshold"}[self.mode]
            raise DataError(
                f"{ways[0]} means {n} classes ({what}) but class_names has {len(names)} {names}"
            )
        if n and not names:
            binary = self.mode == "threshold"
            names = ["background", "foreground"] if binary else default_class_names(n)
        self.label_values = values or list(range(len(names)))
        self.class_names = names
        self.threshold = float(threshold)
        self.colors = np.asarray(palette, np.int32).reshape(-1, 3)
        self.tolerance = float(tolerance)
        # identity with an unknown number of classes (no map, no names)
        self.open = self.mode == "open" and not names

    @classmethod
    def from_config(cls, cfg: DatasetConfig) -> LabelMap:
        """The map a ``[data]`` (or ``[sources.<name>]``) section describes."""
        return cls(
            cfg.label_values,
            cfg.class_names,
            threshold=cfg.mask_threshold,
            colors=cfg.label_colors,
            tolerance=cfg.label_color_tolerance,
        )

    @property
    def needs_rgb(self) -> bool:
        """Whether masks must be read as colours (a palette PNG's colours, not its indices)."""
        return self.mode == "colors"

    @property
    def num_classes(self) -> int | None:
        return None if self.open else len(self.class_names)

    def apply(self, raw: np.ndarray, source: str, volume: bool = False) -> np.ndarray:
        """Class index per pixel (stored values for an open map); errors name ``source``.
        ``volume``: a 3D label volume (one value per voxel, never colours)."""
        raw = np.asarray(raw)
        if self.mode == "colors":
            if volume:
                raise DataError(f"{source}: label_colors is for colour-coded 2D masks")
            return self._colours(raw, source)
        if self.mode == "threshold":
            plane = raw if volume else mask_to_2d(raw, source)
            return (_numeric(plane, source) > self.threshold).astype(np.int64)
        raw = _numeric(raw if volume else grey_mask(raw, source), source)
        if raw.size == 0:
            return raw.astype(np.int64)
        lo, hi = int(raw.min()), int(raw.max())
        if lo < 0:
            raise DataError(f"{source}: mask has negative values (min {lo})")
        if self.open:
            return raw.astype(np.int64)
        return self._lookup(raw, lo, hi, source)

    def _lookup(self, raw: np.ndarray, lo: int, hi: int, source: str) -> np.ndarray:
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
        hint = ""
        if len(bad) > 10:  # compression noise, not a missing class
            hint = (
                f" ({len(bad)} values outside the map: compression noise? For binary masks set "
                "data.mask_threshold = 127 instead of label_values)"
            )
        raise DataError(
            f"{source}: unexpected mask value(s) {_shown(bad)}; expected label_values "
            f"{self.label_values}{hint}"
        )

    def _colours(self, raw: np.ndarray, source: str) -> np.ndarray:
        """Nearest class colour per pixel; a pixel farther than the tolerance is an error."""
        rgb = rgb_mask(raw, source).astype(np.int32)
        best = np.full(rgb.shape[:2], np.iinfo(np.int32).max, np.int32)
        out = np.zeros(rgb.shape[:2], np.int64)
        for cls, colour in enumerate(self.colors):
            d = ((rgb - colour) ** 2).sum(-1, dtype=np.int32)
            closer = d < best
            best[closer], out[closer] = d[closer], cls
        far = best > self.tolerance**2
        if far.any():
            colours = np.unique(rgb[far].reshape(-1, 3), axis=0)
            worst = float(np.sqrt(best.max()))
            raise DataError(
                f"{source}: {int(far.sum())} pixel(s) ({100 * far.mean():.2f}%) are farther than "
                f"label_color_tolerance = {self.tolerance:g} from every label colour (largest "
                f"distance {worst:.0f}), e.g. {', '.join(str(tuple(c)) for c in colours[:5])}; "
                f"label_colors are {[tuple(c) for c in self.colors.tolist()]}"
            )
        return out

    def resolve(self, values: set[int], source: str) -> OpenClasses:
        """What the stored values of a whole mask set mean (after :meth:`apply` on each file).

        With a map (or class names) the classes are fixed; without one, values 0..31 are the
        classes, exactly {0, 255} (or {0, 1}) are two classes with a notice, and anything else
        is an error suggesting label_values, mask_threshold or label_colors.
        """
        if not self.open:
            return OpenClasses(list(self.class_names), None, None)
        values = {int(v) for v in values}
        top = max(values, default=0)
        if values <= BINARY_255 and 255 in values:
            lut = np.zeros(256, np.int64)
            lut[255] = 1
            said = (
                f"{source}: masks hold exactly 0 and 255 and no label map: read as two classes "
                "(255 = foreground); say so with data.label_values = [0, 255]"
            )
            return OpenClasses(default_class_names(2), lut, said)
        if top < OPEN_MAX_CLASSES:
            notice: str | None = None
            if values == {0, 1}:
                notice = (
                    f"{source}: masks hold exactly 0 and 1 and no label map: read as two classes"
                )
            return OpenClasses(default_class_names(max(top + 1, 2)), None, notice)
        shown = sorted(values)
        suggest = (
            f"data.label_values = {shown} (class i = the i-th value), "
            if len(shown) <= SUGGEST_VALUES_UP_TO
            else ""
        )
        raise DataError(
            f"{source}: masks hold {len(shown)} distinct values ({_shown(np.array(shown))}) and "
            "no label map says what they mean (stored values are classes only below "
            f"{OPEN_MAX_CLASSES}). Set {suggest}data.mask_threshold = 127 for binary masks with "
            "compression noise (JPEG), or data.label_colors for colour-coded masks"
        )


def _shown(values: np.ndarray, limit: int = 10) -> str:
    return ", ".join(str(v) for v in values[:limit]) + (", ..." if len(values) > limit else "")


def _numeric(raw: np.ndarray, source: str) -> np.ndarray:
    """Integer stored values; float masks must hold whole numbers."""
    if raw.dtype == bool:
        return raw.astype(np.uint8)
    if raw.dtype.kind == "f":
        if not np.isfinite(raw).all() or not np.array_equal(raw, np.round(raw)):
            raise DataError(f"{source}: mask has non-integer values")
        return raw.astype(np.int64)
    if raw.dtype.kind not in "iu":
        raise DataError(f"{source}: mask has unsupported dtype {raw.dtype}")
    return raw


def mask_to_2d(array: np.ndarray | Image.Image, source: str) -> np.ndarray:
    """One channel of stored values, RGB(A) collapsed to the max over the colour channels
    (alpha ignored): what a threshold compares. Palette images keep their indices (us-nerve
    stores classes 0/1/2 as palette indices; their colours would be meaningless as labels)."""
    mask = raw_mask(array)
    if mask.ndim == 3 and mask.shape[-1] == 3:
        # Elementwise maximum: much faster than a reduction over a length-3 axis.
        mask = np.maximum(np.maximum(mask[..., 0], mask[..., 1]), mask[..., 2])
    if mask.ndim != 2:
        raise DataError(f"{source}: mask must be 2D or RGB(A), got shape {mask.shape}")
    return mask


def grey_mask(array: np.ndarray, source: str) -> np.ndarray:
    """One channel of stored values, where an RGB mask must be grey (R = G = B, as HC18's
    0/255 masks are): colours that differ are classes only ``label_colors`` can tell apart."""
    mask = raw_mask(array)
    if mask.ndim == 3 and mask.shape[-1] == 3:
        r, g, b = mask[..., 0], mask[..., 1], mask[..., 2]
        differ = (r != g) | (g != b)
        if differ.any():
            y, x = (int(i[0]) for i in np.nonzero(differ))
            raise DataError(
                f"{source}: colour mask (pixel ({y}, {x}) is {tuple(int(c) for c in mask[y, x])}, "
                f"{int(differ.sum())} pixels not grey): set data.label_colors for colour-coded "
                "classes, or data.mask_threshold for a binary mask with compression noise"
            )
        mask = r
    if mask.ndim != 2:
        raise DataError(f"{source}: mask must be 2D or RGB(A), got shape {mask.shape}")
    return mask


def rgb_mask(array: np.ndarray, source: str) -> np.ndarray:
    """(H, W, 3) colours; a one-channel mask is grey (g, g, g)."""
    mask = raw_mask(array)
    if mask.ndim == 2:
        mask = np.repeat(mask[..., None], 3, axis=-1)
    if mask.ndim != 3 or mask.shape[-1] != 3:
        raise DataError(f"{source}: mask must be 2D or RGB(A), got shape {mask.shape}")
    if mask.dtype.kind not in "iu" or (mask.size and (mask.min() < 0 or mask.max() > 255)):
        raise DataError(f"{source}: label_colors needs 8-bit colour masks, got {mask.dtype}")
    return mask


def raw_mask(array: np.ndarray | Image.Image) -> np.ndarray:
    """The stored array: 2D, or (H, W, 3) with alpha and singleton channels dropped."""
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
    if mask.ndim == 3 and mask.shape[-1] == 4:
        mask = mask[..., :3]
    return mask
