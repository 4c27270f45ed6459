"""Encrypted queries: the server maps a hospital's keyed latents under CKKS without seeing them.

The hospital holds the CKKS secret key (:class:`HospitalCkks`, saved 0600). Once, at
registration, it sends a public bundle: the CKKS parameters, a TenSEAL context made public
(public and relinearisation keys, no secret key) and one Galois key (the one rotation step
the evaluation uses). A query carries the ciphertexts of one or more images' keyed latents;
the server (:class:`ServerCkks`, :class:`EncryptedMapper`) evaluates the HE mapping network
(``fedseg/models/umn_he.py``) on them with the public keys only and returns ciphertexts of the
keyed mask latents, which only the hospital can decrypt.

Why SEAL through TenSEAL's ``sealapi`` for the arithmetic, not ``CKKSVector``: a vector has no
rotation, encodes its plaintext operand anew at every product and rescales after each; the
mapping here pre-encodes every weight vector once per model, rescales once per sum and rotates
by one block with a single Galois key. TenSEAL still makes and serialises the keys.

Packing (:class:`Packing`): per image, the three scales' positions of one channel fill a block
of ``block`` slots (the next power of two, 512 at 128 px: 256 + 64 + 16 positions), and a
ciphertext holds ``groups = slots / block`` channels side by side (8 at N = 8192), so 32
channels are 4 ciphertexts. A 1x1 layer is then a block-diagonal product: for each rotation by
``r`` blocks, each output ciphertext takes a plaintext-weighted sum of the input ciphertexts
(``groups - 1`` rotations of each output ciphertext's partial sums, Horner-style, before the
rescale: a key switch's noise is then negligible).

Depth: a plaintext product per layer and a square per hidden layer, 3 for the default network;
:class:`CkksParams` checks the coefficient modulus against the Homomorphic Encryption
Standard's 128-bit table and against the depth, and SEAL checks it again (``tc128``).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from fedseg.atomic import write_atomic
from fedseg.models.umn_he import FoldedLayer

# The HE Standard (homomorphicencryption.org, 2018), table 1, ternary secrets, classical
# 128-bit security: the largest total coefficient-modulus bits for each ring dimension.
HE_STANDARD_128 = {1024: 27, 2048: 54, 4096: 109, 8192: 218, 16384: 438, 32768: 881}
MAX_PRIME_BITS = 60  # SEAL's limit per modulus prime
FORMAT = "fedseg-ckks/1"
HEADER = "ckks.header"  # uint8 JSON
CONTEXT = "ckks.context"  # uint8: TenSEAL context, public
GALOIS = "ckks.galois"  # uint8: SEAL Galois keys (one step)
CIPHER = "ckks.data"  # uint8: ciphertexts, back to back
OFFSETS = "ckks.offsets"  # int64: where each ciphertext starts (and the end)
MAX_BUNDLE_BYTES = 64 * 2**20
MAX_HEADER_BYTES = 64 * 2**10


class CkksError(ValueError):
    """A CKKS configuration, key bundle or ciphertext that cannot be used, and why."""


@dataclass(frozen=True)
class CkksParams:
    """CKKS parameters. The default: ring 2^13 (4096 slots), data primes 50 + 3 x 35 bits
    and a 50-bit special prime (205 bits <= 218: 128-bit secure), scale 2^35, depth 3."""

    poly_modulus_degree: int = 8192
    coeff_mod_bit_sizes: tuple[int, ...] = (50, 35, 35, 35, 50)
    scale_bits: int = 35

    @property
    def depth(self) -> int:
        """Rescalings available: every prime but the first data prime and the special one."""
        return len(self.coeff_mod_bit_sizes) - 2

    @property
    def slots(self) -> int:
        return self.poly_modulus_degree // 2

    @property
    def total_bits(self) -> int:
        return sum(self.coeff_mod_bit_sizes)

    def table_line(self) -> str:
        n = self.poly_modulus_degree
        return (
            f"N = {n}: at most {HE_STANDARD_128.get(n, '?')} bits of coefficient modulus for "
            f"128-bit security (HE Standard, table 1); these use {self.total_bits}"
        )

    def check(self, depth: int | None = None) -> CkksParams:
        """Refuse parameters that are not 128-bit secure by the HE Standard's table, that SEAL
        cannot use, or that have too few levels for ``depth`` (no bootstrapping here)."""
        n, bits = self.poly_modulus_degree, list(self.coeff_mod_bit_sizes)
        if n not in HE_STANDARD_128:
            raise CkksError(
                f"CKKS poly_modulus_degree {n}: must be one of {sorted(HE_STANDARD_128)}"
            )
        if len(bits) < 3:
            raise CkksError("CKKS coeff_mod_bit_sizes: need a first prime, >= 1 level, a special")
        if any(b < 20 or b > MAX_PRIME_BITS for b in bits):
            raise CkksError(f"CKKS coeff_mod_bit_sizes {bits}: each prime 20..60 bits")
        if sum(bits) > HE_STANDARD_128[n]:
            raise CkksError(
                f"CKKS parameters not 128-bit secure: coefficient modulus of {sum(bits)} bits "
                f"exceeds the HE Standard's {HE_STANDARD_128[n]} for N = {n}; use fewer or "
                f"smaller primes, or N = {2 * n}"
            )
        if any(b != self.scale_bits for b in bits[1:-1]):
            raise CkksError(
                f"CKKS coeff_mod_bit_sizes {bits}: the middle primes must equal the scale "
                f"({self.scale_bits} bits), or each rescale changes the scale"
            )
        if bits[0] < self.scale_bits + 10 or bits[-1] < max(bits[:-1]):
            raise CkksError(
                f"CKKS coeff_mod_bit_sizes {bits}: the first prime needs >= 10 bits above the "
                "scale (the result's integer part), the special prime >= every other"
            )
        if depth is not None and self.depth < depth:
            raise CkksError(
                f"CKKS parameters give multiplicative depth {self.depth}; the network needs "
                f"{depth} (add {depth - self.depth} prime(s) of {self.scale_bits} bits)"
            )
        return self

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "coeff_mod_bit_sizes": list(self.coeff_mod_bit_sizes)}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> CkksParams:
        try:
            return cls(
                int(values["poly_modulus_degree"]),
                tuple(int(b) for b in values["coeff_mod_bit_sizes"]),
                int(values["scale_bits"]),
            )
        except (KeyError, TypeError, ValueError) as err:
            raise CkksError(f"CKKS parameters unreadable: {err}") from None


def params_for_depth(depth: int) -> CkksParams:
    """The smallest ring whose 128-bit bound fits ``depth`` levels at a 35-bit scale (40 bits
    from ring 2^14: the headroom is there)."""
    for n in sorted(HE_STANDARD_128):
        scale = 35 if n <= 8192 else 40
        edge = scale + 15
        params = CkksParams(n, (edge, *([scale] * depth), edge), scale)
        if params.total_bits <= HE_STANDARD_128[n]:
            return params.check(depth)
    raise CkksError(f"no ring in the HE Standard's table fits depth {depth} at 128 bits")


@dataclass(frozen=True)
class Packing:
    """Where each latent value sits in the slots (see the module docstring)."""

    shapes: tuple[tuple[int, int, int], ...]  # (C, h, w) per scale
    slots: int

    @property
    def channels(self) -> int:
        return self.shapes[0][0]

    @property
    def sizes(self) -> list[int]:
        return [h * w for _, h, w in self.shapes]

    @property
    def positions(self) -> int:
        return sum(self.sizes)

    @property
    def block(self) -> int:
        return 1 << max(0, math.ceil(math.log2(self.positions)))

    @property
    def groups(self) -> int:
        if self.block > self.slots:
            raise CkksError(
                f"{self.positions} latent positions per channel do not fit {self.slots} slots: "
                "use a larger ring (poly_modulus_degree) or smaller images"
            )
        return self.slots // self.block

    def cts(self, channels: int) -> int:
        return -(-channels // self.groups)

    @property
    def rotation_step(self) -> int:
        return self.block

    def pack(self, latents: Sequence[np.ndarray]) -> np.ndarray:
        """One image's (C, h, w) per scale -> (ciphertexts, slots) float64."""
        c, g, b = self.channels, self.groups, self.block
        rows = np.zeros((self.cts(c) * g, b))
        rows[:c, : self.positions] = np.concatenate(
            [np.asarray(z, dtype=np.float64).reshape(c, -1) for z in latents], axis=1
        )
        return rows.reshape(self.cts(c), g * b)

    def unpack(self, matrix: np.ndarray, channels: int) -> list[np.ndarray]:
        """(ciphertexts, slots) -> (C, h, w) per scale."""
        rows = matrix.reshape(-1, self.block)[:channels, : self.positions]
        out, start = [], 0
        for (_, h, w), size in zip(self.shapes, self.sizes, strict=True):
            out.append(rows[:, start : start + size].reshape(channels, h, w))
            start += size
        return out

    def diagonals(self, weights: Sequence[np.ndarray], rotate_inputs: bool) -> np.ndarray:
        """Plaintext vectors of a 1x1 layer (per scale ``(out, in)`` weights) for rotations by
        whole blocks: ``[b, a, r]`` multiplies input ciphertext ``a`` (rotated by ``r`` blocks
        first when ``rotate_inputs``) towards output ciphertext ``b`` (whose partial sum for
        ``r`` is rotated by ``r`` blocks afterwards otherwise)."""
        g = self.groups
        n_out, n_in = weights[0].shape
        cb, ca = self.cts(n_out), self.cts(n_in)
        pad = np.zeros((len(weights), cb * g, ca * g))
        for s, w in enumerate(weights):
            pad[s, :n_out, :n_in] = w
        b, a, r, slot = np.meshgrid(
            np.arange(cb), np.arange(ca), np.arange(g), np.arange(g), indexing="ij"
        )
        if rotate_inputs:  # block `slot` of rot(X_a, r) holds input channel a*g + (slot+r)%g
            out_ch, in_ch = b * g + slot, a * g + (slot + r) % g
        else:  # block `slot` of the partial sum lands in block (slot - r) of the output
            out_ch, in_ch = b * g + (slot - r) % g, a * g + slot
        values = pad[:, out_ch, in_ch]  # (scales, cb, ca, g, g)
        block = np.zeros((cb, ca, g, g, self.block))
        start = 0
        for s, size in enumerate(self.sizes):
            block[..., start : start + size] = values[s][..., None]
            start += size
        return block.reshape(cb, ca, g, g * self.block)


