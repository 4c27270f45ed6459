"""The performance work: reference-sized UMN, both UMNs through the coordinator, fast KLT, suite."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fedseg.config import ConfigError, RunConfig, config_from_dict
from fedseg.coordinator import Coordinator
from fedseg.models.autoencoder import latent_shapes
from fedseg.models.umn import UnifiedMappingNetwork, build_umn
from fedseg.models.umn_reference import ReferenceMappingNetwork
from fedseg.privacy.keys import KeyRing, generate_secret
from fedseg.privacy.klt import LatentTransform, apply_klt, invert_klt
from fedseg.wire import pack

ROOT = Path(__file__).resolve().parents[1]
REFERENCE_PARAMS = 58.8e6


def test_reference_umn_has_the_papers_size():
    cfg = RunConfig()
    cfg.model.umn_arch = "reference"
    umn = build_umn(cfg.model, ["a", "b", "c"])
    assert isinstance(umn, ReferenceMappingNetwork)
    params = sum(p.numel() for p in umn.parameters())
    assert abs(params - REFERENCE_PARAMS) / REFERENCE_PARAMS < 0.03, params
    fast = build_umn(RunConfig().model, ["a", "b", "c"])
    assert type(fast) is UnifiedMappingNetwork
    assert sum(p.numel() for p in fast.parameters()) < params / 20


def test_umn_arch_is_a_checked_config_field():
    cfg = config_from_dict({"model": {"umn_arch": "reference"}})
    assert cfg.model.umn_arch == "reference"
    with pytest.raises(ConfigError, match="umn_arch"):
        config_from_dict({"model": {"umn_arch": "huge"}})


def _tiny_cfg(tmp_path: Path, arch: str) -> RunConfig:
    cfg = RunConfig(name="tiny", out_dir=str(tmp_path / arch))
    cfg.model.image_size = 64
    cfg.model.latent_channels = 16
    cfg.model.umn_arch = arch
    cfg.model.umn_width, cfg.model.umn_blocks = 16, 1
    cfg.training.umn_rounds, cfg.training.umn_epochs_per_round = 1, 1
    cfg.training.batch_size = 4
    cfg.training.threads = 1
    cfg.privacy.transform = "none"
    return cfg


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["fast", "reference"])
def test_both_archs_train_map_and_checkpoint_through_the_coordinator(tmp_path, arch):
    torch.set_num_threads(1)
    cfg = _tiny_cfg(tmp_path, arch)
    sites = ["a", "b"]
    shapes = latent_shapes(cfg.model.image_size, cfg.model.latent_channels)
    gen = torch.Generator().manual_seed(0)
    coord = Coordinator(cfg, sites)
    for site in sites:
        image = [torch.randn(4, *s, generator=gen) for s in shapes]
        mask = [
            2 * z[:, :1].expand_as(z) + 0.1 * torch.randn(z.shape, generator=gen) for z in image
        ]
        assert coord.add_chunk(site, {**pack(image, "image"), **pack(mask, "mask")}) == 4
    loss = coord.train_round()
    assert np.isfinite(loss) and coord.round == 1
    query = pack([torch.randn(2, *s, generator=gen) for s in shapes], "image")
    answer = coord.map_query("b", query)
    assert [answer[f"mask{s}"].shape[1:] for s in range(3)] == [tuple(s) for s in shapes]
    assert all(a.dtype == np.float16 for a in answer.values())
    path = coord.save_checkpoint(tmp_path / arch / "checkpoints")
    again = Coordinator(cfg, sites)
    again.restore_round(torch.load(path, weights_only=True))
    assert again.round == 1 and type(again.umn) is type(coord.umn)
    second = again.map_query("b", query)
    for name in answer:
        np.testing.assert_array_equal(second[name], answer[name])


@pytest.mark.parametrize("channels_last", [True, False])
def test_fast_klt_is_exact_and_matches_the_reference_form(channels_last):
    ring = KeyRing.from_secret(generate_secret(), 32)
    t = LatentTransform(ring)
    gen = torch.Generator().manual_seed(1)
    z = [torch.randn(3, *s, generator=gen) * 4 for s in latent_shapes(128, 32)]
    z.append(torch.randn(2, 32, 1, 1, generator=gen))  # a 1x1 map: both layouts at once
    if channels_last:
        z = [x.contiguous(memory_format=torch.channels_last) for x in z]
    keys = [*ring.keys["image"], ring.keys["image"][0]]
    t._forward["image"].append(t._forward["image"][0])
    t._inverse["image"].append(t._inverse["image"][0])
    keyed = t.forward(z, "image")
    for k, x, y in zip(keys, z, keyed, strict=True):
        torch.testing.assert_close(y, apply_klt(x, k), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(invert_klt(y, k), x, atol=1e-5, rtol=0)
    back = t.inverse(keyed, "image")
    assert max(float((a - b).abs().max()) for a, b in zip(back, z, strict=True)) < 1e-5
    # The keyed maps really are mixed: no channel survives unchanged.
    assert float((keyed[0] - z[0]).abs().mean()) > 0.5
    # fp64 and fp16 inputs keep their dtype (a key is prepared per dtype).
    z64 = [x.double() for x in z[:3]]
    assert t.inverse(t.forward(z64, "mask"), "mask")[0].dtype == torch.float64
    assert t.forward([x.half() for x in z[:3]], "mask")[0].dtype == torch.float16


def test_wire_pack_is_c_ordered_from_channels_last_latents():
    z = torch.randn(2, 8, 4, 4).contiguous(memory_format=torch.channels_last)
    arr = pack([z], "image")["image0"]
    assert arr.flags["C_CONTIGUOUS"]
    np.testing.assert_array_equal(arr, z.numpy().astype(np.float16))


@pytest.mark.slow
def test_suite_quick_json_has_the_expected_figures(tmp_path):
    out = tmp_path / "quick.json"
    args = ["--quick", "--out", str(out), "--variants", "fast", "--repeats", "3", "--warmup", "1"]
    command = [sys.executable, str(ROOT / "benchmarks" / "suite.py"), *args, "--image-size", "64"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "server mapping" in done.stdout and "KLT per query" in done.stdout
    result = json.loads(out.read_text())
    assert result["meta"]["threads"] == 1 and "load_avg_start" in result["meta"]
    fast = result["archs"]["fast"]
    for batch in ("batch1", "batch16"):
        for part in ("client_encode_transform", "server_map", "client_inverse_decode"):
            assert fast[batch][part]["median_ms"] > 0
            assert fast[batch][part]["p90_ms"] >= fast[batch][part]["median_ms"]
        assert fast[batch]["images_per_s"] > 0
    assert fast["umn_params"] == sum(
        p.numel() for p in build_umn(RunConfig().model, ["a", "b", "c"]).parameters()
    )
    assert fast["umn_macs_256"] > 3 * fast["umn_macs"] > 0
    assert fast["umn_train_images_per_s"] > 0 and fast["ae_train_images_per_s"] > 0
    assert fast["peak_rss_mib"] > 0
    assert result["wire"]["256"]["fraction_of_reference"] <= 0.25
    assert result["klt"]["round_trip_max_abs_error"] < 1e-5
    assert result["machine"]["matmul_gflops"] > 0
