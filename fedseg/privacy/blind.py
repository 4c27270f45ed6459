"""Blind aggregation: the server adds up the sites' shared weights without reading any of them,
their differences, or their sum.

Each site writes ``n_i * w_i`` (its weights times its training-set size) in fixed point with
``FRACTION_BITS`` fractional bits, as integers modulo 2^64, appends ``n_i`` itself, and adds a
mask: a ChaCha20 key stream under a key derived (HKDF) from the federation secret, the round's
label and the site's name. The server adds the masked vectors modulo 2^64 and returns the sum
with the names of the sites it added. Every site can recompute the masks of those sites (it
holds the same secret), subtracts them, and divides by the recovered total weight: the weighted
average, to within 2^-24 per weight. The server sees only uniformly random integers: one site's
vector is hidden by that site's mask, the sum by the sum of the masks, and neither ever cancels
on the server's side. A site that drops out is simply not in the sum and not in the list.

Why not Flower's SecAgg+ (``SecAggPlusWorkflow``): it is a workflow of the legacy ``train``
round, not a step of this Message-API loop, and it *reveals the sum to the server* by design,
which is what this mode must not do. The hospitals already share a secret out of band, so masks
derived from it need no key agreement round and survive drop-outs without share recovery.

What this does not cover: a hospital that colludes with the server (it holds the secret and so
every mask), and a server that lies about which sites it added (the sites then decode noise;
:func:`unblind` detects it from the recovered total weight and refuses).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

from fedseg.privacy.keys import derive_bytes

if TYPE_CHECKING:  # the server's side (masks, sums) needs no torch
    import torch

# Fixed point: 2^-24 ~ 6e-8 per weight, far below what one optimiser step moves. The range is
# what decides it: batch-norm running variances reach 1e5 (us-nerve's mask decoder input norm,
# 400 epochs), times the site's image count; 32 fractional bits overflowed there.
FRACTION_BITS = 24
MAX_SITES_LOG2 = 7  # headroom for 128 sites' sums
MAX_ABS = 2.0 ** (62 - FRACTION_BITS - MAX_SITES_LOG2)  # |n_i * w_i| bound, about 2.1e9
MAX_TOTAL_WEIGHT = 2**40  # a decoded total weight above this is noise (a wrong site list)


class BlindAggregationError(ValueError):
    """A blinded vector or a masked sum that cannot be decoded (the message says why)."""


def mask_label(run_id: int | str, epoch: int) -> str:
    """The label of one aggregation round. A site must never blind two vectors under one label
    (two masked vectors with the same mask leak their difference): see :class:`BlindSite`."""
    return f"{run_id}/{epoch}"


def _mask(secret: bytes, label: str, site: str, size: int) -> np.ndarray:
    key = derive_bytes(secret, f"fedseg/blind/{label}/{site}")
    stream = Cipher(algorithms.ChaCha20(key, bytes(16)), mode=None).encryptor()
    return np.frombuffer(stream.update(bytes(8 * size)), dtype=np.uint64)


def flatten(state: Mapping[str, torch.Tensor]) -> np.ndarray:
    """The state's tensors in name order, as one float64 vector. Blind aggregation averages
    floating-point tensors only: integer buffers (batch-norm counters) are not weights, grow
    without bound, and stay at each site."""
    return np.concatenate(
        [state[k].detach().double().reshape(-1).numpy() for k in sorted(state)] or [np.zeros(0)]
    )


def unflatten(vector: np.ndarray, like: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inverse of :func:`flatten`; integer tensors (batch counters) are rounded back."""
    import torch

    out, start = {}, 0
    for name in sorted(like):
        ref = like[name]
        part = torch.from_numpy(vector[start : start + ref.numel()].copy()).reshape(ref.shape)
        out[name] = part.to(ref.dtype) if ref.is_floating_point() else part.round().to(ref.dtype)
        start += ref.numel()
    if start != len(vector):
        raise BlindAggregationError(f"the sum has {len(vector)} values, the model {start}")
    return out


