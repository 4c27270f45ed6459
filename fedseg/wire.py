"""What crosses the wire: latents as fp16 arrays, checked on arrival.

Both sides validate what they receive, because a malformed or oversized payload from one
hospital must be refused with a message naming the field, not crash a federation.
"""

from __future__ import annotations

import numpy as np
import torch

from fedseg.models.autoencoder import Latents

WIRE_DTYPE = np.float16
GRAD_DTYPE = np.float32  # gradients (fine-tuning) are far below fp16's resolution
MAX_PAYLOAD_BYTES = 256 * 2**20


class WireError(ValueError):
    """A payload does not have the agreed shape, dtype, size or values."""


def pack(latents: Latents, prefix: str, dtype: type = WIRE_DTYPE) -> dict[str, np.ndarray]:
    """Latents -> {"<prefix>0": fp16 array, ...} (values beyond the dtype's range are an error)."""
    out: dict[str, np.ndarray] = {}
    for s, z in enumerate(latents):
        arr = z.detach().float().numpy()
        if np.abs(arr).max(initial=0.0) > np.finfo(dtype).max:
            raise WireError(f"{prefix}{s}: values exceed the {np.dtype(dtype).name} range")
        # C order: latents are often channels-last in memory; the wire is (N, C, h, w).
        out[f"{prefix}{s}"] = arr.astype(dtype, order="C")
    return out


def unpack(
    arrays: dict[str, np.ndarray],
    prefix: str,
    shapes: list[tuple[int, int, int]],
    max_items: int | None = None,
    dtype: type = WIRE_DTYPE,
    items: int | None = None,
) -> Latents:
    """Validate and convert; ``shapes`` are the agreed (C, h, w) per scale; ``items`` the exact
    number asked for, ``max_items`` an upper bound (a payload never has zero items)."""
    latents, count, total = [], None, 0
    for s, shape in enumerate(shapes):
        name = f"{prefix}{s}"
        if name not in arrays:
            raise WireError(f"missing field {name!r}")
        arr = arrays[name]
        if arr.dtype != dtype:
            raise WireError(f"field {name!r}: dtype {arr.dtype}, expected {np.dtype(dtype).name}")
        if arr.ndim != 4 or tuple(arr.shape[1:]) != tuple(shape):
            raise WireError(
                f"field {name!r}: shape {arr.shape}, expected (N, {', '.join(map(str, shape))})"
            )
        if count is not None and arr.shape[0] != count:
            raise WireError(f"field {name!r}: {arr.shape[0]} items, other scales have {count}")
        count = arr.shape[0]
        if count == 0:
            raise WireError(f"field {name!r}: no items")
        if items is not None and count != items:
            raise WireError(f"field {name!r}: {count} items, {items} were asked for")
        if max_items is not None and count > max_items:
            raise WireError(f"{count} items in one payload; the limit is {max_items}")
        total += arr.nbytes
        if total > MAX_PAYLOAD_BYTES:
            raise WireError(f"payload of over {total} bytes exceeds {MAX_PAYLOAD_BYTES}")
        if not np.isfinite(arr).all():
            raise WireError(f"field {name!r}: contains NaN or inf")
        latents.append(torch.from_numpy(arr.astype(np.float32)))
    return latents


def check_fields(arrays: dict[str, np.ndarray], prefixes: tuple[str, ...], scales: int) -> None:
    """Refuse any field but ``<prefix><scale>``: nothing rides along unasked."""
    expected = {f"{p}{s}" for p in prefixes for s in range(scales)}
    unknown = sorted(set(arrays) - expected)
    if unknown:
        raise WireError(f"unexpected field(s) {unknown[:3]}; expected {sorted(expected)}")


class MagnitudeGuard:
    """Finite but extreme values: each site's payloads are compared, field by field, with the
    largest root-mean-square of that site's own earlier accepted payloads.

    One site sending its latents x100 raised the honest sites' held-out latent MSE by 40%
    (issue 24's audit); values that pass every shape and finiteness check can still poison the
    server's network. The reference is the peak, not a running mean: honest gradients shrink
    by orders of magnitude as the loss falls and then vary tenfold from batch to batch (a
    running mean refused an honest gradient 14x its 7e-7 in the demo's epoch 111), while
    nothing an honest site sends later should dwarf what it sent before. The first ``warmup``
    payloads set it.
    """

    def __init__(self, bound: float, warmup: int = 3) -> None:
        self.bound, self.warmup = bound, warmup
        self._peak: dict[tuple[str, str], tuple[float, int]] = {}

    def check(self, site: str, arrays: dict[str, np.ndarray]) -> None:
        """Raise WireError if a field's RMS exceeds ``bound`` times the site's peak so far;
        otherwise fold it into the peak."""
        if self.bound <= 0:
            return
        updates = {}
        for name, arr in arrays.items():
            rms = float(np.sqrt(np.mean(np.square(arr, dtype=np.float64))))
            peak, seen = self._peak.get((site, name), (0.0, 0))
            if seen >= self.warmup and peak > 0 and rms > peak * self.bound:
                raise WireError(
                    f"field {name!r}: magnitude {rms:.3g} is {rms / peak:.3g}x the largest this "
                    f"site sent before, {peak:.3g} (federation.magnitude_bound = {self.bound:g})"
                )
            updates[(site, name)] = (max(peak, rms), seen + 1)
        self._peak.update(updates)


def payload_bytes(shapes: list[tuple[int, int, int]]) -> int:
    """Bytes of one query's latents on the wire, one way."""
    return sum(int(np.prod(s)) for s in shapes) * np.dtype(WIRE_DTYPE).itemsize
