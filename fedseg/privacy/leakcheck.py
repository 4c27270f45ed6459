"""Find key material in an outgoing payload before it leaves the hospital.

Two checks, both cheap enough to run on every reply:
- byte patterns: the raw secret and each HKDF output, as bytes or hex, in any array or text;
  each permutation as int32/int64 bytes;
- key vectors: every row and column of P Q and of Q, and the bias, cast to the dtype of each
  float array, looked for as a contiguous run of values. Candidate windows are those whose first
  three values match the first three of some key vector bit for bit; identical windows (flat
  regions give many) are compared once.
KNT parameters are covered too: its HKDF outputs (for up to ``knt.MAX_LAYERS`` layers) and every
row and column of its mixings, its biases, amplitudes, slopes and shifts. They depend only on
the secret and the channel count, so the guard derives them itself whichever transform is on.

Near-copies too (issue 24's audit slipped six past the exact checks): the secret in base64,
base32, upper-case hex or as a list of numbers, in text or in an integer or float array; and any
run of numbers, in an array or a text, whose correlation with a key vector is at least
``NEAR_COPY_CORRELATION`` (a row plus noise, -Q, 2Q, Q as int8 or float16, a shifted bias, a
column). The correlation check reads every array up to ``NEAR_COPY_MAX_SIZE`` values and every
text; the protocol's bulk payloads (latents, gradients, blinded sums) get the exact checks only,
since a keyed latent is a key-mixed vector by design (a zero latent keys to the bias itself).
"""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Iterable

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from fedseg.privacy.keys import ROLES, KeyRing, derive_bytes
from fedseg.privacy.knt_keys import MAX_LAYERS, KntKeyRing, knt_label

INT_TYPES = (np.int32, np.int64)
NEAR_COPY_CORRELATION = 0.9995  # 0.995 flagged honest UMN weights and latents in CI
NEAR_COPY_MAX_SIZE = 4096
INDEXED_BYTES = 4096  # payloads from this size are searched through _PatternIndex
# The protocol's bulk payloads: Flower records (latents, gradients, mapped latents, blinded
# sums) and the segmentation service's per-scale latents (image0, mask2, ...).
BULK_FIELDS = re.compile(r"^(latents|grad|mapped|blinded)\.|^(image|mask)\d+$")
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?")


def _secret_encodings(secret: bytes) -> list[tuple[str, bytes]]:
    """The secret as it might be written by mistake: text encodings and number lists."""
    out = [
        ("secret (HEX)", secret.hex().upper().encode()),
        ("secret (base32)", base64.b32encode(secret).rstrip(b"=")),
    ]
    for name, encoded in (
        ("base64", base64.b64encode(secret)),
        ("base64url", base64.urlsafe_b64encode(secret)),
    ):
        out.append((f"secret ({name})", encoded.rstrip(b"=")))
    numbers = list(secret)
    out += [
        ("secret (JSON list)", json.dumps(numbers)[1:-1].encode()),
        ("secret (number list)", ",".join(map(str, numbers)).encode()),
    ]
    as_uint8 = np.frombuffer(secret, dtype=np.uint8)
    for dtype in (np.int16, np.int32, np.int64, np.float32, np.float64):
        out.append((f"secret as {np.dtype(dtype)}", as_uint8.astype(dtype).tobytes()))
    return out


def _byte_patterns(secret: bytes, ring: KeyRing | None) -> list[tuple[str, bytes]]:
    patterns = [("secret", secret), ("secret (hex)", secret.hex().encode())]
    patterns += _secret_encodings(secret)
    for role, keys in ring.keys.items() if ring else []:
        for s, key in enumerate(keys):
            label = f"klt/{role}/scale{s}"
            seed = derive_bytes(secret, label)
            patterns += [(f"{label} seed", seed), (f"{label} seed (hex)", seed.hex().encode())]
            for dtype in INT_TYPES:
                perm = key.permutation.astype(dtype).tobytes()
                patterns.append((f"{label} permutation as {np.dtype(dtype)}", perm))
    scales = len(ring.keys[ROLES[0]]) if ring else 0
    for role in ROLES:
        for s in range(scales):
            for layer in range(MAX_LAYERS + 1):
                label = knt_label(role, s, layer)
                seed = derive_bytes(secret, label)
                patterns += [(f"{label} seed", seed), (f"{label} seed (hex)", seed.hex().encode())]
    return patterns