def blind(
    state: Mapping[str, torch.Tensor], weight: int, secret: bytes, label: str, site: str
) -> np.ndarray:
    """One site's masked contribution: uint64, one value per weight plus one for ``weight``."""
    if weight < 1:
        raise BlindAggregationError(f"site {site}: aggregation weight must be >= 1, got {weight}")
    values = np.append(flatten(state) * weight, float(weight))
    if not np.isfinite(values).all():
        raise BlindAggregationError(f"site {site}: shared weights are not finite")
    worst = float(np.abs(values[:-1]).max(initial=0.0))
    if worst >= MAX_ABS:
        raise BlindAggregationError(
            f"site {site}: a shared weight times {weight} is {worst:.3g}, beyond the fixed-point "
            f"range {MAX_ABS:.3g}"
        )
    fixed = np.rint(values * 2.0**FRACTION_BITS).astype(np.int64).view(np.uint64)
    return fixed + _mask(secret, label, site, len(fixed))  # wraps modulo 2^64


def add_blinded(vectors: Iterable[np.ndarray]) -> np.ndarray:
    """The server's whole part: the sum modulo 2^64 (it cannot decode it or any summand)."""
    total: np.ndarray | None = None
    for v in vectors:
        v = np.asarray(v)
        if v.dtype != np.uint64 or v.ndim != 1:
            raise BlindAggregationError(f"a blinded vector is {v.dtype} {v.shape}, not 1-D uint64")
        if total is not None and v.shape != total.shape:
            raise BlindAggregationError(
                f"blinded vectors differ in length: {v.shape} {total.shape}"
            )
        total = v.copy() if total is None else total + v
    if total is None:
        raise BlindAggregationError("nothing to add: no site sent a blinded vector")
    return total


def unblind(
    masked_sum: np.ndarray,
    secret: bytes,
    label: str,
    sites: Iterable[str],
    like: Mapping[str, torch.Tensor],
) -> tuple[dict[str, torch.Tensor], int]:
    """At a site: remove the masks of ``sites`` (those the server says it added) and return the
    weighted average, shaped like ``like``, and the total weight it averaged over."""
    sites = sorted(set(sites))
    if not sites:
        raise BlindAggregationError("the server's sum names no sites")
    masked_sum = np.asarray(masked_sum)
    if masked_sum.dtype != np.uint64 or masked_sum.ndim != 1:
        raise BlindAggregationError(f"the masked sum is {masked_sum.dtype}, not uint64 1-D")
    plain = masked_sum.copy()
    for site in sites:
        plain -= _mask(secret, label, site, len(plain))
    values = plain.view(np.int64).astype(np.float64) / 2.0**FRACTION_BITS
    total = values[-1]
    if not (0.5 <= total <= MAX_TOTAL_WEIGHT and abs(total - round(total)) < 1e-6):
        raise BlindAggregationError(
            f"the masked sum does not decode (total weight {total:.4g}): the server's list of "
            f"sites ({', '.join(sites)}) is not the set it added, or a vector was altered"
        )
    total = round(total)
    return unflatten(values[:-1] / total, like), total


class BlindSite:
    """One site's side across rounds: refuses to blind twice under one label (which would leak
    the difference of two of its vectors to the server)."""

    def __init__(self, secret: bytes, site: str, used: Iterable[str] = ()) -> None:
        self._secret, self.site = secret, site
        self.used = set(used)

    def __repr__(self) -> str:
        return f"BlindSite({self.site!r}, <secret>)"

    def blind(self, state: Mapping[str, torch.Tensor], weight: int, label: str) -> np.ndarray:
        if label in self.used:
            raise BlindAggregationError(
                f"site {self.site}: refusing to blind twice under round label {label!r} "
                "(the server asked for a round it already had)"
            )
        vector = blind(state, weight, self._secret, label, self.site)
        self.used.add(label)
        return vector

    def unblind(
        self,
        masked_sum: np.ndarray,
        label: str,
        sites: Iterable[str],
        like: Mapping[str, torch.Tensor],
    ) -> tuple[dict[str, torch.Tensor], int]:
        if self.site not in set(sites):
            raise BlindAggregationError(
                f"site {self.site}: the server's sum leaves this site out; not adopting it"
            )
        return unblind(masked_sum, self._secret, label, sites, like)