def _pack_channels(packing: Packing, biases: Sequence[np.ndarray]) -> np.ndarray:
    n = len(biases[0])
    rows = np.zeros((packing.cts(n) * packing.groups, packing.block))
    rows[:n, : packing.positions] = np.concatenate(
        [
            np.repeat(b[:, None], size, axis=1)
            for b, size in zip(biases, packing.sizes, strict=True)
        ],
        axis=1,
    )
    return rows.reshape(packing.cts(n), packing.slots)


# --- SEAL objects through files in memory (sealapi serialises only to a path) -------------


@contextmanager
def _memfile(data: bytes = b"") -> Iterator[tuple[int, str]]:
    fd = os.memfd_create("fedseg-ckks")
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        yield fd, f"/proc/self/fd/{fd}"
    finally:
        os.close(fd)


def _save(obj: Any) -> bytes:
    with _memfile() as (fd, path):
        obj.save(path)
        size, parts, done = os.fstat(fd).st_size, [], 0
        while done < size:
            parts.append(os.pread(fd, size - done, done))
            done += len(parts[-1])
        return b"".join(parts)


def _load(obj: Any, context: Any, data: bytes, what: str) -> Any:
    with _memfile(data) as (_, path):
        try:
            obj.load(context, path)
        except (RuntimeError, ValueError) as err:
            raise CkksError(f"{what} does not load under this CKKS context: {err}") from None
    return obj