def _key_vectors(secret: bytes, ring: KeyRing) -> list[np.ndarray]:
    vectors = []
    for keys in ring.keys.values():
        for key in keys:
            for matrix in (key.mixing, key.rotation):
                vectors += list(matrix) + list(matrix.T)
            vectors.append(key.bias)
    channels, scales = ring.keys[ROLES[0]][0].mixing.shape[0], len(ring.keys[ROLES[0]])
    knt = KntKeyRing.from_secret(secret, channels, scales)
    # The last layer's amplitudes are zeros (no nonlinearity): not secret, and would match any
    # flat region.
    return vectors + [v for v in knt.vectors() if np.any(v)]


# Leading entries of a window matched against the key vectors' entries there before the exact
# comparison: each check keeps a superset of the true matches; on latents three leave a few dozen.
FILTER_POSITIONS = 3


class _VectorTable:
    """The key vectors cast to one float dtype, with the filters for their leading entries:
    bit patterns (float comparisons would be slow for float16 in numpy) in a lookup table for
    16-bit values, else in a small sorted array."""

    def __init__(self, vectors: list[np.ndarray], dtype: np.dtype) -> None:
        cast = np.stack(vectors).astype(dtype)
        self.length = cast.shape[1]
        self.wanted = {row.tobytes() for row in cast}
        self.unsigned = np.dtype(f"u{dtype.itemsize}")
        cast_bits = cast.view(self.unsigned)
        self.filters = []
        for pos in range(min(FILTER_POSITIONS, self.length)):
            values = np.unique(cast_bits[:, pos])
            if dtype.itemsize == 2:
                lookup = np.zeros(1 << 16, dtype=bool)
                lookup[values] = True
                self.filters.append(lookup)
            else:
                self.filters.append(values)

    @staticmethod
    def _matches(bits: np.ndarray, table: np.ndarray) -> np.ndarray:
        if table.dtype == bool:
            return table[bits]
        at = np.minimum(np.searchsorted(table, bits), table.size - 1)
        return table[at] == bits

    def found_in(self, flat: np.ndarray) -> bool:
        if flat.size < self.length:
            return False
        bits = np.ascontiguousarray(flat).view(self.unsigned)
        count = flat.size - self.length + 1
        candidate = np.ones(count, dtype=bool)
        for pos, table in enumerate(self.filters):
            candidate &= self._matches(bits[pos : pos + count], table)
            if not candidate.any():
                return False
        windows = sliding_window_view(flat, self.length)[np.flatnonzero(candidate)]
        return any(w.tobytes() in self.wanted for w in np.unique(windows, axis=0))


