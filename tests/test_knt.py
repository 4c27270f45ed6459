"""Keyed nonlinear transform: bijection, nonlinearity, fp16 wire, custody, leak guard."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import torch

from fedseg.config import ConfigError, RunConfig, config_from_dict, preset_config
from fedseg.coordinator import Coordinator
from fedseg.privacy.keys import (
    KeyRing,
    derive_bytes,
    generate_secret,
    read_key_file,
    write_key_file,
)
from fedseg.privacy.knt import (
    GAIN,
    SLOPE,
    KntKeyRing,
    KntTransform,
    _invert_f,
    knt_label,
)
from fedseg.privacy.leakcheck import find_key_material
from fedseg.site import SiteModels, site_transform
from fedseg.wire import pack, unpack

C = 16


def _latents(batch: int = 3, scale: float = 2.0, size: int = 64) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randn(batch, C, size // s, size // s, generator=g) * scale for s in (8, 16, 32)]


@pytest.fixture(scope="module")
def knt():
    secret = generate_secret()
    return secret, KntTransform(KntKeyRing.from_secret(secret, C))


@pytest.mark.parametrize("role", ["image", "mask"])
@pytest.mark.parametrize("scale", [0.1, 2.0, 30.0])
def test_round_trip_below_1e4(knt, role, scale):
    _, t = knt
    z = _latents(scale=scale)
    back = t.inverse(t.forward(z, role), role)
    for a, b in zip(z, back, strict=True):
        assert a.shape == b.shape
        assert (a - b).abs().max().item() < 1e-4 * max(1.0, scale / 10)


def test_newton_inverse_of_each_nonlinearity_on_a_grid():
    """The closed-form start and NEWTON_STEPS Newton steps are enough over the whole keyed
    parameter range (gain, slope, shift, and the shifts the folded biases add), float64."""
    w = torch.linspace(-60, 60, 40_001, dtype=torch.float64)
    worst = 0.0
    for gain, s, c in itertools.product(
        np.linspace(GAIN[0], GAIN[1], 4),
        np.linspace(SLOPE[0], SLOPE[1], 4),
        np.linspace(-12, 12, 9),
    ):
        a = 4 * gain / s
        y = w + a * torch.sigmoid(s * w + c)
        t = (torch.tensor(v, dtype=torch.float64) for v in (a, s, c, a * s, s / (1 + gain)))
        amp, slope, shift, gs, start_slope = t
        start_shift = (shift - slope * amp / 2) / (1 + gain)
        u = _invert_f(y, amp, slope, shift, gs, start_slope, start_shift)
        worst = max(worst, ((u - w).abs().max() / amp).item())
    assert worst < 1e-5


def test_knt_is_not_affine(knt):
    """The best affine fit from plain to keyed channels leaves a clear residual (KLT: none)."""
    secret, t = knt
    z = _latents(batch=8)[0]
    x = z.permute(0, 2, 3, 1).reshape(-1, C).double()
    design = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1)
    klt = KeyRing.from_secret(secret, C).keys["image"][0]
    for keyed, affine in ((t.forward([z], "image")[0], False), (None, True)):
        if affine:
            y = x @ torch.from_numpy(klt.mixing).T + torch.from_numpy(klt.bias)
        else:
            y = keyed.permute(0, 2, 3, 1).reshape(-1, C).double()
        w = torch.linalg.lstsq(design, y).solution
        rel = ((design @ w - y).norm() / (y - y.mean(0)).norm()).item()
        assert (rel < 1e-6) if affine else (rel > 0.05), (affine, rel)


def test_keys_are_deterministic_and_differ_by_secret_role_and_scale(knt):
    secret, t = knt
    z = _latents()
    again = KntTransform(KntKeyRing.from_secret(secret, C)).forward(z, "image")
    for a, b in zip(t.forward(z, "image"), again, strict=True):
        torch.testing.assert_close(a, b)
    other = KntTransform(KntKeyRing.from_secret(generate_secret(), C)).forward(z, "image")
    assert (other[0] - again[0]).abs().mean() > 0.5
    assert (t.forward(z, "mask")[0] - again[0]).abs().mean() > 0.5
    assert repr(t) == "KntTransform(<secret>)" and "secret" in repr(
        KntKeyRing.from_secret(secret, 4)
    )


def test_fp16_wire_stays_in_range_and_decodes(knt):
    _, t = knt
    z = _latents(scale=50.0)
    shapes = [tuple(x.shape[1:]) for x in z]
    keyed = t.forward(z, "mask")
    arrays = pack(keyed, "mask")  # raises WireError beyond the fp16 range
    back = t.inverse(unpack(arrays, "mask", shapes), "mask")
    for a, b, k in zip(z, back, keyed, strict=True):
        # fp16 keeps ~11 bits; the inverse is 1-Lipschitz per element, so no amplification
        assert (a - b).abs().max().item() < 4 * k.abs().max().item() * 2**-11


def test_config_accepts_knt_and_names_the_choices():
    cfg = config_from_dict({"privacy": {"transform": "knt"}})
    assert cfg.privacy.transform == "knt"
    with pytest.raises(ConfigError, match="'none', 'klt', 'knt'"):
        config_from_dict({"privacy": {"transform": "rsa"}})


def test_leak_guard_finds_knt_parameters(knt):
    secret, t = knt
    ring = KeyRing.from_secret(secret, C)
    keyed = t.forward(_latents(), "image")
    assert (
        find_key_material({"image0": keyed[0].numpy().astype(np.float16)}, [], secret, ring) == []
    )
    layer = t._ring.layers["mask"][1][0]
    for name, vector in (
        ("mixing row", layer.mixing[3]),
        ("mixing column", layer.mixing[:, 5]),
        ("bias", layer.bias),
        ("slope", layer.slope),
        ("shift", layer.shift),
        ("amplitude", layer.amp),
    ):
        payload = np.concatenate([np.zeros(7), vector, np.ones(3)]).astype(np.float32)
        assert find_key_material({"x": payload}, [], secret, ring), name
    seed = derive_bytes(secret, knt_label("image", 2, 1))
    found = find_key_material({}, [f"debug {seed.hex()}"], secret, ring)
    assert any("knt/image/scale2/layer1" in f for f in found)


def _cfg(tmp_path, custody: str) -> RunConfig:
    cfg = preset_config("paper", out_dir=str(tmp_path))  # per-site keys, latents kept
    cfg.model.image_size = 64
    cfg.model.ae_widths = [8, 8, 16, 16, 16]
    cfg.model.latent_channels = C
    cfg.model.umn_width = 16
    cfg.model.umn_blocks = 1
    cfg.privacy.transform = "knt"
    cfg.privacy.custody = custody
    cfg.privacy.key_dir = str(tmp_path / "keys")
    return cfg.validate()


def test_server_custody_unkeys_knt_and_client_custody_does_not(tmp_path):
    """With the keys, the server stores plain latents; without, it keeps the keyed ones."""
    write_key_file(tmp_path / "keys" / "a.key")
    cfg = _cfg(tmp_path, "server")
    models = SiteModels.build(cfg, 3)
    models.image_ae.eval()
    models.mask_ae.eval()
    transform = site_transform(cfg, tmp_path / "keys" / "a.key", create=True)
    assert isinstance(transform, KntTransform)
    with torch.no_grad():
        plain = models.image_ae.encoder(torch.randn(4, 1, 64, 64))
        keyed = transform.forward(plain, "image")
    arrays = {**pack(keyed, "image"), **pack(keyed, "mask")}
    server = Coordinator(cfg, ["a"], key_dir=cfg.privacy.key_dir)
    client = Coordinator(_cfg(tmp_path, "client"), ["a"], key_dir=None)
    server.add_chunk("a", arrays)
    client.add_chunk("a", arrays)
    held_server = server.site_latents()[0].image
    held_client = client.site_latents()[0].image
    for p, s, c, k in zip(plain, held_server, held_client, keyed, strict=True):
        tol = 4 * k.abs().max().item() * 2**-11
        assert (p - s.float()).abs().max().item() < tol
        torch.testing.assert_close(c.float(), k.half().float())


@pytest.mark.slow
def test_knt_through_flower_with_server_custody(tmp_path):
    """A real (tiny) federation with KNT: runs end to end, the server un-keys with provisioned
    keys, and no payload a site sent carries KNT (or KLT) key material."""
    from simulations.engine import simulate
    from tests.test_federation import tiny_config

    cfg = tiny_config(tmp_path, transform="knt", custody="server")
    cfg.privacy.key_dir = str(tmp_path / "keys")
    simulate(cfg)
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["config"]["privacy"]["transform"] == "knt"
    assert set(metrics["sites"]) == {"hospital-1", "hospital-2"}
    payloads = sorted((tmp_path / "audit").rglob("*.npz"))
    assert payloads
    for site in ("hospital-1", "hospital-2"):
        secret = read_key_file(tmp_path / "keys" / f"{site}.key")
        ring = KeyRing.from_secret(secret, cfg.model.latent_channels)
        for path in (tmp_path / "audit" / site).glob("*.npz"):
            with np.load(path) as npz:
                arrays = {k: npz[k] for k in npz.files if k != "__texts__"}
            assert find_key_material(arrays, [], secret, ring) == [], path.name


def test_site_adapters_start_as_identity_and_load_affine_only_checkpoints():
    """The nonlinear residual starts at zero; a checkpoint from before it existed (1x1 affine
    adapters only) loads into the same function."""
    from fedseg.models.adapters import SiteAdapter
    from fedseg.models.umn import UnifiedMappingNetwork

    x = torch.randn(2, C, 4, 4)
    torch.testing.assert_close(SiteAdapter(C)(x), x)
    net = UnifiedMappingNetwork(["a", "b"], C, 16, 1).eval()
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.01 * torch.randn_like(p))
    old = {
        k: v for k, v in net.state_dict().items() if ".expand." not in k and ".project." not in k
    }
    assert len(old) < len(net.state_dict())
    again = UnifiedMappingNetwork(["a", "b"], C, 16, 1).eval()
    again.load_state_dict(old)  # strict: no missing keys
    z = _latents(batch=2)
    with torch.no_grad():
        for p in net.modules():
            if isinstance(p, SiteAdapter):
                p.project.weight.zero_()
                p.project.bias.zero_()
        for a, b in zip(net(z, 1), again(z, 1), strict=True):
            torch.testing.assert_close(a, b)
