"""The keyed nonlinear transform's keys: every KNT parameter of a hospital, derived from its
secret (numpy only). ``fedseg/privacy/knt.py`` applies them; the leak guard
(``fedseg/privacy/leakcheck.py``) re-derives them to look for them in what a site sends, in a
deployed node's one-message process that need not load torch for it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fedseg.privacy.keys import ROLES, derive_bytes

LAYERS = 2  # nonlinear blocks per scale
MAX_LAYERS = 8  # the leak guard looks for this many, in case LAYERS is raised
GAIN = (0.8, 1.5)  # range of g = a s / 4: slope of f varies between 1 and 1 + g
# The mask role (mask latents: the UMN's training targets and its replies) bends less and has no
# large offset: strong bends there cost the UMN far more Dice than they buy (see the README).
MASK_GAIN = (0.2, 0.5)
SLOPE = (3.0, 8.0)  # range of s: bend width ~ 4/s, against latent spreads of 0.3-0.7
SHIFT = 3.0  # c in [-SHIFT, SHIFT]: bend centres -c/s within about +-1
BIAS = 0.3  # std of b_l between blocks
OUT_BIAS = 5.0  # std of the final b_L (the keyed offset of what leaves the site), image role
MASK_OUT_BIAS = 0.3  # the same for the mask role
NEWTON_STEPS = 2
SPATIAL = 0.0  # std of keyed per-position shifts added to c (0: the same bend at every pixel)


@dataclass(frozen=True, repr=False)
class KntLayer:
    """One keyed block: mixing (C, C) orthogonal, bias (C,), then f with amp, slope, shift.

    The last layer of a scale has no nonlinearity (amp = 0)."""

    mixing: np.ndarray
    bias: np.ndarray
    amp: np.ndarray
    slope: np.ndarray
    shift: np.ndarray
    positions: int = 0  # seed of the per-position shifts (SPATIAL > 0)

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
    mask = role == "mask"
    out_bias = MASK_OUT_BIAS if mask else OUT_BIAS
    bias = rng.standard_normal(channels) * (out_bias if last else BIAS)
    slope = rng.uniform(*SLOPE, channels)
    amp = 4 * rng.uniform(*(MASK_GAIN if mask else GAIN), channels) / slope
    shift = rng.uniform(-SHIFT, SHIFT, channels)
    if last:
        amp = np.zeros(channels)
    positions = int(rng.integers(2**62))
    return KntLayer(mixing, bias, amp, slope, shift, positions)


@dataclass(frozen=True, repr=False)
class KntKeyRing:
    """All KNT layers of one hospital: ``layers[role][scale]`` is a list of LAYERS + 1."""

    layers: dict[str, list[list[KntLayer]]]

    @classmethod
    def from_secret(
        cls, secret: bytes, channels: int, scales: int = 3, layers: int | None = None
    ) -> KntKeyRing:
        layers = LAYERS if layers is None else layers
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
        """Every key vector, and every vector the fast path derives from them (``folded``)."""
        derived = [v for scales in self.layers.values() for ls in scales for v in folded(ls)[1]]
        return [
            v for scales in self.layers.values() for ls in scales for x in ls for v in x.vectors()
        ] + derived

    def __repr__(self) -> str:
        return "KntKeyRing(<secret>)"


def folded(layers: list[KntLayer]) -> tuple[list[dict[str, np.ndarray]], list[np.ndarray]]:
    """One scale's layers with the biases folded into the nonlinearities' shifts.

    With ``y_l = x_l - e_l`` (``e_0 = 0``, ``e_{l+1} = beta_l = M_l e_l + b_l``) a block is
    ``w = M_l y_l; y_{l+1} = w + a sigmoid(s w + gamma_l)`` with ``gamma_l = s beta_l + c``,
    and the output is ``M_L y_L + beta_L``: no bias adds between blocks. Returns per block the
    vectors the forward and inverse use (with the inverse's closed-form start), then every
    derived vector (for the leak guard: these are key material too).
    """
    offset = np.zeros(layers[0].mixing.shape[0])
    blocks = []
    for layer in layers[:-1]:
        beta = layer.mixing @ offset + layer.bias
        gamma = layer.slope * beta + layer.shift
        gain = layer.amp * layer.slope / 4  # f's slope is in [1, 1 + gain]
        blocks.append(
            {
                "amp": layer.amp,
                "slope": layer.slope,
                "shift": gamma,
                # Newton's derivative 1 + a s t (1 - t) is computed as 1 + (a s) (t - t^2).
                "gain": layer.amp * layer.slope,
                # Closed-form start u0 = y - a sigmoid(k y + m): the sigmoid's argument at the
                # root, s u + gamma, with u from f's linearisation at its centre (slope 1 + g).
                "start_slope": layer.slope / (1 + gain),
                "start_shift": (gamma - layer.slope * layer.amp / 2) / (1 + gain),
            }
        )
        offset = beta
    bias = layers[-1].mixing @ offset + layers[-1].bias
    derived = [bias] + [
        v for block in blocks for k, v in block.items() if k not in ("amp", "slope")
    ]
    return [*blocks, {"bias": bias}], derived
