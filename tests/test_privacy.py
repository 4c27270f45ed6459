"""Keys, KLT and the leak check."""

from __future__ import annotations

import stat

import numpy as np
import pytest
import torch

from fedseg.privacy import (
    KeyFileError,
    KeyRing,
    LatentTransform,
    apply_klt,
    generate_secret,
    invert_klt,
    read_key_file,
    write_key_file,
)
from fedseg.privacy.leakcheck import KeyMaterial, find_key_material


def test_key_file_is_created_0600_and_round_trips(tmp_path):
    path = write_key_file(tmp_path / "site.key")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    secret = read_key_file(path)
    assert len(secret) == 32
    with pytest.raises(KeyFileError, match="refusing to overwrite"):
        write_key_file(path)


def test_key_file_with_open_mode_is_refused(tmp_path):
    path = write_key_file(tmp_path / "site.key")
    path.chmod(0o644)
    with pytest.raises(KeyFileError, match="mode 644"):
        read_key_file(path)


def test_malformed_key_file_names_the_file(tmp_path):
    path = tmp_path / "bad.key"
    path.write_text("not a key\n")
    path.chmod(0o600)
    with pytest.raises(KeyFileError, match="bad.key"):
        read_key_file(path)


def test_keys_are_deterministic_and_independent_per_role_and_scale():
    secret = generate_secret()
    a, b = KeyRing.from_secret(secret, 16), KeyRing.from_secret(secret, 16)
    np.testing.assert_array_equal(a.keys["image"][0].mixing, b.keys["image"][0].mixing)
    assert not np.allclose(a.keys["image"][0].mixing, a.keys["mask"][0].mixing)
    assert not np.allclose(a.keys["image"][0].mixing, a.keys["image"][1].mixing)
    other = KeyRing.from_secret(generate_secret(), 16)
    assert not np.allclose(a.keys["image"][0].mixing, other.keys["image"][0].mixing)
    m = a.keys["image"][2].mixing
    np.testing.assert_allclose(m @ m.T, np.eye(16), atol=1e-12)
    assert "secret" in repr(a) and str(m[0, 0]) not in repr(a.keys["image"][2])


def test_klt_round_trip_error_below_1e5_in_fp32():
    ring = KeyRing.from_secret(generate_secret(), 32)
    gen = torch.Generator().manual_seed(0)
    latents = [torch.randn(8, 32, s, s, generator=gen) * 3 for s in (16, 8, 4)]
    t = LatentTransform(ring)
    keyed = t.forward(latents, "image")
    back = t.inverse(keyed, "image")
    for z, k, r in zip(latents, keyed, back, strict=True):
        assert (z - r).abs().max().item() < 1e-5
        assert not torch.allclose(z, k, atol=0.1)  # the transform does change the latents


def test_klt_preserves_distances():
    """Orthogonal mixing: an MSE in keyed space equals the MSE in plain space."""
    key = KeyRing.from_secret(generate_secret(), 32).keys["mask"][0]
    a, b = torch.randn(4, 32, 8, 8), torch.randn(4, 32, 8, 8)
    plain = torch.mean((a - b) ** 2)
    keyed = torch.mean((apply_klt(a, key) - apply_klt(b, key)) ** 2)
    assert abs(plain.item() - keyed.item()) < 1e-5
    assert torch.allclose(invert_klt(apply_klt(a, key), key), a, atol=1e-5)


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64, np.longdouble])
def test_leak_check_finds_each_key_component(dtype):
    secret = generate_secret()
    ring = KeyRing.from_secret(secret, 32)
    key = ring.keys["mask"][1]
    latents = np.random.default_rng(0).standard_normal((64, 32, 8, 8)).astype(dtype)
    assert find_key_material({"latents": latents}, [], secret, ring) == []
    for leaked in (key.mixing[3], key.mixing[:, 5], key.rotation[0], key.bias):
        for at in (0, 100, latents.size - 32):  # the first and last places a vector fits too
            payload = latents.copy().ravel()
            payload[at : at + 32] = leaked.astype(dtype)
            found = find_key_material({"x": payload}, [], secret, ring)
            assert found, f"missed a leaked key vector at {at} in {np.dtype(dtype)}"


def test_leak_check_finds_secret_bytes_hex_and_permutation():
    secret = generate_secret()
    ring = KeyRing.from_secret(secret, 32)
    assert find_key_material({}, [f"note {secret.hex()}"], secret, ring)
    assert find_key_material({"raw": np.frombuffer(secret, np.uint8)}, [], secret, ring)
    perm = ring.keys["image"][0].permutation.astype(np.int64)
    assert find_key_material({"p": perm}, [], secret, ring)


def test_every_byte_pattern_is_found_at_every_alignment_in_a_large_payload():
    """Large payloads are searched through an index of 8-byte blocks (one pass, not one per
    pattern): a pattern must be found wherever it starts, up to the payload's last byte, and
    in a flat payload (zero blocks: the index's many-hits fallback) too."""
    secret = generate_secret()
    material = KeyMaterial(secret, KeyRing.from_secret(secret, 32))
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, 20_000, dtype=np.uint8).tobytes()
    assert material.find({"latents.image0": np.frombuffer(noise, np.uint8)}, []) == []
    for index, (what, pattern) in enumerate(material.patterns):
        background = noise if index % 2 else bytes(len(noise))
        for start in (0, 8 * 97 + index % 8, len(noise) - len(pattern)):
            blob = background[:start] + pattern + background[start + len(pattern) :]
            payload = {"latents.image0": np.frombuffer(blob, np.uint8)}
            assert f"{what} in latents.image0" in material.find(payload, []), (what, start)


def test_leak_check_has_no_false_positive_on_flat_regions():
    """Flat background gives long runs of one repeated value; that is not a key."""
    secret = generate_secret()
    ring = KeyRing.from_secret(secret, 32)
    key = ring.keys["mask"][0]
    flat = np.full((4, 32, 16, 16), key.bias[0], dtype=np.float16)  # a key value, repeated
    flat[:, :, 8:] = key.mixing[0, 0]
    assert find_key_material({"mask0": flat}, [], secret, ring) == []
