"""Split training with shared encoders/decoders (``training.finetune_share``) and without
pre-training (``ae_epochs = 0``, ``umn_rounds = 0``): the sites end with one model, weights are
averaged correctly, bad weights are refused by name, and a site that did not opt in refuses."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from fedseg.checkpoint import LATENTS_NAME, checkpoint_dir
from fedseg.config import ConfigError
from fedseg.coordinator import Coordinator
from fedseg.data import load_federation
from fedseg.finetune import SiteFinetuner, batch_norm_keys
from fedseg.privacy.keys import KeyRing, read_key_file
from fedseg.privacy.leakcheck import find_key_material
from fedseg.site import SiteModels, site_models_path, site_transform, train_site
from fedseg.split_training import check_finetune_share
from simulations.engine import simulate
from simulations.in_process import split_train, weighted_mean
from tests.helpers import small_config


def _split_config(out: Path, share: str, sites: int = 3):
    cfg = small_config(out, sites, [8, 16, 16, 32, 32], 32, ae_epochs=0, batch_size=4)
    cfg.training.umn_rounds = 0
    cfg.training.finetune_epochs = 6
    cfg.training.finetune_lr = 2e-3
    cfg.training.finetune_share = share
    return cfg.validate()


def _tuners(cfg, keys: Path):
    tuners = {}
    for s in load_federation(cfg):
        models, stats = train_site(cfg, s.train)
        assert stats.epochs == 0  # no pre-training: the seeded initialisation
        transform = site_transform(cfg, keys / f"{s.name}.key", create=True)
        tuners[s.name] = SiteFinetuner(cfg, s.train, models, transform)
    return tuners


def test_shared_split_training_from_scratch_ends_with_one_model_and_learns(tmp_path):
    share = "average"
    cfg = _split_config(tmp_path, share)
    tuners = _tuners(cfg, tmp_path / "keys")
    first = {k: v.clone() for k, v in next(iter(tuners.values())).shared_state().items()}
    coord = Coordinator(cfg, list(tuners))
    losses = split_train(coord, tuners)
    assert np.mean(losses[-2:]) < losses[0] - 0.1, losses
    states = [t.shared_state() for t in tuners.values()]
    for name, value in states[0].items():
        assert all(torch.equal(value, other[name]) for other in states[1:]), name
        if value.is_floating_point() and value.numel() > 1 and "running" not in name:
            assert not torch.equal(value, first[name]), f"{name} never trained"


def test_without_sharing_each_site_keeps_its_own_model(tmp_path):
    cfg = _split_config(tmp_path, "none", sites=2)
    cfg.training.finetune_epochs = 2
    tuners = _tuners(cfg, tmp_path / "keys")
    split_train(Coordinator(cfg, list(tuners)), tuners)
    a, b = (t.shared_state() for t in tuners.values())
    assert any(not torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("local", [True, False])
def test_batch_norms_stay_at_each_site_unless_told_to_share(tmp_path, local):
    """FedBN (``training.local_batch_norm``): batch-norm weights and statistics never enter
    the shared state, so they end different at each site; shared otherwise."""
    cfg = _split_config(tmp_path, "average", sites=2)
    cfg.training.finetune_epochs = 2
    cfg.training.local_batch_norm = local
    a, b = _tuners(cfg, tmp_path / "keys").values()
    norms = batch_norm_keys(a.models)
    assert any(k.endswith("running_var") for k in norms)
    assert any(k.startswith("image.encoder.") for k in norms)
    assert any(k.startswith("mask.decoder.") for k in norms)
    split_train(
        Coordinator(cfg, ["synthetic-1", "synthetic-2"]), {"synthetic-1": a, "synthetic-2": b}
    )
    shared = set(a.shared_state())
    assert any("conv" in k or k.endswith(".0.weight") for k in shared)
    full_a, full_b = a.models.state(), b.models.state()
    assert all(torch.equal(full_a[k], full_b[k]) for k in shared)
    statistics = [
        k for k in norms if k.startswith(("image.encoder.", "mask.decoder.")) and "running" in k
    ]
    if local:
        assert not shared & norms
        assert all(not torch.equal(full_a[k], full_b[k]) for k in statistics)
    else:
        assert set(statistics) <= shared


def test_the_mean_is_flowers_weighted_mean():
    states = {
        "a": {"w": torch.tensor([0.0, 3.0]), "n": torch.tensor(10)},
        "b": {"w": torch.tensor([3.0, 6.0]), "n": torch.tensor(20)},
    }
    mean = weighted_mean(states, {"a": 2, "b": 1})
    assert torch.allclose(mean["w"], torch.tensor([1.0, 4.0]))
    assert float(mean["n"]) == pytest.approx(40 / 3)  # a site casts it back to its own dtype


def test_bad_shared_weights_are_refused_by_name(tmp_path):
    cfg = _split_config(tmp_path, "average", sites=1)
    tuner = next(iter(_tuners(cfg, tmp_path / "keys").values()))
    good = tuner.shared_state()
    name = next(k for k, v in good.items() if v.is_floating_point() and v.numel() > 1)
    with pytest.raises(ValueError, match="missing"):
        tuner.adopt({k: v for k, v in good.items() if k != name})
    with pytest.raises(ValueError, match=f"{name}: shape"):
        tuner.adopt({**good, name: torch.zeros(3)})
    nan = good[name].clone()
    nan.view(-1)[0] = float("nan")
    with pytest.raises(ValueError, match=f"{name} is not finite"):
        tuner.adopt({**good, name: nan})
    assert torch.equal(tuner.shared_state()[name], good[name])  # nothing half-adopted


def test_a_site_that_did_not_opt_in_refuses_to_share(tmp_path):
    cfg = _split_config(tmp_path, "none", sites=1)
    with pytest.raises(PermissionError, match="finetune_share is 'none'"):
        check_finetune_share(cfg, "hospital-1")
    check_finetune_share(_split_config(tmp_path, "average", sites=1), "hospital-1")


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("finetune_share", "ring", "finetune_share"),
        ("finetune_epochs", 0, "ae_epochs = 0"),
        ("finetune_share", "cyclic", "'blind', 'none' or 'average'"),  # removed
    ],
)
def test_split_settings_are_checked(tmp_path, field, value, message):
    cfg = _split_config(tmp_path, "average", sites=1)
    setattr(cfg.training, field, value)
    with pytest.raises(ConfigError, match=message):
        cfg.validate()


@pytest.fixture(scope="module")
def averaged_run(tmp_path_factory):
    """Through Flower and Ray: no pre-training, no training latents, SplitFed averaging."""
    tmp = tmp_path_factory.mktemp("split-average")
    cfg = small_config(tmp / "out", 2, [8, 8, 16, 16, 16], 16, ae_epochs=0, batch_size=4)
    cfg.training.umn_rounds = 0
    cfg.training.finetune_epochs = 2
    cfg.training.finetune_share = "average"
    cfg.privacy.audit_dir = str(tmp / "audit")
    cfg.validate()
    simulate(cfg)
    return cfg


@pytest.mark.slow
def test_flower_split_training_shares_one_model_and_keeps_no_latents(averaged_run):
    cfg = averaged_run
    out = Path(cfg.out_dir)
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["sites"]) == {"hospital-1", "hospital-2"} and not metrics["dropped"]
    assert len(metrics["finetune_losses"]) == 2
    assert metrics["train_latent_bytes"] == 0
    assert not (checkpoint_dir(cfg) / LATENTS_NAME).exists()
    saved = [SiteModels.load(cfg, site_models_path(out, s))[0] for s in metrics["sites"]]
    shared = [
        {k: v for k, v in m.state().items() if k.startswith(("image.encoder.", "mask.decoder."))}
        for m in saved
    ]
    assert all(torch.equal(v, shared[1][k]) for k, v in shared[0].items())


@pytest.mark.slow
def test_flower_weight_exchanges_carry_no_key_material(averaged_run):
    cfg = averaged_run
    audit = Path(cfg.privacy.audit_dir)
    for site in ("hospital-1", "hospital-2"):
        secret = read_key_file(Path(cfg.out_dir) / "keys" / f"{site}.key")
        ring = KeyRing.from_secret(secret, cfg.model.latent_channels)
        shares = []
        for dump in sorted((audit / site).glob("*_train_finetune_forward.npz")):
            with np.load(dump) as payload:
                arrays = {k: payload[k] for k in payload.files if k != "__texts__"}
            if any(k.startswith("weights.") for k in arrays):
                shares.append(dump)
            assert find_key_material(arrays, [], secret, ring) == [], dump.name
        assert len(shares) == cfg.training.finetune_epochs  # one share per epoch


def test_shared_adapters_serve_every_site_with_one_set(tmp_path):
    from fedseg.models.umn import build_umn

    cfg = _split_config(tmp_path, "average", sites=3)
    cfg.privacy.key_scope = "federation"
    cfg.model.umn_adapters = "shared"
    cfg.validate()
    sites = ["a", "b", "c"]
    shared = build_umn(cfg.model, sites)
    cfg.model.umn_adapters = "site"
    per_site = build_umn(cfg.model, sites)
    assert len(shared.in_adapters[0]) == 1 and len(per_site.in_adapters[0]) == 3
    z = [torch.randn(2, c, h, w) for c, h, w in [(16, 8, 8), (16, 4, 4), (16, 2, 2)]]
    shared.eval()
    with torch.no_grad():
        shared.in_adapters[0][0].bias.add_(0.5)  # a trained adapter, not the identity
        out_a, out_c = shared(z, 0), shared(z, 2)
    assert all(torch.equal(x, y) for x, y in zip(out_a, out_c, strict=True))


def test_shared_adapters_need_one_latent_space(tmp_path):
    cfg = _split_config(tmp_path, "average", sites=1)
    cfg.model.umn_adapters = "shared"
    with pytest.raises(ConfigError, match="key_scope = 'federation'"):
        cfg.validate()
    cfg.privacy.custody = "server"
    cfg.validate()


def test_federation_key_is_one_file_made_once_even_by_sites_starting_together(tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    from fedseg.privacy.keys import load_or_create_key
    from fedseg.site import resolve_site

    cfg = _split_config(tmp_path, "average", sites=2)
    cfg.privacy.key_scope = "federation"
    paths = {resolve_site(cfg, {"partition-id": i}).key_file for i in range(2)}
    assert paths == {tmp_path / "keys" / "federation.key"}
    target = tmp_path / "race" / "federation.key"
    with ThreadPoolExecutor(8) as pool:
        secrets = set(pool.map(lambda _: load_or_create_key(target), range(16)))
    assert len(secrets) == 1
    assert oct(target.stat().st_mode & 0o777) == oct(0o600)
    assert [p.name for p in target.parent.iterdir()] == ["federation.key"]  # no leftovers


@pytest.mark.slow
def test_flower_sharing_after_pre_training_ends_with_one_model(tmp_path):
    """The other combination: pre-trained AEs and a latent-MSE round, then shared split
    training (the paper preset's hippocampus scenario fine-tunes after its UMN)."""
    cfg = small_config(tmp_path / "out", 2, [8, 8, 16, 16, 16], 16, ae_epochs=1, batch_size=4)
    cfg.training.umn_epochs_per_round = 1
    cfg.training.finetune_epochs = 2
    cfg.training.finetune_share = "average"
    cfg.validate()
    simulate(cfg)
    out = Path(cfg.out_dir)
    metrics = json.loads((out / "metrics.json").read_text())
    assert not metrics["dropped"] and metrics["train_latent_bytes"] > 0
    saved = [SiteModels.load(cfg, site_models_path(out, s))[0].state() for s in metrics["sites"]]
    shared = [k for k in saved[0] if k.startswith(("image.encoder.", "mask.decoder."))]
    assert shared and all(torch.equal(saved[0][k], saved[1][k]) for k in shared)
    # The parts split training does not touch stay each site's own pre-trained ones.
    assert any(not torch.equal(saved[0][k], saved[1][k]) for k in saved[0] if k not in shared)


def test_with_one_key_the_umn_maps_alike_in_either_custody(tmp_path):
    """Split training from scratch: the server takes the UMN's input bases from the first batch
    it maps, so the trunk sees the same centred coordinates whether it holds the key (server
    custody, un-keyed latents) or not (client custody, the key's bias still on): the mapped
    latents agree up to the fp16 wire. Without those bases they differ by the key's bias."""
    from fedseg.coordinator import key_path
    from fedseg.wire import unpack

    cfg = _split_config(tmp_path, "average", sites=2)
    cfg.privacy.key_scope = "federation"
    cfg.model.umn_adapters = "shared"
    keys = tmp_path / "keys"
    cfg.privacy.key_dir = str(keys)
    site = load_federation(cfg.validate())[0]
    models, _ = train_site(cfg, site.train)
    transform = site_transform(cfg, key_path(keys, site.name, "federation"), create=True)
    tuner = SiteFinetuner(cfg, site.train, models, transform)
    sent = tuner.forward(0, 0)
    shapes = tuner.shapes

    def first_map(custody: str, canonical: bool = True) -> list[torch.Tensor]:
        cfg.privacy.custody = custody
        cfg.model.canonical_adapters = canonical
        coord = Coordinator(cfg, [s.name for s in load_federation(cfg)], key_dir=keys)
        with torch.no_grad():
            mapped = unpack(coord.finetune_forward(site.name, sent), "mask", shapes)
        assert coord.umn.has_input_basis(site.name) == canonical
        # What the server produced before keying (client custody: it never keys)
        return transform.inverse(mapped, "mask") if custody == "server" else mapped

    server, client = first_map("server"), first_map("client")
    for s, c in zip(server, client, strict=True):
        scale = float(s.abs().max())
        assert float((s - c).abs().max()) < 0.02 * scale
    server, client = first_map("server", canonical=False), first_map("client", canonical=False)
    gaps = [float((s - c).abs().max() / s.abs().max()) for s, c in zip(server, client, strict=True)]
    assert max(gaps) > 0.1, gaps


def test_a_flat_first_batch_leaves_the_input_bases_for_the_next_one(tmp_path):
    """Blank images give constant latents: no axes to take, and a basis scaled by their zero
    spread would blow the trunk's input up. The server waits for a batch with some spread."""
    from fedseg.wire import pack

    cfg = _split_config(tmp_path, "average", sites=1)
    coord = Coordinator(cfg, ["a"])
    shapes = coord.shapes
    flat = [torch.full((2, *shape), 0.3) for shape in shapes]
    coord.finetune_forward("a", pack(flat, "image"))
    assert not coord.umn.has_input_basis("a")
    varied = [torch.randn(2, *shape) for shape in shapes]
    mapped = coord.finetune_forward("a", pack(varied, "image"))
    assert coord.umn.has_input_basis("a")
    assert all(np.isfinite(v).all() for v in mapped.values())