class _PatternIndex:
    """Finds which byte patterns occur in a large payload in one pass over it, where the plain
    search costs one pass per pattern (145 of them: about 16 ms for a 1.4 MB batch of latents).

    The invariant: an occurrence of a pattern of at least ``2 * BLOCK - 1`` bytes covers a whole
    ``BLOCK``-byte block at a multiple of ``BLOCK`` in the payload, and that block is one of
    the pattern's own ``BLOCK``-byte substrings at one of ``BLOCK`` shifts. So the payload's
    aligned blocks are looked up (a 16-bit table first, then the exact values), and each hit
    is checked against the whole pattern there. A payload with many hits (flat regions can
    repeat a block that a pattern holds: an int64 permutation holds zero blocks) falls back to
    the plain search: the answer is exact either way."""

    BLOCK = 8
    MAX_HITS = 256

    def __init__(self, patterns: list[bytes]) -> None:
        self.patterns = patterns
        where: dict[int, list[tuple[int, int]]] = {}
        for index, pattern in enumerate(patterns):
            if len(pattern) < 2 * self.BLOCK - 1:
                raise ValueError("a byte pattern shorter than two blocks is not indexed")
            for shift in range(self.BLOCK):
                block = pattern[shift : shift + self.BLOCK]
                where.setdefault(int.from_bytes(block, "little"), []).append((index, shift))
        self.where = where
        self.values = np.array(sorted(where), dtype=np.uint64)
        self.low = np.zeros(1 << 16, dtype=bool)
        self.low[(self.values & np.uint64(0xFFFF)).astype(np.int64)] = True

    def found(self, blob: bytes) -> set[int] | None:
        """Indices of the patterns in ``blob``; None where the hits are too many to check."""
        blocks = np.frombuffer(blob, dtype="<u8", count=len(blob) // self.BLOCK)
        at = np.flatnonzero(self.low[(blocks & np.uint64(0xFFFF)).astype(np.int64)])
        if at.size:
            at = at[np.isin(blocks[at], self.values)]
        if at.size > self.MAX_HITS:
            return None
        found = set()
        for k in at.tolist():
            for index, shift in self.where[int(blocks[k])]:
                start = k * self.BLOCK - shift
                pattern = self.patterns[index]
                if start >= 0 and blob[start : start + len(pattern)] == pattern:
                    found.add(index)
        return found


class KeyMaterial:
    """Everything the guard looks for, derived once: a site checks every reply it sends, and
    deriving the patterns and tables again each time was most of the check's cost."""

    def __init__(self, secret: bytes, ring: KeyRing | None) -> None:
        self.patterns = _byte_patterns(secret, ring)
        self._index = _PatternIndex([pattern for _, pattern in self.patterns])
        self.vectors = _key_vectors(secret, ring) if ring is not None else []
        self._tables: dict[np.dtype, _VectorTable] = {}
        # Centred unit key vectors by length, for the correlation check.
        self._units: dict[int, np.ndarray] = {}
        for length in {len(v) for v in self.vectors}:
            rows = [_unit(v) for v in self.vectors if len(v) == length]
            kept = [r for r in rows if r is not None]
            if kept:
                self._units[length] = np.stack(kept)

    def _near_copy(self, values: np.ndarray) -> bool:
        """Whether any run of ``values`` (in memory order, or along any axis of a key
        vector's length) correlates with a key vector at ``NEAR_COPY_CORRELATION`` or more."""
        values = np.asarray(values, dtype=np.float64)
        for length, units in self._units.items():
            runs = []
            flat = values.ravel()
            if flat.size >= length:
                runs.append(sliding_window_view(flat, length))
            for axis, size in enumerate(values.shape):
                if values.ndim >= 2 and size == length:
                    runs.append(np.moveaxis(values, axis, -1).reshape(-1, length))
            if not runs:
                continue
            windows = np.concatenate(runs)
            windows = windows - windows.mean(axis=1, keepdims=True)
            norms = np.linalg.norm(windows, axis=1, keepdims=True)
            usable = norms[:, 0] > 1e-12
            if not usable.any():
                continue
            corr = (windows[usable] / norms[usable]) @ units.T
            if np.abs(corr).max() >= NEAR_COPY_CORRELATION:
                return True
        return False

    def __repr__(self) -> str:
        return "KeyMaterial(<secret>)"

    def _contains_vector(self, flat: np.ndarray) -> bool:
        if flat.dtype.itemsize not in (2, 4, 8):
            # long double: padding bytes make its bytes unreliable; the key vectors are float64
            # values, so they survive the conversion exactly (a near value may match: safe side)
            flat = flat.astype(np.float64)
        if flat.dtype not in self._tables:
            self._tables[flat.dtype] = _VectorTable(self.vectors, flat.dtype)
        return self._tables[flat.dtype].found_in(flat)

    def find(
        self, arrays: dict[str, np.ndarray], strings: Iterable[str], near_copies: bool = True
    ) -> list[str]:
        """Descriptions of key material found in the payload (empty list: clean).

        ``near_copies=False`` keeps the exact checks only: for state the server derived from
        keyed latents (a UMN's output offset is the mean of a site's keyed mask latents, which
        is close to the key's bias whenever the plain latents average near zero)."""
        blobs = {name: np.ascontiguousarray(a).tobytes() for name, a in arrays.items()}
        blobs.update({f"text[{i}]": s.encode() for i, s in enumerate(strings)})
        findings = []
        for name, blob in blobs.items():
            found = self._index.found(blob) if len(blob) >= INDEXED_BYTES else None
            if found is None:
                found = {i for i, (_, pattern) in enumerate(self.patterns) if pattern in blob}
            findings += [f"{self.patterns[i][0]} in {name}" for i in sorted(found)]
        if self.vectors:
            for name, arr in arrays.items():
                if np.issubdtype(arr.dtype, np.floating) and self._contains_vector(arr.ravel()):
                    findings.append(f"a key row, column or parameter vector in {name}")
                elif (
                    near_copies
                    and arr.dtype.kind in "iuf"
                    and arr.size <= NEAR_COPY_MAX_SIZE
                    and not BULK_FIELDS.match(name)
                    and self._near_copy(arr)
                ):
                    findings.append(f"a near-copy of a key vector in {name}")
            for i, text in enumerate(strings if near_copies else []):
                numbers = [float(n) for n in _NUMBER.findall(text)]
                if numbers and self._near_copy(np.asarray(numbers)):
                    findings.append(f"a near-copy of a key vector in text[{i}]")
        return findings


def _unit(vector: np.ndarray) -> np.ndarray | None:
    centred = np.asarray(vector, dtype=np.float64) - np.mean(vector)
    norm = np.linalg.norm(centred)
    return centred / norm if norm > 1e-12 else None


def find_key_material(
    arrays: dict[str, np.ndarray],
    strings: Iterable[str],
    secret: bytes,
    ring: KeyRing | None,
    near_copies: bool = True,
) -> list[str]:
    """Descriptions of key material found in the payload (empty list: clean)."""
    return KeyMaterial(secret, ring).find(arrays, strings, near_copies)
