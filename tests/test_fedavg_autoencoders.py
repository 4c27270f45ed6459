"""Opt-in federated averaging of the autoencoders (``training.ae_federation = "fedavg"``)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from clients.app import check_weights_may_leave
from fedseg.config import ConfigError, RunConfig
from fedseg.data import load_federation
from fedseg.privacy.keys import KeyRing, read_key_file
from fedseg.privacy.leakcheck import find_key_material
from fedseg.site import SiteModels, fedavg_rounds, site_models_path, train_site_round
from simulations.engine import simulate
from tests.helpers import small_config


def fedavg_config(tmp_path: Path) -> RunConfig:
    cfg = small_config(
        tmp_path / "out", 2, [8, 8, 16, 16, 16], 16, ae_epochs=3, umn_epochs_per_round=1
    )
    cfg.training.ae_federation = "fedavg"
    cfg.training.ae_local_epochs = 2
    cfg.privacy.audit_dir = str(tmp_path / "audit")
    return cfg.validate()


def test_rounds_cover_the_epoch_budget(tmp_path):
    cfg = fedavg_config(tmp_path)
    assert fedavg_rounds(cfg) == 2  # 3 epochs in steps of 2
    cfg.training.ae_local_epochs = 1
    assert fedavg_rounds(cfg) == 3
    cfg.training.ae_local_epochs = 0
    with pytest.raises(ConfigError, match="ae_local_epochs"):
        cfg.validate()
    cfg.training.ae_local_epochs, cfg.training.ae_federation = 1, "gossip"
    with pytest.raises(ConfigError, match="ae_federation"):
        cfg.validate()


def test_a_round_starts_from_the_averaged_weights_and_rejects_misfits(tmp_path):
    cfg = fedavg_config(tmp_path)
    site = load_federation(cfg)[0]
    first, stats = train_site_round(cfg, site.train, None, 1, 2, site.name)
    assert stats.epochs == 2 and np.isfinite(stats.image_loss)
    state = first.state()
    second, _ = train_site_round(cfg, site.train, state, 2, 2, site.name)
    moved = [not torch.equal(state[k], v) for k, v in second.state().items()]
    assert any(moved)  # it trained from there ...
    torch.manual_seed(cfg.training.seed)
    fresh = SiteModels.build(cfg, site.train.num_classes).state()  # round 1's starting point

    def distance(a: dict, b: dict) -> float:
        return sum(((a[k] - b[k]) ** 2).sum().item() for k in a if a[k].is_floating_point())

    # ... and stayed near the weights it was given, not near a fresh initialisation
    assert distance(second.state(), state) < 0.5 * distance(second.state(), fresh)
    other = SiteModels.build(cfg, site.train.num_classes + 1).state()
    with pytest.raises(ValueError, match=f"site {site.name}: the averaged autoencoders"):
        train_site_round(cfg, site.train, other, 2, 2, site.name)
    with pytest.raises(ValueError, match="outside 1..2"):
        train_site_round(cfg, site.train, state, 3, 2, site.name)


def test_a_site_configured_local_refuses_to_send_its_weights(tmp_path):
    cfg = fedavg_config(tmp_path)
    check_weights_may_leave(cfg, "hospital-1")
    cfg.training.ae_federation = "local"
    with pytest.raises(PermissionError, match="hospital-1: refusing to exchange autoencoder"):
        check_weights_may_leave(cfg, "hospital-1")


@pytest.fixture(scope="module")
def fedavg_run(tmp_path_factory) -> RunConfig:
    cfg = fedavg_config(tmp_path_factory.mktemp("fedavg"))
    simulate(cfg)
    return cfg


def test_every_site_ends_with_the_same_averaged_autoencoders(fedavg_run):
    cfg = fedavg_run
    out = Path(cfg.out_dir)
    states = [
        torch.load(site_models_path(out, s), weights_only=True)["state"]
        for s in ("hospital-1", "hospital-2")
    ]
    assert states[0].keys() == states[1].keys()
    for key, value in states[0].items():
        assert torch.allclose(value.float(), states[1][key].float()), key
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["sites"]) == {"hospital-1", "hospital-2"}
    assert metrics["config"]["training"]["ae_federation"] == "fedavg"


def test_weights_sent_for_averaging_carry_no_key_material(fedavg_run):
    cfg = fedavg_run
    audit = Path(cfg.privacy.audit_dir)
    for site in ("hospital-1", "hospital-2"):
        secret = read_key_file(Path(cfg.out_dir) / "keys" / f"{site}.key")
        ring = KeyRing.from_secret(secret, cfg.model.latent_channels)
        rounds = sorted((audit / site).glob("*_train.npz"))
        assert len(rounds) == fedavg_rounds(cfg), f"{site} sent {len(rounds)} FedAvg replies"
        for dump in rounds:
            with np.load(dump) as payload:
                arrays = {k: payload[k] for k in payload.files if k != "__texts__"}
            assert any("encoder" in k for k in arrays)  # these really are the AE weights
            assert find_key_material(arrays, [], secret, ring) == [], dump.name
