"""Keyed nonlinear transform (KNT): a keyed bijection of each latent scale with no closed form.

Per scale and role, ``LAYERS`` keyed blocks followed by a final keyed mixing::

    x <- f_l(M_l x + b_l)   for l = 0 .. LAYERS-1     (M_l orthogonal over channels)
    z' = M_L x + b_L
    f(u) = u + a * sigmoid(s * u + c)                  (per channel; a, s > 0)

Each ``f`` is strictly increasing with slope in [1, 1 + g] (``g = a s / 4``, the keyed gain), so
it is invertible, but its inverse has no closed form (a transcendental equation per element).
The client inverts it per element: a closed-form start (the exact inverse of ``f`` with the
sigmoid's argument linearised at its centre) and ``NEWTON_STEPS`` Newton steps, which reach
~1e-6 relative to ``a`` over the whole keyed parameter range (tests/test_knt.py checks it on a
grid, so no data-dependent stopping test is needed). Because every slope is >= 1, the inverse
is 1-Lipschitz: fp16 rounding on the wire is not amplified when the client un-keys. (The
logistic sigmoid is ``tanh`` rescaled; it is used because it costs a third of ``tanh`` here.)

Scale: the bends sit where the latents are. The fedseg autoencoders' latents have a per-channel
spread of 0.3-0.7 (hippocampus and us-nerve alike), so slopes ``s`` of 3-8 put each bend's
width (about ``4 / s``) and its centre (``-c / s``) inside that spread. (The first KNT's bends
were about twice as wide, which left it within 6-9% of an affine map on real latents.) Latents
with a very different spread would see a nearly affine (tiny spread) or nearly translated (huge
spread) map: the constants are part of the transform's definition.

Roles differ: the image role bends harder (gain 0.8-1.5) and ends with a large keyed offset
(std ``OUT_BIAS`` = 5, against a latent spread of ~0.5); the mask role (the UMN's targets and
replies) bends gently (0.2-0.5) with a small offset, because strong bends there cost the UMN
far more Dice than they buy. The large offset is what lowers the re-identification attack's
AUC; an attacker who standardises each site's latents removes that part (README, attack suite).

Every parameter comes from the site's secret through HKDF under ``knt/<role>/scale<s>/layer<l>``,
independent of the run config, so the leak guard can re-derive and look for all of them.

Cost: the biases are folded into the nonlinearities' shifts once per key (``_Params``), all
scales are flattened side by side so each elementwise step is one op on all of them, and channel
mixing is one matmul per scale: a query costs well under a millisecond on one CPU core
(``benchmarks/knt_overhead.py``).
"""

from __future__ import annotations

import numpy as np
import torch

from fedseg.models.autoencoder import Latents
from fedseg.privacy.knt_keys import (  # noqa: F401 (re-exported: the keys are part of the KNT)
    BIAS,
    GAIN,
    LAYERS,
    MASK_GAIN,
    MASK_OUT_BIAS,
    MAX_LAYERS,
    NEWTON_STEPS,
    OUT_BIAS,
    SHIFT,
    SLOPE,
    SPATIAL,
    KntKeyRing,
    KntLayer,
    derive_layer,
    folded,
    knt_label,
)


class _Params:
    """All scales' layers as tensors for one dtype and latent layout, built once per key.

    Latents are handled as one (B, C, N) tensor, the scales' pixels side by side, so every
    elementwise step is one op on all scales; per-channel values are expanded to (C, N) here,
    once. Biases are folded into the shifts (``folded``).
    """

    # Per block, one (C, N) tensor each; set by name in __init__.
    amp: list[torch.Tensor]
    slope: list[torch.Tensor]
    shift: list[torch.Tensor]
    gain: list[torch.Tensor]
    start_slope: list[torch.Tensor]
    start_shift: list[torch.Tensor]

    def __init__(self, scales: list[list[KntLayer]], sizes: list[int], dtype: torch.dtype) -> None:
        def flat(values: list[np.ndarray]) -> torch.Tensor:
            columns = [np.repeat(v[:, None], n, 1) for v, n in zip(values, sizes, strict=True)]
            return torch.as_tensor(np.concatenate(columns, 1), dtype=dtype).contiguous()

        self.sizes = sizes
        self.depth = len(scales[0]) - 1
        self.mixing = [
            [torch.as_tensor(ls[i].mixing, dtype=dtype) for ls in scales]
            for i in range(self.depth + 1)
        ]
        self.mixing_t = [[m.T.contiguous() for m in ms] for ms in self.mixing]
        per_scale = [folded(ls)[0] for ls in scales]
        for name in ("amp", "slope", "shift", "gain", "start_slope", "start_shift"):
            setattr(self, name, [flat([f[i][name] for f in per_scale]) for i in range(self.depth)])
        self.bias = flat([f[-1]["bias"] for f in per_scale])
        if SPATIAL > 0:
            for i in range(self.depth):
                delta = torch.as_tensor(
                    np.concatenate(
                        [
                            np.random.default_rng([ls[i].positions, n]).standard_normal(
                                (len(ls[i].amp), n)
                            )
                            for ls, n in zip(scales, sizes, strict=True)
                        ],
                        1,
                    )
                    * SPATIAL,
                    dtype=dtype,
                )
                self.shift[i] = self.shift[i] + delta
                self.start_shift[i] = (
                    self.start_shift[i] + delta * self.start_slope[i] / self.slope[i]
                )


