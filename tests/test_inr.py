"""Implicit neural obfuscation (``mode = "inr"``): the network, the mixing, what a hospital
releases, and a small federation through Flower (slow)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.losses import SSIMLoss

from fedseg.config import ConfigError, RunConfig, config_from_dict, method_name
from fedseg.obfuscation import SharedSet, check_not_copies, release_chunk
from fedseg.privacy import inr
from fedseg.protocol import LatentRequest
from fedseg.site import resolve_site


def _spec(**kw) -> inr.InrSpec:
    values = {"image_size": 32, "channels": 1, "code_dim": 8, "widths": (16, 8, 8)}
    return inr.InrSpec(**{**values, **kw})


def test_parameter_count_and_ratio_by_hand():
    spec = inr.InrSpec(image_size=128, channels=1, code_dim=32, widths=(48, 32, 24, 16, 12, 8))
    net = inr.NervRenderer(68, spec)
    assert spec.stem_size == 4
    stem = 32 * 48 * 16 + 48 * 16  # Linear(32, 48 x 4 x 4)
    w = spec.widths
    stages = sum(a * 4 * b * 9 + 4 * b for a, b in zip(w[:-1], w[1:], strict=True))
    head = 8 * 1 * 9 + 1
    codes = 68 * 32
    total = stem + stages + head + codes
    assert inr.parameter_count(net) == total == 135_097
    assert inr.compression_ratio(net) == pytest.approx(68 * 128 * 128 / total)
    assert inr.compression_ratio(net) > 6  # the target, with the default widths
    assert net(torch.arange(3)).shape == (3, 1, 128, 128)


def test_colour_spec_counts_every_channel_as_pixels():
    net = inr.NervRenderer(4, _spec(channels=3))
    assert net(torch.arange(4)).shape == (4, 3, 32, 32)
    assert inr.compression_ratio(net) == pytest.approx(4 * 3 * 32 * 32 / inr.parameter_count(net))


def test_stem_size_must_divide():
    with pytest.raises(ValueError, match="multiple of 2"):
        _ = inr.InrSpec(48, 1, 8, (8, 8, 8, 8, 8, 8)).stem_size  # 48 / 32


def test_mixing_at_rho_zero_is_the_identity():
    codes = torch.randn(10, 6)
    mixed = inr.mix_codes(codes, 0.0, torch.Generator().manual_seed(1))
    assert torch.equal(mixed, codes)


def test_mixing_changes_codes_by_a_fresh_r_per_release():
    codes = torch.randn(10, 6)
    secret = bytes(range(32))
    a = inr.mix_codes(codes, 0.08, inr.release_generator(secret, "run 1/site/0-10"))
    again = inr.mix_codes(codes, 0.08, inr.release_generator(secret, "run 1/site/0-10"))
    b = inr.mix_codes(codes, 0.08, inr.release_generator(secret, "run 2/site/0-10"))
    other_key = inr.mix_codes(codes, 0.08, inr.release_generator(bytes(32), "run 1/site/0-10"))
    assert not torch.allclose(a, codes)
    assert torch.equal(a, again)  # a re-sent chunk is the same release
    assert not torch.allclose(a, b) and not torch.allclose(a, other_key)
    # (I + rho R) E, R standard Gaussian from the release's generator
    r = torch.randn(10, 10, generator=inr.release_generator(secret, "run 1/site/0-10"))
    assert torch.allclose(a, (torch.eye(10) + 0.08 * r) @ codes, atol=1e-6)
    g = lambda: inr.release_generator(secret, "x")  # noqa: E731
    small = float((inr.mix_codes(codes, 0.04, g()) - codes).norm())
    large = float((inr.mix_codes(codes, 0.08, g()) - codes).norm())
    assert large == pytest.approx(2 * small, rel=1e-4)


def test_band_ssim_equals_monai_ssim_loss():
    torch.manual_seed(0)
    x, y = torch.rand(3, 1, 40, 36), torch.rand(3, 1, 40, 36)
    y2 = (x + 0.1 * torch.randn_like(x)).clamp(0, 1)
    ours, monai = inr.SeparableSsimLoss(), SSIMLoss(spatial_dims=2, data_range=1.0)
    for target in (y, y2):
        assert float(ours(x, target)) == pytest.approx(float(monai(x, target)), abs=1e-5)


def _images(n: int, size: int = 32, seed: int = 0) -> np.ndarray:
    """Blobs of different positions and sizes, z-scored per image as loaders store them."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    out = []
    for _ in range(n):
        cy, cx, r = rng.uniform(8, size - 8, 2).tolist() + [rng.uniform(3, 8)]
        im = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r)) + 0.05 * rng.random(
            (size, size)
        )
        out.append(((im - im.mean()) / im.std())[None])
    return np.stack(out).astype(np.float32)