def _seal() -> Any:
    try:
        import tenseal.sealapi as sealapi
    except ImportError as err:  # pragma: no cover - a declared dependency
        raise CkksError("privacy.query = 'ckks' needs TenSEAL (pip install tenseal)") from err
    return sealapi


def _tenseal() -> Any:
    import tenseal

    _seal()  # registers SEAL's types (Modulus, ...) that the context's accessors return
    return tenseal


def query_packing(shapes: Sequence[Sequence[int]], params: CkksParams) -> Packing:
    """The packing both sides use for latents of these (C, h, w) shapes."""
    return Packing(tuple((int(c), int(h), int(w)) for c, h, w in shapes), params.slots)


def concat(payloads: Sequence[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Several queries or replies of one hospital as one (their images in order)."""
    headers = [_header(p) for p in payloads]
    if not headers:
        raise CkksError("nothing to concatenate")
    blobs: list[bytes] = []
    for p in payloads:
        data, offsets = p[CIPHER].tobytes(), p[OFFSETS]
        blobs += [data[int(a) : int(b)] for a, b in zip(offsets[:-1], offsets[1:], strict=True)]
    header = {**headers[0], "items": sum(int(h["items"]) for h in headers)}
    return {HEADER: _json_bytes(header), **_blobs(blobs)}


def galois_element(step: int, n: int) -> int:
    """SEAL's Galois element for a left rotation by ``step`` slots in ring dimension ``n``."""
    return pow(3, step % (n // 2), 2 * n)


class _Chain:
    """The modulus chain: parms_id and the prime a rescale drops at each level."""

    def __init__(self, context: Any) -> None:
        self.parms_ids, self.drops = [], []
        data = context.first_context_data()
        while data is not None:
            primes = [q.value() for q in data.parms().coeff_modulus()]
            self.parms_ids.append(data.parms_id())
            self.drops.append(float(primes[-1]))
            data = data.next_context_data()


def _arrays_bytes(arrays: dict[str, np.ndarray], name: str, limit: int) -> bytes:
    if name not in arrays:
        raise CkksError(f"missing field {name!r}")
    arr = arrays[name]
    if arr.dtype != np.uint8 or arr.ndim != 1:
        raise CkksError(f"field {name!r}: {arr.dtype} {arr.shape}, expected 1-D uint8")
    if arr.nbytes > limit:
        raise CkksError(f"field {name!r}: {arr.nbytes} bytes exceeds the limit of {limit}")
    return arr.tobytes()


def _header(arrays: dict[str, np.ndarray]) -> dict[str, Any]:
    try:
        header = json.loads(_arrays_bytes(arrays, HEADER, MAX_HEADER_BYTES))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CkksError(f"unreadable CKKS header: {err}") from None
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise CkksError(f"not a {FORMAT} payload")
    return header


def _json_bytes(values: dict[str, Any]) -> np.ndarray:
    return np.frombuffer(json.dumps(values, sort_keys=True).encode(), dtype=np.uint8).copy()


def _blobs(blobs: list[bytes]) -> dict[str, np.ndarray]:
    offsets = np.cumsum([0, *map(len, blobs)]).astype(np.int64)
    data = np.frombuffer(b"".join(blobs), dtype=np.uint8).copy()
    return {CIPHER: data, OFFSETS: offsets}


def max_ciphertext_bytes(params: CkksParams) -> int:
    """An upper bound on one serialised fresh ciphertext (two polynomials, every data prime,
    uncompressed, plus SEAL's headers): what a query's size is checked against before SEAL
    reads it."""
    return 2 * params.poly_modulus_degree * (len(params.coeff_mod_bit_sizes) - 1) * 8 + 4096


def payload_size(arrays: dict[str, np.ndarray]) -> int:
    """Bytes of a CKKS payload (what crosses the wire)."""
    return int(sum(a.nbytes for a in arrays.values()))


def _key_id(secret_key_bytes: bytes) -> str:
    """A public name for a secret key (SHA-256 over it, domain-separated): lets the server
    refuse ciphertexts under another key than the one a hospital registered."""
    return hashlib.sha256(b"fedseg/ckks-key-id\x00" + secret_key_bytes).hexdigest()[:32]


# --- the hospital -------------------------------------------------------------------------


class HospitalCkks:
    """The hospital's CKKS keys: the secret key never leaves this object except to its 0600
    file."""

    def __init__(self, context: Any, params: CkksParams) -> None:
        if not context.has_secret_key():
            raise CkksError("a hospital's CKKS context must hold its secret key")
        self.params = params
        self.context = context
        sealapi = _seal()
        self._seal = context.seal_context().data
        self._secret = context.secret_key().data
        self.key_id = _key_id(_save(self._secret))
        self._encoder = sealapi.CKKSEncoder(self._seal)
        self._encryptor = sealapi.Encryptor(self._seal, self._secret)
        self._decryptor = sealapi.Decryptor(self._seal, self._secret)
        self._chain = _Chain(self._seal)

    @classmethod
    def create(cls, params: CkksParams | None = None, depth: int = 3) -> HospitalCkks:
        params = (params or params_for_depth(depth)).check(depth)
        ts = _tenseal()
        context = ts.context(
            ts.SCHEME_TYPE.CKKS,
            poly_modulus_degree=params.poly_modulus_degree,
            coeff_mod_bit_sizes=list(params.coeff_mod_bit_sizes),
        )
        context.global_scale = 2.0**params.scale_bits
        return cls(context, params)

    def save(self, path: str | Path, replace: bool = True) -> Path:
        """The secret context (secret key included): 0600, written whole or not at all."""
        blob = self.context.serialize(save_secret_key=True)
        params = json.dumps(self.params.to_dict()).encode()
        data = len(params).to_bytes(4, "little") + params + blob
        return write_atomic(path, lambda handle: handle.write(data), mode=0o600, replace=replace)

    @classmethod
    def load(cls, path: str | Path) -> HospitalCkks:
        data = Path(path).read_bytes()
        n = int.from_bytes(data[:4], "little")
        params = CkksParams.from_dict(json.loads(data[4 : 4 + n]))
        context = _tenseal().context_from(data[4 + n :])
        context.global_scale = 2.0**params.scale_bits
        return cls(context, params.check())

    @classmethod
    def load_or_create(cls, path: str | Path, depth: int = 3) -> HospitalCkks:
        """A hospital's keys, made on first use (its own disk, 0600)."""
        path = Path(path)
        if path.is_file():
            keys = cls.load(path)
            keys.params.check(depth)
            return keys
        keys = cls.create(depth=depth)
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            keys.save(path, replace=False)
        except FileExistsError:  # another process of this hospital made them first: theirs
            return cls.load(path)
        return keys

    def public_bundle(self, packing: Packing) -> dict[str, np.ndarray]:
        """What the server gets once: parameters, public + relinearisation keys (a TenSEAL
        context made public) and the one Galois key the packing's rotations use."""
        public = self.context.copy()
        public.make_context_public(generate_galois_keys=False, generate_relin_keys=True)
        if public.has_secret_key():  # pragma: no cover - TenSEAL's contract
            raise CkksError("refusing to export a CKKS context that still holds its secret key")
        sealapi = _seal()
        galois = sealapi.GaloisKeys()
        keygen = sealapi.KeyGenerator(self._seal, self._secret)
        step = packing.rotation_step % packing.slots
        if step:
            keygen.create_galois_keys(
                [galois_element(step, self.params.poly_modulus_degree)], galois
            )
        header = {
            "format": FORMAT,
            "kind": "public-context",
            "params": self.params.to_dict(),
            "key_id": self.key_id,
            "rotation_step": step,
        }
        return {
            HEADER: _json_bytes(header),
            CONTEXT: np.frombuffer(public.serialize(save_galois_keys=False), np.uint8).copy(),
            GALOIS: np.frombuffer(_save(galois) if step else b"", np.uint8).copy(),
        }

    def encrypt(self, arrays: dict[str, np.ndarray], packing: Packing) -> dict[str, np.ndarray]:
        """Keyed image latents as the wire has them (``image<s>``: (N, C, h, w) fp16) ->
        a query: the ciphertexts of every image, in order. Symmetric encryption (the
        hospital holds the secret key): SEAL sends the second polynomial as a seed, half the
        bytes."""
        latents = [np.asarray(arrays[f"image{s}"]) for s in range(len(packing.shapes))]
        items = latents[0].shape[0]
        blobs = []
        scale = 2.0**self.params.scale_bits
        plain = _seal().Plaintext()
        for i in range(items):
            for row in packing.pack([z[i] for z in latents]):
                self._encoder.encode(row.tolist(), scale, plain)
                blobs.append(_save(self._encryptor.encrypt_symmetric(plain)))
        header = {
            "format": FORMAT,
            "kind": "query",
            "key_id": self.key_id,
            "items": items,
            "ciphertexts": packing.cts(packing.channels),
            "shapes": [list(s) for s in packing.shapes],
        }
        return {HEADER: _json_bytes(header), **_blobs(blobs)}

    def decrypt(self, arrays: dict[str, np.ndarray], packing: Packing) -> dict[str, np.ndarray]:
        """The server's reply -> keyed mask latents as ``segment_mapped`` takes them
        (``mask<s>``: (N, C, h, w) fp16)."""
        header = _header(arrays)
        per_item = packing.cts(packing.channels)
        blobs = _split(arrays, header, per_item, max_ciphertext_bytes(self.params), self.key_id)
        sealapi = _seal()
        plain, out = sealapi.Plaintext(), []
        for i in range(int(header["items"])):
            rows = []
            for blob in blobs[i * per_item : (i + 1) * per_item]:
                ct = _load(sealapi.Ciphertext(), self._seal, blob, "a mapped ciphertext")
                self._decryptor.decrypt(ct, plain)
                rows.append(np.asarray(self._encoder.decode_double(plain)))
            out.append(packing.unpack(np.stack(rows), packing.channels))
        result = {}
        for s in range(len(packing.shapes)):
            z = np.stack([item[s] for item in out])
            if not np.isfinite(z).all() or np.abs(z).max(initial=0) > np.finfo(np.float16).max:
                raise CkksError("decrypted latents out of range: wrong key or corrupted reply")
            result[f"mask{s}"] = z.astype(np.float16)
        return result


def _split(
    arrays: dict[str, np.ndarray],
    header: dict[str, Any],
    per_item: int,
    max_ct: int,
    key_id: str,
    max_items: int | None = None,
) -> list[bytes]:
    """The ciphertext blobs of a query or reply, checked (count, sizes, key) before any is
    deserialised."""
    if header.get("key_id") != key_id:
        raise CkksError(
            "ciphertexts under another CKKS key than this hospital registered "
            f"(key id {str(header.get('key_id'))[:12]}..., registered {key_id[:12]}...)"
        )
    try:
        items, count = int(header["items"]), int(header["ciphertexts"])
    except (KeyError, TypeError, ValueError):
        raise CkksError("CKKS header without items/ciphertexts") from None
    if count != per_item:
        raise CkksError(f"{count} ciphertexts per image; this packing has {per_item}")
    if items < 1 or (max_items is not None and items > max_items):
        raise CkksError(f"{items} images in one CKKS payload; the limit is {max_items}")
    if OFFSETS not in arrays:
        raise CkksError(f"missing field {OFFSETS!r}")
    offsets = arrays[OFFSETS]
    if offsets.dtype != np.int64 or offsets.shape != (items * per_item + 1,):
        raise CkksError(
            f"field {OFFSETS!r}: {offsets.dtype} {offsets.shape}, expected int64 "
            f"({items * per_item + 1},)"
        )
    data = _arrays_bytes(arrays, CIPHER, items * per_item * max_ct)
    sizes = np.diff(offsets)
    if offsets[0] != 0 or offsets[-1] != len(data) or (sizes <= 0).any():
        raise CkksError("ciphertext offsets do not match the data")
    if (sizes > max_ct).any():
        raise CkksError(f"a ciphertext of {int(sizes.max())} bytes exceeds the limit of {max_ct}")
    return [data[int(a) : int(b)] for a, b in zip(offsets[:-1], offsets[1:], strict=True)]


# --- the server ---------------------------------------------------------------------------


@dataclass
class ServerCkks:
    """One hospital's public CKKS material, as the server holds it (no secret key)."""

    params: CkksParams
    key_id: str
    rotation_step: int
    context: Any  # TenSEAL context, public
    seal: Any
    galois: Any
    relin: Any
    chain: _Chain = field(repr=False)

    @classmethod
    def from_bundle(cls, arrays: dict[str, np.ndarray], depth: int) -> ServerCkks:
        """Check and load a public bundle: parameters (128-bit table, depth), a context with
        no secret key, the Galois key; refused with the reason otherwise."""
        total = payload_size(arrays)
        if total > MAX_BUNDLE_BYTES:
            raise CkksError(f"CKKS key bundle of {total} bytes exceeds {MAX_BUNDLE_BYTES}")
        unknown = sorted(set(arrays) - {HEADER, CONTEXT, GALOIS})
        if unknown:
            raise CkksError(f"unexpected field(s) in a CKKS key bundle: {unknown[:3]}")
        header = _header(arrays)
        if header.get("kind") != "public-context":
            raise CkksError("not a CKKS public-context bundle")
        params = CkksParams.from_dict(header.get("params", {})).check(depth)
        ts = _tenseal()
        try:
            context = ts.context_from(_arrays_bytes(arrays, CONTEXT, MAX_BUNDLE_BYTES))
        except ValueError as err:
            raise CkksError(f"unreadable CKKS context: {err}") from None
        if context.has_secret_key():
            raise CkksError("refusing a CKKS context that holds a secret key")
        if not context.has_relin_keys():
            raise CkksError("the CKKS context has no relinearisation keys")
        seal = context.seal_context().data
        _check_context_params(seal, params)
        step = int(header.get("rotation_step", 0))
        galois = _seal().GaloisKeys()
        blob = _arrays_bytes(arrays, GALOIS, MAX_BUNDLE_BYTES)
        if step:
            _load(galois, seal, blob, "the Galois keys")
            if not galois.has_key(galois_element(step, params.poly_modulus_degree)):
                raise CkksError(f"the Galois keys lack rotation step {step}")
        return cls(
            params,
            str(header.get("key_id", "")),
            step,
            context,
            seal,
            galois,
            context.relin_keys().data,
            _Chain(seal),
        )


def _check_context_params(seal: Any, params: CkksParams) -> None:
    data = seal.key_context_data()
    bits = [q.bit_count() for q in data.parms().coeff_modulus()]
    n = data.parms().poly_modulus_degree()
    if n != params.poly_modulus_degree or tuple(bits) != params.coeff_mod_bit_sizes:
        raise CkksError(
            f"the CKKS context (N = {n}, primes {bits}) does not match its declared parameters "
            f"(N = {params.poly_modulus_degree}, primes {list(params.coeff_mod_bit_sizes)})"
        )


@dataclass
class _Layer:
    rotate_inputs: bool
    plains: list[list[list[Any]]]  # [term][b][a*g + r] (None: an all-zero diagonal)
    bias: list[Any]  # per output ciphertext
    outputs: int
    target: float  # every product's scale: the working scale times the prime the rescale drops


class EncryptedMapper:
    """The HE mapping network of one site, compiled for one hospital's public keys: every
    weight vector encoded once, at the level and scale where it is used."""

    def __init__(self, keys: ServerCkks, scales: list[list[FoldedLayer]], packing: Packing):
        self.keys, self.packing = keys, packing
        depth = 2 * (len(scales[0]) - 1) + 1
        keys.params.check(depth)
        if packing.slots != keys.params.slots:
            raise CkksError(
                f"packing for {packing.slots} slots, parameters give {keys.params.slots}"
            )
        if packing.rotation_step % packing.slots != keys.rotation_step:
            raise CkksError(
                f"the hospital's Galois key rotates by {keys.rotation_step} slots; this "
                f"packing needs {packing.rotation_step}"
            )
        sealapi = _seal()
        self._ev = sealapi.Evaluator(keys.seal)
        self._encoder = sealapi.CKKSEncoder(keys.seal)
        self._scale = 2.0**keys.params.scale_bits
        chain = keys.chain
        self.layers: list[_Layer] = []
        level, in_scale = 0, self._scale
        for k in range(len(scales[0])):
            layers = [scale_layers[k] for scale_layers in scales]
            if k == 0:
                terms = [[lay.lin for lay in layers]]
                term_scales = [in_scale]
            else:  # square then rescale: h^2 one level down at scale^2 / q
                square_scale = self._scale * self._scale / chain.drops[level]
                level += 1
                terms = [[lay.quad for lay in layers], [lay.lin for lay in layers]]  # type: ignore[misc]
                term_scales = [square_scale, self._scale]
            target = self._scale * chain.drops[level]  # after the rescale: exactly the scale
            n_out, n_in = terms[0][0].shape
            cb, ca = packing.cts(n_out), packing.cts(n_in)
            g = packing.groups
            # Rotate the partial sums before their rescale (at scale^2, where a key switch's
            # noise is negligible), not the inputs: rotating the inputs saved a third of the
            # rotations at 128 px but its noise, amplified by a site basis of norm ~1e3 (a
            # fresh encoder's near-flat latent axes), cost 0.7% relative error.
            rotate_inputs = False
            plains = []
            for weights, ts_ in zip(terms, term_scales, strict=True):
                diags = packing.diagonals(weights, rotate_inputs)
                per_b = []
                for b in range(cb):
                    row = []
                    for a in range(ca):
                        for r in range(g):
                            vec = diags[b, a, r]
                            row.append(
                                self._encode(vec, chain.parms_ids[level], target / ts_)
                                if vec.any()
                                else None
                            )
                    per_b.append(row)
                plains.append(per_b)
            bias_rows = _pack_channels(packing, [lay.bias for lay in layers])
            bias = [self._encode(v, chain.parms_ids[level + 1], self._scale) for v in bias_rows]
            self.layers.append(_Layer(rotate_inputs, plains, bias, cb, target))
            level += 1
        self.depth = level
        self.out_channels = scales[0][-1].lin.shape[0]

    def _encode(self, vec: np.ndarray, parms_id: Any, scale: float) -> Any:
        plain = _seal().Plaintext()
        self._encoder.encode(vec.tolist(), parms_id, scale, plain)
        return plain

    def _rotate(self, ct: Any) -> Any:
        out = _seal().Ciphertext()
        self._ev.rotate_vector(ct, self.packing.rotation_step, self.keys.galois, out)
        return out

    def _mac(self, acc: Any, ct: Any, plain: Any, target: float) -> Any:
        product = _seal().Ciphertext()
        self._ev.multiply_plain(ct, plain, product)
        product.scale = target  # equal by construction; float rounding may differ by an ulp
        if acc is None:
            return product
        self._ev.add_inplace(acc, product)
        return acc

    def _layer(self, layer: _Layer, terms: list[list[Any]]) -> list[Any]:
        g = self.packing.groups
        target = layer.target
        outs = []
        if layer.rotate_inputs:
            rotated = []
            for cts in terms:
                per = []
                for ct in cts:
                    chain = [ct]
                    for _ in range(g - 1):
                        chain.append(self._rotate(chain[-1]))
                    per.append(chain)
                rotated.append(per)
            for b in range(layer.outputs):
                acc = None
                for t, per in enumerate(rotated):
                    for a, chain in enumerate(per):
                        for r in range(g):
                            plain = layer.plains[t][b][a * g + r]
                            if plain is not None:
                                acc = self._mac(acc, chain[r], plain, target)
                outs.append(self._finish(acc, layer.bias[b]))
        else:
            for b in range(layer.outputs):
                acc = None
                for r in reversed(range(g)):  # Horner: sum_r rot(acc_r, r blocks)
                    part = None
                    for t, cts in enumerate(terms):
                        for a, ct in enumerate(cts):
                            plain = layer.plains[t][b][a * g + r]
                            if plain is not None:
                                part = self._mac(part, ct, plain, target)
                    if acc is not None:
                        acc = self._rotate(acc)
                        part = acc if part is None else _add(self._ev, part, acc)
                    acc = part
                outs.append(self._finish(acc, layer.bias[b]))
        return outs

    def _finish(self, acc: Any, bias: Any) -> Any:
        if acc is None:
            raise CkksError("a layer's output does not depend on its input (all-zero weights)")
        self._ev.rescale_to_next_inplace(acc)
        acc.scale = self._scale
        self._ev.add_plain_inplace(acc, bias)
        return acc

    def map_cts(self, cts: list[Any]) -> list[Any]:
        """One image's ciphertexts -> the mapped ones (the folded network, encrypted)."""
        h = self._layer(self.layers[0], [cts])
        for layer in self.layers[1:]:
            squares = []
            for ct in h:
                sq = _seal().Ciphertext()
                self._ev.square(ct, sq)
                self._ev.relinearize_inplace(sq, self.keys.relin)
                self._ev.rescale_to_next_inplace(sq)
                squares.append(sq)
            for ct in h:
                self._ev.mod_switch_to_next_inplace(ct)
            h = self._layer(layer, [squares, h])
        return h

    def map(
        self, arrays: dict[str, np.ndarray], max_items: int | None = None
    ) -> dict[str, np.ndarray]:
        """A query (``HospitalCkks.encrypt``) -> the reply (``HospitalCkks.decrypt``); sizes,
        count and key are checked before any ciphertext is read, each ciphertext is checked
        against the context (parameters, level, scale) when it is."""
        unknown = sorted(set(arrays) - {HEADER, CIPHER, OFFSETS})
        if unknown:
            raise CkksError(f"unexpected field(s) in a CKKS query: {unknown[:3]}")
        header = _header(arrays)
        if header.get("kind") != "query":
            raise CkksError("not a CKKS query")
        if [tuple(s) for s in header.get("shapes", [])] != list(self.packing.shapes):
            raise CkksError(
                f"CKKS query for latent shapes {header.get('shapes')}, this server maps "
                f"{[list(s) for s in self.packing.shapes]}"
            )
        per_item = self.packing.cts(self.packing.channels)
        blobs = _split(
            arrays,
            header,
            per_item,
            max_ciphertext_bytes(self.keys.params),
            self.keys.key_id,
            max_items,
        )
        sealapi = _seal()
        first = self.keys.chain.parms_ids[0]
        out_blobs = []
        for i in range(int(header["items"])):
            cts = []
            for blob in blobs[i * per_item : (i + 1) * per_item]:
                ct = _load(sealapi.Ciphertext(), self.keys.seal, blob, "a query ciphertext")
                if list(ct.parms_id()) != list(first) or ct.size() != 2:
                    raise CkksError("a query ciphertext is not fresh (wrong level or size)")
                if not math.isclose(ct.scale, self._scale, rel_tol=1e-9):
                    raise CkksError(
                        f"a query ciphertext has scale {ct.scale:g}, not "
                        f"2^{self.keys.params.scale_bits}"
                    )
                cts.append(ct)
            out_blobs += [_save(ct) for ct in self.map_cts(cts)]
        reply = {**header, "kind": "reply", "ciphertexts": per_item}
        return {HEADER: _json_bytes(reply), **_blobs(out_blobs)}


def _add(ev: Any, a: Any, b: Any) -> Any:
    ev.add_inplace(a, b)
    return a


@lru_cache(maxsize=4)
def _secret_bytes(path: str, stamp: tuple[int, int]) -> bytes:
    keys = HospitalCkks.load(path)
    return _save(keys._secret)


def hospital_secret_bytes(path: str | Path) -> bytes:
    """A hospital's serialised CKKS secret key, read once per file version (the guard runs on
    every reply)."""
    st = Path(path).stat()
    return _secret_bytes(str(path), (st.st_ino, st.st_mtime_ns))


def secret_key_findings(arrays: dict[str, np.ndarray], secret: bytes | None = None) -> list[str]:
    """What in an outgoing payload is CKKS secret-key material: a serialised TenSEAL context
    that holds a secret key (alone or inside a key bundle), or the bytes of ``secret`` (a
    hospital's serialised secret key), whole or a 64-byte run of it."""
    ts = _tenseal()
    findings = []
    window = secret[len(secret) // 2 : len(secret) // 2 + 64] if secret else b""
    for name, arr in arrays.items():
        if arr.dtype != np.uint8 or arr.ndim != 1 or arr.size < 16:
            continue
        data = arr.tobytes()
        if window and window in data:
            findings.append(f"{name}: carries the hospital's CKKS secret key")
            continue
        if data[:2] == b"\x5e\xa1":  # a SEAL object (ciphertext, keys): not a context
            continue
        try:
            context = ts.context_from(data)
        except (ValueError, RuntimeError, TypeError):
            continue
        if context.has_secret_key():
            findings.append(f"{name}: a serialised CKKS context that holds a secret key")
    return findings