def _mix(ms: list[torch.Tensor], x: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """Per-scale channel mixing of (B, C, N) with the scales side by side."""
    if x.shape[0] == 1:  # a query: 2-D matmuls are a third cheaper than batched ones
        parts = x[0].split(sizes, 1)
        return torch.cat([torch.mm(m, p) for m, p in zip(ms, parts, strict=True)], 1)[None]
    return torch.cat([torch.matmul(m, p) for m, p in zip(ms, x.split(sizes, 2), strict=True)], 2)


def _invert_f(
    y: torch.Tensor,
    amp: torch.Tensor,
    slope: torch.Tensor,
    shift: torch.Tensor,
    gain: torch.Tensor,
    start_slope: torch.Tensor,
    start_shift: torch.Tensor,
) -> torch.Tensor:
    """Solve w + a sigmoid(s w + gamma) = y per element: closed-form start, then Newton.

    ``gain`` is ``a s`` (the sigmoid's derivative is ``t (1 - t)``)."""
    u = torch.addcmul(y, amp, torch.sigmoid(torch.addcmul(start_shift, start_slope, y)), value=-1)
    for _ in range(NEWTON_STEPS):
        t = torch.sigmoid(torch.addcmul(shift, slope, u))
        residual = torch.addcmul(u - y, amp, t)
        slope_f = torch.addcmul(t, t, t, value=-1).mul_(gain).add_(1)
        u = torch.addcdiv(u, residual, slope_f, value=-1)
    return u


def _pack(latents: Latents) -> torch.Tensor:
    b, c = latents[0].shape[:2]
    return torch.cat([z.reshape(b, c, -1) for z in latents], 2)


def _unpack(x: torch.Tensor, like: Latents, sizes: list[int]) -> Latents:
    return [p.view(z.shape) for p, z in zip(x.split(sizes, 2), like, strict=True)]


def forward_all(latents: Latents, p: _Params) -> Latents:
    x = _pack(latents)
    for i in range(p.depth):
        w = _mix(p.mixing[i], x, p.sizes)
        x = torch.addcmul(w, p.amp[i], torch.sigmoid(torch.addcmul(p.shift[i], p.slope[i], w)))
    out = _mix(p.mixing[p.depth], x, p.sizes) + p.bias
    return _unpack(out, latents, p.sizes)


def inverse_all(latents: Latents, p: _Params) -> Latents:
    x = _mix(p.mixing_t[p.depth], _pack(latents) - p.bias, p.sizes)
    for i in reversed(range(p.depth)):
        w = _invert_f(
            x,
            p.amp[i],
            p.slope[i],
            p.shift[i],
            p.gain[i],
            p.start_slope[i],
            p.start_shift[i],
        )
        x = _mix(p.mixing_t[i], w, p.sizes)
    return _unpack(x, latents, p.sizes)


class KntTransform:
    """Same interface as :class:`fedseg.privacy.klt.LatentTransform`."""

    enabled = True

    def __init__(self, ring: KntKeyRing) -> None:
        self._ring = ring
        self._cache: dict[tuple, _Params] = {}

    def _params(self, role: str, latents: Latents) -> _Params:
        key = (role, tuple(z.shape[-2:] for z in latents), latents[0].dtype)
        params = self._cache.get(key)
        if params is None:
            sizes = [z.shape[-2] * z.shape[-1] for z in latents]
            layers = self._ring.layers[role][: len(latents)]
            params = self._cache[key] = _Params(layers, sizes, latents[0].dtype)
        return params

    def forward(self, latents: Latents, role: str) -> Latents:
        return forward_all(latents, self._params(role, latents))

    def inverse(self, latents: Latents, role: str) -> Latents:
        return inverse_all(latents, self._params(role, latents))

    def __repr__(self) -> str:
        return "KntTransform(<secret>)"
