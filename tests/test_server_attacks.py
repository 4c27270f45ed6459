"""The curious server's attacks on split training: key alignment recovers a KLT key from
statistics alone, and both attacks run end to end on a tiny split-training run folder."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fedseg.attacks import server_inversion, surrogate
from fedseg.attacks.context import RunContext
from fedseg.config import AttackConfig
from fedseg.coordinator import Coordinator
from fedseg.data import load_federation
from fedseg.finetune import SiteFinetuner
from fedseg.site import site_blinder, site_models_path, site_transform, train_site
from simulations.in_process import split_train
from tests.helpers import blind_config


def _structured_latents(n: int, seed: int) -> torch.Tensor:
    """(n, 8, 6, 6) latents with a spatial layout (the modality's anatomy, the same for every
    image set) and anisotropic, skewed channels."""
    layout = torch.randn(1, 8, 6, 6, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(seed)
    scales = torch.linspace(2, 0.2, 8)[None, :, None, None]
    return layout + torch.randn(n, 8, 6, 6, generator=g).exp() * scales


def test_statistics_alone_recover_a_klt_key():
    """Auxiliary latents (other images) against keyed victim latents: the un-keying error of
    the estimate is small, and far below that of ignoring the key."""
    g = torch.Generator().manual_seed(1)
    q, _ = torch.linalg.qr(torch.randn(8, 8, generator=g, dtype=torch.float64))
    bias = torch.randn(8, generator=g, dtype=torch.float64)
    aux, victim = _structured_latents(400, 2), _structured_latents(400, 3)
    keyed = torch.einsum("oc,bchw->bohw", q.float(), victim) + bias.float()[None, :, None, None]
    estimate, fits = server_inversion.estimate_key([aux], [keyed])
    error = server_inversion.unkeying_error(server_inversion.unkey([keyed], estimate), [victim])
    assert error[0] < 0.15, (error, fits)
    assert server_inversion.unkeying_error([keyed], [victim])[0] > 1.0


def test_otsu_splits_a_bimodal_sample():
    sample = torch.cat([torch.randn(500) * 0.1, torch.randn(500) * 0.1 + 3])
    assert 0.5 < surrogate.otsu(sample) < 2.5


FAST = AttackConfig(inversion_epochs=2)


@pytest.fixture(scope="module")
def split_run(tmp_path_factory) -> Path:
    """What `fedseg run` leaves of split training with shared weights, made at library level."""
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("split-run")
    cfg = blind_config(out, sites=2, epochs=2)
    cfg.training.finetune_share = "average"
    cfg.validate()
    tuners = {}
    key = out / "keys" / "federation.key"
    for s in load_federation(cfg):
        models, _ = train_site(cfg, s.train)
        transform, blinder = (
            site_transform(cfg, key, create=True),
            site_blinder(cfg, key, s.name, create=True),
        )
        tuners[s.name] = SiteFinetuner(cfg, s.train, models, transform, blinder)
    coordinator = Coordinator(cfg, list(tuners))
    split_train(coordinator, tuners)
    for s in load_federation(cfg):
        tuners[s.name].models.save(site_models_path(out, s.name), s.train.class_names)
    coordinator.save_checkpoint(out / "checkpoints")
    (out / "metrics.json").write_text(json.dumps({"config": cfg.to_dict(), "mean": {}}))
    return out


@pytest.mark.slow
def test_server_inversion_runs_and_reports_every_figure(split_run):
    ctx = RunContext.load(split_run, FAST)
    result, md = server_inversion.run(ctx)
    assert result["server_holds_weights"]
    # the true key only meets the fp16 wire (large against these tiny latents' spread)
    assert max(result["key_error_true_key"]) < 0.1
    assert max(result["key_error_true_key"]) <= max(result["key_error"])
    assert len(result["key_error"]) == 3
    for q in result["reconstruction"].values():
        assert 0 <= q["ssim"] <= 1 and q["psnr"] > 0
    assert all(0 <= d <= 1 for d in result["dice"].values())
    assert (split_run / "figures" / "attacks" / "server-inversion.png").is_file()
    assert "Server-side inversion" in md


@pytest.mark.slow
def test_surrogate_attack_runs_on_what_a_blind_server_holds(split_run):
    ctx = RunContext.load(split_run, FAST)
    result, md = surrogate.run(ctx)
    assert 0 <= result["reconstruction"]["ssim"] <= 1
    assert 0 <= result["dice_server"] <= 1
    leak = result["gradient_mask_dice"]
    assert set(leak) == {"scale 0", "scale 1", "scale 2", "all foreground (reference)"}
    assert (split_run / "figures" / "attacks" / "surrogate.png").is_file()