def test_fit_reduces_one_minus_ssim():
    images = _images(8)
    net, stats = inr.fit(images, _spec(), steps=150, lr=1e-2, batch=4, seed=0)
    assert stats.loss_end < 0.6 * stats.loss_start
    assert stats.loss_end == pytest.approx(inr.ssim_loss(net, inr.to_unit(images)))
    assert stats.parameters == inr.parameter_count(net)
    assert stats.pixels == 8 * 32 * 32


def test_rendered_images_are_standardised_and_not_the_originals():
    images = _images(6)
    out, _ = inr.obfuscate(images, _spec(), 0.04, torch.Generator().manual_seed(0), 60, 1e-2, 3, 0)
    assert out.shape == images.shape and out.dtype == np.float32
    assert np.allclose(out.mean((1, 2, 3)), 0, atol=1e-4)
    assert np.allclose(out.std((1, 2, 3)), 1, atol=1e-3)
    check_not_copies(out, images)  # re-rendered, not the originals
    with pytest.raises(RuntimeError, match="correlates"):
        check_not_copies(images.copy(), images)


def test_chunk_bounds_are_equal_and_cover_the_set():
    assert inr.chunk_bounds(68, 64) == [(0, 34), (34, 68)]
    assert inr.chunk_bounds(10, 64) == [(0, 10)]
    assert inr.chunk_bounds(0, 8) == []
    bounds = inr.chunk_bounds(101, 8)
    assert bounds[0][0] == 0 and bounds[-1][1] == 101
    assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:], strict=False))
    assert {b - a for a, b in bounds} <= {7, 8}


def inr_config(out: Path, **privacy) -> RunConfig:
    cfg = RunConfig(name="tiny-inr", out_dir=str(out), mode="inr")
    cfg.data.synthetic_train, cfg.data.synthetic_test = 10, 4
    cfg.federation.num_sites = 2
    cfg.model.image_size = 32
    p = cfg.privacy
    p.inr_widths, p.inr_code_dim, p.inr_chunk, p.inr_steps, p.inr_batch = [16, 8, 8], 8, 6, 30, 4
    for key, value in privacy.items():
        setattr(p, key, value)
    cfg.baselines.unet_channels = [8, 16, 32]
    cfg.baselines.epochs = 1
    cfg.baselines.match_wall_clock = False
    cfg.baselines.local_unet = False
    cfg.overlays_per_site = 1
    return cfg.validate()


def test_a_site_releases_re_rendered_images_with_its_masks_unchanged(tmp_path):
    cfg = inr_config(tmp_path)
    setup = resolve_site(cfg, {"partition-id": 0})
    train = setup.split.train
    (a, b), *_ = inr.chunk_bounds(len(train), cfg.privacy.inr_chunk)
    arrays, fit = release_chunk(cfg, setup, LatentRequest("train", a, b), run_id=7)
    assert set(arrays) == {"images", "masks"}
    assert arrays["images"].dtype == np.float16
    assert arrays["images"].shape == train.images[a:b].shape
    assert np.array_equal(arrays["masks"], train.masks[a:b])  # masks shared unchanged
    assert not np.allclose(arrays["images"], train.images[a:b], atol=0.05)
    assert fit["parameters"] > 0 and fit["loss_end"] < fit["loss_start"]
    again, _ = release_chunk(cfg, setup, LatentRequest("train", a, b), run_id=7)
    assert np.array_equal(again["images"], arrays["images"])  # a retry is the same release
    other_run, _ = release_chunk(cfg, setup, LatentRequest("train", a, b), run_id=8)
    assert not np.array_equal(other_run["images"], arrays["images"])  # fresh R per release
    with pytest.raises(ValueError, match="not a chunk"):
        release_chunk(cfg, setup, LatentRequest("train", a, b + 1), run_id=7)


def test_a_site_not_in_inr_mode_refuses_to_release(tmp_path):
    cfg = inr_config(tmp_path)
    setup = resolve_site(cfg, {"partition-id": 0})
    cfg.mode = "latents"
    with pytest.raises(PermissionError, match="mode"):
        release_chunk(cfg, setup, LatentRequest("train", 0, 5), run_id=1)


def test_server_refuses_malformed_releases():
    shared = SharedSet((1, 8, 8), 3)
    good = {"images": np.zeros((2, 1, 8, 8), np.float16), "masks": np.zeros((2, 8, 8), np.uint8)}
    shared.add("a", 0, 2, good, {"fit_seconds": 1.0, "loss_end": 0.1})
    bad = [
        {"images": good["images"]},
        {**good, "images": np.zeros((3, 1, 8, 8), np.float16)},
        {**good, "images": np.zeros((2, 1, 8, 8), np.float32)},
        {**good, "masks": np.full((2, 8, 8), 3, np.uint8)},
        {**good, "images": np.full((2, 1, 8, 8), np.inf, np.float16)},
    ]
    for arrays in bad:
        with pytest.raises(ValueError):
            shared.add("a", 2, 4, arrays, {})
    assert len(shared) == 2


