"""The service's wire format: keyed fp16 latents as raw bytes, described by headers.

A body holds N items, scale after scale, each scale an (N, C, h, w) C-order float16 array.
Headers name the dtype, the per-scale shapes and N, so that a mismatch is refused with a
message saying what was expected instead of being misread.
"""

from __future__ import annotations

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
