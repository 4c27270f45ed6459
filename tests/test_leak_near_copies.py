"""The outgoing guard catches near-copies of key material, not only verbatim ones: each case
below is one way a bug (or a careless debug line) could send a key, and each must be refused.
The exact checks missed six of them in issue 24's audit."""

from __future__ import annotations

import base64
import json

import numpy as np
import pytest

from fedseg.privacy.keys import KeyRing, generate_secret
from fedseg.privacy.knt import KntKeyRing
from fedseg.privacy.leakcheck import KeyMaterial

CHANNELS = 16
SECRET = generate_secret()
RING = KeyRing.from_secret(SECRET, CHANNELS)
KEY = RING.keys["image"][1]
Q, PQ, B = KEY.rotation, KEY.mixing, KEY.bias
KNT_ROW = KntKeyRing.from_secret(SECRET, CHANNELS, 3).vectors()[5]
NOISE = np.random.default_rng(0).standard_normal(CHANNELS)

ARRAY_CASES = {
    "Q row + 1e-6 noise": Q[3] + 1e-6 * NOISE,
    "-Q": -Q,
    "2Q": 2 * Q,
    "Q as int8": np.round(Q * 127).astype(np.int8),
    "Q as float16": Q.astype(np.float16),
    "Q transposed, one column": np.ascontiguousarray(Q.T[:, 5]),
    "PQ row shifted by 0.5": PQ[7] + 0.5,
    "bias x -3": -3 * B,
    "Q flattened as float32 with noise": (Q + 1e-4 * np.ones_like(Q)).astype(np.float32).ravel(),
    "Q row inside a longer array": np.concatenate([np.arange(5.0), Q[2], np.arange(7.0)]),
    "KNT vector x 10": 10 * KNT_ROW,
    "secret bytes as int16": np.frombuffer(SECRET, np.uint8).astype(np.int16),
    "secret bytes as float32": np.frombuffer(SECRET, np.uint8).astype(np.float32),
}
TEXT_CASES = {
    "Q row as a JSON list": json.dumps({"calibration": [float(v) for v in Q[4]]}),
    "bias rounded to 4 digits": "b = " + " ".join(f"{v:.4f}" for v in B),
    "secret in base64": base64.b64encode(SECRET).decode(),
    "secret in base64url": base64.urlsafe_b64encode(SECRET).decode(),
    "secret in upper-case hex": SECRET.hex().upper(),
    "secret in base32": base64.b32encode(SECRET).decode(),
    "secret as a JSON list of numbers": json.dumps(list(SECRET)),
}


@pytest.fixture(scope="module")
def material() -> KeyMaterial:
    return KeyMaterial(SECRET, RING)


@pytest.mark.parametrize("case", sorted(ARRAY_CASES))
def test_a_near_copy_in_an_array_is_caught(material, case):
    assert material.find({"stats": np.asarray(ARRAY_CASES[case])}, []), case


@pytest.mark.parametrize("case", sorted(TEXT_CASES))
def test_a_near_copy_in_a_text_is_caught(material, case):
    assert material.find({}, [TEXT_CASES[case]]), case


def test_honest_payloads_pass(material):
    """What sites really send: metrics, shapes, random-looking statistics, another secret's
    key rows; none is refused."""
    rng = np.random.default_rng(1)
    other = KeyRing.from_secret(generate_secret(), CHANNELS).keys["image"][1].rotation
    honest = {
        "stats": rng.standard_normal(4096).astype(np.float32),
        "counts": rng.integers(0, 255, 300).astype(np.int64),
        "other": other,
        "ramp": np.linspace(0, 1, 64),
    }
    texts = [json.dumps({"dice": [0.81, 0.77], "n_test": 40, "seconds": 12.5})]
    texts.append(json.dumps({"histogram": rng.integers(0, 1000, 256).tolist()}))
    assert material.find(honest, texts) == []
