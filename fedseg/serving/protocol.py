"""The service's wire format: keyed fp16 latents as raw bytes, described by headers.

A body holds N items, scale after scale, each scale an (N, C, h, w) C-order float16 array.
Headers name the dtype, the per-scale shapes and N, so that a mismatch is refused with a
message saying what was expected instead of being misread.
"""

from __future__ import annotations

import json

import numpy as np

from fedseg.wire import WIRE_DTYPE, WireError

DTYPE_HEADER = "x-fedseg-dtype"
SHAPES_HEADER = "x-fedseg-shapes"
ITEMS_HEADER = "x-fedseg-items"
MEDIA_TYPE = "application/octet-stream"

Shapes = list[tuple[int, int, int]]


def shapes_text(shapes: Shapes) -> str:
    return ",".join("x".join(str(d) for d in shape) for shape in shapes)


def item_bytes(shapes: Shapes) -> int:
    return sum(int(np.prod(s)) for s in shapes) * np.dtype(WIRE_DTYPE).itemsize


def headers(shapes: Shapes, items: int) -> dict[str, str]:
    return {
        DTYPE_HEADER: np.dtype(WIRE_DTYPE).name,
        SHAPES_HEADER: shapes_text(shapes),
        ITEMS_HEADER: str(items),
        "content-type": MEDIA_TYPE,
    }


def to_body(arrays: dict[str, np.ndarray], prefix: str, shapes: Shapes) -> tuple[bytes, int]:
    """fp16 wire arrays ({prefix}0..2) -> (body, item count)."""
    parts = [np.ascontiguousarray(arrays[f"{prefix}{s}"], WIRE_DTYPE) for s in range(len(shapes))]
    return b"".join(p.tobytes() for p in parts), parts[0].shape[0]


def from_body(body: bytes, items: int, prefix: str, shapes: Shapes) -> dict[str, np.ndarray]:
    """Raw bytes -> fp16 wire arrays; the length must be exactly ``items`` whole items."""
    expected = items * item_bytes(shapes)
    if len(body) != expected:
        raise WireError(
            f"body has {len(body)} bytes; {items} item(s) of shapes {shapes_text(shapes)} "
            f"in float16 need {expected}"
        )
    out, offset = {}, 0
    for s, shape in enumerate(shapes):
        count = items * int(np.prod(shape))
        flat = np.frombuffer(body, WIRE_DTYPE, count=count, offset=offset)
        out[f"{prefix}{s}"] = flat.reshape(items, *shape)
        offset += count * np.dtype(WIRE_DTYPE).itemsize
    return out


# --- encrypted queries (privacy/ckks.py payloads: a few named byte/int64 arrays) -----------

CKKS_MEDIA_TYPE = "application/x-fedseg-ckks"
ARRAY_DTYPES = ("uint8", "int64")
MAX_INDEX_BYTES = 4096


def arrays_body(arrays: dict[str, np.ndarray]) -> bytes:
    """Named 1-D uint8/int64 arrays -> one body: a JSON index line, then the raw bytes."""
    index = []
    for name, arr in arrays.items():
        if arr.dtype.name not in ARRAY_DTYPES or arr.ndim != 1:
            raise WireError(f"{name}: {arr.dtype} {arr.shape} is not a 1-D uint8/int64 array")
        index.append([name, arr.dtype.name, int(arr.nbytes)])
    head = json.dumps(index).encode() + b"\n"
    return head + b"".join(np.ascontiguousarray(a).tobytes() for a in arrays.values())


def body_arrays(body: bytes) -> dict[str, np.ndarray]:
    """The inverse of :func:`arrays_body`; lengths must add up to the body exactly."""
    end = body.find(b"\n", 0, MAX_INDEX_BYTES)
    if end < 0:
        raise WireError("no index line at the start of the body")
    try:
        index = json.loads(body[:end])
        fields = [(str(n), str(d), int(size)) for n, d, size in index]
    except (ValueError, TypeError) as err:
        raise WireError(f"unreadable body index: {err}") from None
    if sum(size for _, _, size in fields) != len(body) - end - 1:
        raise WireError("the body's length does not match its index")
    out, offset = {}, end + 1
    for name, dtype, size in fields:
        if dtype not in ARRAY_DTYPES or size < 0 or size % np.dtype(dtype).itemsize:
            raise WireError(f"{name}: dtype {dtype!r} / {size} bytes not accepted")
        out[name] = np.frombuffer(
            body, dtype, count=size // np.dtype(dtype).itemsize, offset=offset
        )
        offset += size
    return out
