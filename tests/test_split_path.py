"""The split path as one pooled network: the architecture ceiling beside the centralized UNet."""

from __future__ import annotations

import pytest
import torch

from fedseg.data import load_federation
from fedseg.models.split_path import POOLED_SITE, SplitPathNet
from fedseg.models.umn import build_umn
from fedseg.reference_runs import centralized_unet
from fedseg.site import SiteModels
from tests.helpers import small_config


def _cfg(tmp_path):
    cfg = small_config(tmp_path, 2, [8, 16, 16, 32, 32], 32, ae_epochs=0, batch_size=4)
    cfg.model.local_skips = True
    cfg.model.decoder_input_norm = True
    cfg.model.umn_adapters = "shared"
    cfg.privacy.key_scope = "federation"
    cfg.training.umn_rounds = 0
    cfg.training.finetune_epochs = 2
    return cfg.validate()


def test_split_path_is_the_federated_layers_composed(tmp_path) -> None:
    cfg = _cfg(tmp_path)
    torch.manual_seed(0)
    net = SplitPathNet(cfg, 3).eval()
    # Its weights load, strictly, into the layers a site and the server train apart.
    site = SiteModels.build(cfg, 3)
    umn = build_umn(cfg.model, [POOLED_SITE])
    site.image_ae.encoder.load_state_dict(net.encoder.state_dict())
    site.mask_ae.decoder.load_state_dict(net.decoder.state_dict())
    umn.load_state_dict(net.umn.state_dict())
    for m in (site.image_ae, site.mask_ae, umn):
        m.eval()
    x = torch.randn(2, 1, 64, 64)
    with torch.no_grad():
        apart = site.mask_ae.decoder(
            umn(site.image_ae.encoder(x), 0), site.image_ae.encoder.local_features(x)
        )
        together = net(x)
    assert together.shape == (2, 3, 64, 64)
    torch.testing.assert_close(together, apart)


def test_split_path_trains_end_to_end_in_the_reference_harness(tmp_path) -> None:
    cfg = _cfg(tmp_path)
    cfg.baselines.epochs = 2
    sites = load_federation(cfg)
    block, examples = centralized_unet(cfg, sites, 0.0, reference="split-path")
    assert block["epochs"] == 2
    assert block["parameters"] == sum(p.numel() for p in SplitPathNet(cfg, 3).parameters())
    assert set(block["sites"]) == {s.name for s in sites} == set(examples)
    assert all(0.0 <= m["dice_mean"] <= 1.0 for m in block["sites"].values())
    # A gradient from the loss reaches all three parts, as in split training.
    net = SplitPathNet(cfg, 3)
    net(torch.randn(4, 1, 64, 64)).logsumexp(1).mean().backward()
    for part in (net.encoder.stages[0], net.umn, net.decoder.out):
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in part.parameters())


def test_unknown_reference_network_is_refused_by_name(tmp_path) -> None:
    cfg = _cfg(tmp_path)
    with pytest.raises(ValueError, match="'vit'"):
        centralized_unet(cfg, load_federation(cfg), 0.0, reference="vit")
