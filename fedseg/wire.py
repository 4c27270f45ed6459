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
    out = {}
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
) -> Latents:
    """Validate and convert; ``shapes`` are the agreed (C, h, w) per scale."""
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
        total += arr.nbytes
        if not np.isfinite(arr).all():
            raise WireError(f"field {name!r}: contains NaN or inf")
        latents.append(torch.from_numpy(arr.astype(np.float32)))
    if max_items is not None and count is not None and count > max_items:
        raise WireError(f"{count} items in one payload; the limit is {max_items}")
    if total > MAX_PAYLOAD_BYTES:
        raise WireError(f"payload of {total} bytes exceeds {MAX_PAYLOAD_BYTES}")
    return latents


def payload_bytes(shapes: list[tuple[int, int, int]]) -> int:
    """Bytes of one query's latents on the wire, one way."""
    return sum(int(np.prod(s)) for s in shapes) * np.dtype(WIRE_DTYPE).itemsize
