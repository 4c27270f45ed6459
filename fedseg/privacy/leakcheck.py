"""Find key material in an outgoing payload before it leaves the hospital.

Two checks, both cheap enough to run on every reply:
- byte patterns: the raw secret and each HKDF output, as bytes or hex, in any array or text;
  each permutation as int32/int64 bytes;
- value runs: any array holding ``min_run`` consecutive values that are all entries of a key
  (P Q, Q or the bias, cast to that array's dtype). A leaked matrix row, column or bias is such
  a run. In fp32/fp64 a chance match is rare (runs of 8 suffice); fp16 is coarse enough that a
  third of small fp16 values are some key entry, so there the run must span a whole key row.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from fedseg.privacy.keys import KeyRing, derive_bytes

INT_TYPES = (np.int32, np.int64)


def _byte_patterns(secret: bytes, ring: KeyRing | None) -> list[tuple[str, bytes]]:
    patterns = [("secret", secret), ("secret (hex)", secret.hex().encode())]
    for role, keys in ring.keys.items() if ring else []:
        for s, key in enumerate(keys):
            label = f"klt/{role}/scale{s}"
            seed = derive_bytes(secret, label)
            patterns += [(f"{label} seed", seed), (f"{label} seed (hex)", seed.hex().encode())]
            for dtype in INT_TYPES:
                perm = key.permutation.astype(dtype).tobytes()
                patterns.append((f"{label} permutation as {np.dtype(dtype)}", perm))
    return patterns


def _key_values(ring: KeyRing) -> np.ndarray:
    parts = [
        np.concatenate([k.mixing.ravel(), k.rotation.ravel(), k.bias.ravel()])
        for keys in ring.keys.values()
        for k in keys
    ]
    return np.concatenate(parts)


def _row_length(ring: KeyRing) -> int:
    return next(iter(ring.keys.values()))[0].mixing.shape[0]


def _longest_run(flags: np.ndarray) -> int:
    if not flags.any():
        return 0
    padded = np.concatenate([[0], flags.astype(np.int8), [0]])
    edges = np.flatnonzero(np.diff(padded))
    return int((edges[1::2] - edges[0::2]).max())


def find_key_material(
    arrays: dict[str, np.ndarray],
    strings: Iterable[str],
    secret: bytes,
    ring: KeyRing | None,
    min_run: int = 8,
) -> list[str]:
    """Descriptions of key material found in the payload (empty list: clean)."""
    blobs = {name: np.ascontiguousarray(a).tobytes() for name, a in arrays.items()}
    blobs.update({f"text[{i}]": s.encode() for i, s in enumerate(strings)})
    findings = [
        f"{what} in {name}"
        for what, pattern in _byte_patterns(secret, ring)
        for name, blob in blobs.items()
        if pattern in blob
    ]
    if ring is not None:
        values = _key_values(ring)
        for name, arr in arrays.items():
            if not np.issubdtype(arr.dtype, np.floating) or arr.size < min_run:
                continue
            needed = _row_length(ring) if arr.dtype == np.float16 else min_run
            run = _longest_run(np.isin(arr.ravel(), values.astype(arr.dtype)))
            if run >= needed:
                findings.append(f"a run of {run} key values in {name}")
    return findings
