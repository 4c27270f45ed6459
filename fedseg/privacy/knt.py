"""Keyed nonlinear transform (KNT): a keyed bijection of each latent scale with no closed form.

Per scale and role, ``LAYERS`` keyed blocks followed by a final keyed mixing::

    x <- f_l(M_l x + b_l)   for l = 0 .. LAYERS-1     (M_l orthogonal over channels)
    z' = M_L x + b_L
    f(u) = u + a * tanh(s * u + c)                     (per channel; a, s > 0, a * s < 1)

Each ``f`` is strictly increasing with slope in [1, 1 + a s], so it is invertible, but its
inverse has no closed form: the client inverts it per element with Newton's method, whose error
shrinks by at least a factor ``a s`` per step for any start (the slope never varies by more than
that) and quadratically near the root. Because the slope is >= 1, the inverse is 1-Lipschitz:
fp16 rounding on the wire is not amplified when the client un-keys.

Every parameter comes from the site's secret through HKDF under ``knt/<role>/scale<s>/layer<l>``,
independent of the run config, so the leak guard can re-derive and look for all of them.
The constants below are part of the transform's definition (both sides of a deployment must
agree on them): latents of the fedseg autoencoders have a per-channel spread of order 1, where
``tanh`` with these slopes is far from linear.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from fedseg.models.autoencoder import Latents
from fedseg.privacy.keys import ROLES, derive_bytes

LAYERS = 2  # nonlinear blocks per scale
MAX_LAYERS = 8  # the leak guard looks for this many, in case LAYERS is raised
STRENGTH = (0.6, 0.9)  # range of a * s: how far f bends (< 1 keeps Newton contracting)
SLOPE = (0.7, 1.6)  # range of s
SHIFT = 1.0  # c in [-SHIFT, SHIFT]
BIAS = 0.5  # std of b_l
NEWTON_STEPS = 3


@dataclass(frozen=True, repr=False)
class KntLayer:
    """One keyed block: mixing (C, C) orthogonal, bias (C,), then f with amp, slope, shift.

    The last layer of a scale has no nonlinearity (amp = 0)."""

    mixing: np.ndarray
    bias: np.ndarray
    amp: np.ndarray
    slope: np.ndarray
    shift: np.ndarray

    def vectors(self) -> list[np.ndarray]:
        """Everything secret, as 1-D vectors (rows and columns of the mixing included)."""
        return [*self.mixing, *self.mixing.T, self.bias, self.amp, self.slope, self.shift]

    def __repr__(self) -> str:
        return "KntLayer(<secret>)"


def knt_label(role: str, scale: int, layer: int) -> str:
    return f"knt/{role}/scale{scale}/layer{layer}"


def derive_layer(
    secret: bytes, role: str, scale: int, layer: int, channels: int, last: bool
) -> KntLayer:
    if role not in ROLES:
        raise ValueError(f"role must be one of {ROLES}, got {role!r}")
    seed = int.from_bytes(derive_bytes(secret, knt_label(role, scale, layer)), "big")
    rng = np.random.default_rng(seed)
    q, r = np.linalg.qr(rng.standard_normal((channels, channels)))
    mixing = (q * np.sign(np.diag(r))[None, :])[rng.permutation(channels)]
    bias = rng.standard_normal(channels) * BIAS
    slope = rng.uniform(*SLOPE, channels)
    amp = rng.uniform(*STRENGTH, channels) / slope
    shift = rng.uniform(-SHIFT, SHIFT, channels)
    if last:
        amp = np.zeros(channels)
    return KntLayer(mixing, bias, amp, slope, shift)


@dataclass(frozen=True, repr=False)
class KntKeyRing:
    """All KNT layers of one hospital: ``layers[role][scale]`` is a list of LAYERS + 1."""

    layers: dict[str, list[list[KntLayer]]]

    @classmethod
    def from_secret(
        cls, secret: bytes, channels: int, scales: int = 3, layers: int = LAYERS
    ) -> KntKeyRing:
        return cls(
            {
                role: [
                    [
                        derive_layer(secret, role, s, i, channels, last=i == layers)
                        for i in range(layers + 1)
                    ]
                    for s in range(scales)
                ]
                for role in ROLES
            }
        )

    def vectors(self) -> list[np.ndarray]:
        return [
            v for scales in self.layers.values() for ls in scales for x in ls for v in x.vectors()
        ]

    def __repr__(self) -> str:
        return "KntKeyRing(<secret>)"


class _Params:
    """All scales' layers as tensors for one dtype and latent layout, built once.

    Channel mixing is done per scale; the elementwise steps run once on all scales flattened
    and concatenated, with per-channel parameters expanded to that layout (fewer, larger ops:
    per-op overhead dominates at these sizes)."""

    def __init__(self, scales: list[list[KntLayer]], sizes: list[int], dtype: torch.dtype) -> None:
        def t(a: np.ndarray) -> torch.Tensor:
            return torch.as_tensor(a, dtype=dtype)

        def flat(values: list[np.ndarray]) -> torch.Tensor:
            return t(np.concatenate([np.repeat(v, n) for v, n in zip(values, sizes, strict=True)]))

        self.sizes = sizes
        self.depth = len(scales[0]) - 1
        self.mixing = [[t(ls[i].mixing) for ls in scales] for i in range(self.depth + 1)]
        self.bias = [flat([ls[i].bias for ls in scales]) for i in range(self.depth + 1)]
        self.amp = [flat([ls[i].amp for ls in scales]) for i in range(self.depth)]
        self.slope = [flat([ls[i].slope for ls in scales]) for i in range(self.depth)]
        self.shift = [flat([ls[i].shift for ls in scales]) for i in range(self.depth)]
        self.gain = [a * s for a, s in zip(self.amp, self.slope, strict=True)]  # a s


def _mix(ms: list[torch.Tensor], parts: list[torch.Tensor], transpose: bool) -> torch.Tensor:
    """Per-scale channel mixing of (B, C, n_s) parts -> (B, sum C n_s)."""
    out = [
        torch.matmul(m.T if transpose else m, x).flatten(1) for m, x in zip(ms, parts, strict=True)
    ]
    return torch.cat(out, 1)


def _split(x: torch.Tensor, channels: int, sizes: list[int]) -> list[torch.Tensor]:
    return [
        p.view(x.shape[0], channels, n)
        for p, n in zip(x.split([channels * n for n in sizes], 1), sizes, strict=True)
    ]


def _invert_f(
    y: torch.Tensor, a: torch.Tensor, s: torch.Tensor, c: torch.Tensor, gain: torch.Tensor
) -> torch.Tensor:
    """Solve u + a tanh(s u + c) = y per element with a fixed number of Newton steps.

    Newton contracts from any start since 0 < a s < 1; from this start (one fixed-point step)
    three steps reach ~1e-10 in float64 over the whole parameter range (tests/test_knt.py checks
    it on a grid), so no data-dependent stopping test is needed."""
    u = y - a * torch.tanh(torch.addcmul(c, s, y))
    for _ in range(NEWTON_STEPS):
        t = torch.tanh(torch.addcmul(c, s, u))
        u = u - (torch.addcmul(u, a, t) - y) / torch.addcmul(1 + gain, gain, t * t, value=-1)
    return u


def forward_all(latents: Latents, p: _Params) -> Latents:
    b, c = latents[0].shape[:2]
    parts = [z.reshape(b, c, -1) for z in latents]
    for i in range(p.depth):
        u = _mix(p.mixing[i], parts, False) + p.bias[i]
        x = torch.addcmul(u, p.amp[i], torch.tanh(torch.addcmul(p.shift[i], p.slope[i], u)))
        parts = _split(x, c, p.sizes)
    out = _mix(p.mixing[p.depth], parts, False) + p.bias[p.depth]
    return [z.view_as(ref) for z, ref in zip(_split(out, c, p.sizes), latents, strict=True)]


def inverse_all(latents: Latents, p: _Params) -> Latents:
    b, c = latents[0].shape[:2]
    x = torch.cat([z.reshape(b, -1) for z in latents], 1) - p.bias[p.depth]
    parts = _split(x, c, p.sizes)
    for i in reversed(range(p.depth + 1)):
        x = _mix(p.mixing[i], parts, True)
        if i == 0:
            break
        u = _invert_f(x, p.amp[i - 1], p.slope[i - 1], p.shift[i - 1], p.gain[i - 1])
        parts = _split(u - p.bias[i - 1], c, p.sizes)
    return [z.view_as(ref) for z, ref in zip(_split(x, c, p.sizes), latents, strict=True)]


class KntTransform:
    """Same interface as :class:`fedseg.privacy.klt.LatentTransform`."""

    enabled = True

    def __init__(self, ring: KntKeyRing) -> None:
        self._ring = ring
        self._cache: dict[tuple, _Params] = {}

    def _params(self, role: str, latents: Latents) -> _Params:
        sizes = [z.shape[-2] * z.shape[-1] for z in latents]
        key = (role, tuple(sizes), latents[0].dtype)
        if key not in self._cache:
            layers = self._ring.layers[role][: len(latents)]
            self._cache[key] = _Params(layers, sizes, latents[0].dtype)
        return self._cache[key]

    def forward(self, latents: Latents, role: str) -> Latents:
        return forward_all(latents, self._params(role, latents))

    def inverse(self, latents: Latents, role: str) -> Latents:
        return inverse_all(latents, self._params(role, latents))

    def __repr__(self) -> str:
        return "KntTransform(<secret>)"