def test_config_mode_and_its_checks():
    cfg = config_from_dict({"mode": "inr", "privacy": {"inr_rho": 0.08}})
    assert cfg.mode == "inr" and method_name(cfg) == "implicit neural obfuscation (rho 0.08)"
    with pytest.raises(ConfigError, match="mode"):
        config_from_dict({"mode": "images"})
    with pytest.raises(ConfigError, match="inr_rho"):
        config_from_dict({"mode": "inr", "privacy": {"inr_rho": -0.1}})
    with pytest.raises(ConfigError, match="inr_widths"):  # 7 stages: 128 / 2**7 is no grid
        config_from_dict({"privacy": {"inr_widths": [8] * 9}, "model": {"image_size": 160}})


@pytest.mark.slow
def test_inr_federation_through_flower(tmp_path):
    """Two synthetic hospitals through Flower and Ray: chunks released and checked, a UNet
    trained on them and scored by each site; no key material and no original image left."""
    from fedseg.data import site_for_partition
    from fedseg.privacy.keys import KeyRing, read_key_file
    from fedseg.privacy.leakcheck import find_key_material
    from simulations.engine import simulate

    cfg = inr_config(tmp_path / "out")
    cfg.privacy.audit_dir = str(tmp_path / "audit")
    simulate(cfg)
    out = Path(cfg.out_dir)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["method"] == "implicit neural obfuscation (rho 0.04)"
    assert set(metrics["sites"]) == {"hospital-1", "hospital-2"}
    assert all(0 <= s["dice_mean"] <= 1 for s in metrics["sites"].values())
    inr_info = metrics["inr"]
    assert inr_info["images"] == 20 and len(inr_info["chunks"]) == 4  # 2 chunks of 5 per site
    assert metrics["timing_s"]["training_total"] > 0
    assert (out / "checkpoints" / "inr_shared.npz").is_file()
    assert (out / "report.md").is_file()

    secret = read_key_file(out / "keys" / "federation.key")
    ring = KeyRing.from_secret(secret, cfg.model.latent_channels)
    types = set()
    for i, site in enumerate(("hospital-1", "hospital-2")):
        train = site_for_partition(cfg, i).train
        released = []
        for dump in sorted((tmp_path / "audit" / site).glob("*.npz")):
            types.add(dump.stem.split("_", 1)[1])
            with np.load(dump) as payload:
                arrays = {k: payload[k] for k in payload.files if k != "__texts__"}
                texts = json.loads(str(payload["__texts__"]))
            assert find_key_material(arrays, texts, secret, ring) == [], dump.name
            if "release.images" in arrays:
                released.append((arrays["release.images"], arrays["release.masks"]))
        images = np.concatenate([r[0] for r in released]).astype(np.float32)
        masks = np.concatenate([r[1] for r in released])
        assert np.array_equal(masks, train.masks)  # every mask, unchanged, in order
        check_not_copies(images, train.images)  # every image re-rendered
        for original in train.images:  # and none of the originals is among them
            assert not any(np.allclose(original, im, atol=1e-2) for im in images)
    assert types == {"train_autoencoders", "query_inr_release", "evaluate_network"}

    # The attack suite on this mode: what applies runs on the server's view; the rest refuses.
    from typer.testing import CliRunner

    from fedseg.cli import app

    result = CliRunner().invoke(app, ["attack", "--run", str(out), "--attack", "all"])
    assert result.exit_code == 0, result.output
    attacks = json.loads((out / "metrics.json").read_text())["attacks"]
    assert set(attacks) == {"inversion", "membership"}  # reid: synthetic images are patients
    shared = attacks["inversion"]["inr"]
    assert 0 < shared["shared image"]["ssim"] < 1 and shared["n"] == 10
    assert 0 <= attacks["membership"]["loss_threshold"]["auc"] <= 1
    refused = CliRunner().invoke(app, ["attack", "--run", str(out), "--attack", "key-recovery"])
    assert refused.exit_code == 2 and "does not apply" in refused.output.replace("\n", " ")
    figure = CliRunner().invoke(app, ["attack", "--run", str(out), "--attack", "tradeoff"])
    assert figure.exit_code == 0, figure.output
    assert "inr (rho 0.04)" in figure.output
    assert (out / "figures" / "attacks" / "tradeoff.png").is_file()
