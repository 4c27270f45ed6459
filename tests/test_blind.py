"""Blind aggregation (fedseg/privacy/blind.py): the sites recover the exact weighted average, and
what the server receives, adds and returns tells it nothing about any site's weights."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from fedseg.config import ConfigError
from fedseg.coordinator import Coordinator
from fedseg.data import load_federation
from fedseg.finetune import SiteFinetuner
from fedseg.privacy.blind import (
    FRACTION_BITS,
    BlindAggregationError,
    BlindSite,
    add_blinded,
    blind,
    flatten,
    unblind,
)
from fedseg.privacy.keys import generate_secret
from fedseg.site import site_blinder, site_transform, train_site
from simulations.in_process import split_train, weighted_mean
from tests.helpers import blind_config

SITES = ["hospital-1", "hospital-2", "hospital-3"]


def _mean(states: list[dict], weights: list[int]) -> dict:
    """Flower's weighted mean: what plain averaging (SplitFed, the reference) computes."""
    return weighted_mean(dict(enumerate(states)), dict(enumerate(weights)))


def _state(seed: int, scale: float = 0.1) -> dict[str, torch.Tensor]:
    """A model-like state: conv weights, a bias, batch-norm statistics."""
    g = torch.Generator().manual_seed(seed)
    return {
        "enc.conv.weight": torch.randn(16, 8, 3, 3, generator=g) * scale,
        "enc.conv.bias": torch.randn(16, generator=g) * scale,
        "enc.norm.running_var": torch.rand(16, generator=g) * 5 + 0.1,
        "dec.out.weight": torch.randn(3, 16, generator=g) * scale,
    }


def _round(secret, label, states, weights, sites=SITES):
    pairs = zip(states, weights, sites, strict=True)
    received = [blind(st, w, secret, label, s) for st, w, s in pairs]
    total = add_blinded(received)
    return received, total


def test_unmasked_sum_is_the_weighted_average_to_1e6():
    secret, weights = generate_secret(), [68, 70, 66]
    states = [_state(i) for i in range(3)]
    _, total = _round(secret, "run/0", states, weights)
    mean, n = unblind(total, secret, "run/0", SITES, states[0])
    assert n == sum(weights)
    plain = _mean(states, weights)
    a, b = flatten(mean), flatten(plain)
    assert np.linalg.norm(a - b) / np.linalg.norm(b) < 1e-6
    for name in plain:
        rel = (mean[name] - plain[name]).norm() / plain[name].norm()
        assert rel < 1e-6, (name, float(rel))
        assert mean[name].dtype == plain[name].dtype


def test_what_the_server_receives_is_uncorrelated_with_every_sites_weights():
    """Across 40 runs with different weights (and a fresh secret each), neither a site's masked
    vector nor the masked sum correlates with that site's weights, element by element or
    across runs at one position; and no received array equals or contains any site's weights."""
    runs, per_element, per_position = 40, [], {s: ([], []) for s in range(3)}
    for r in range(runs):
        secret = generate_secret()
        states = [_state(100 * r + i) for i in range(3)]
        received, total = _round(secret, f"run{r}/0", states, [68, 70, 66])
        server_view = [*received, total]
        for i, st in enumerate(states):
            w = flatten(st)
            fixed = np.rint(w * 2.0**FRACTION_BITS)  # the values before masking
            for arr in server_view:
                as_float = arr.view(np.int64).astype(np.float64)[:-1]
                per_element.append(np.corrcoef(as_float, fixed)[0, 1])
                assert not np.allclose(as_float / 2.0**FRACTION_BITS / 68, w, atol=1e-3)
                blob = arr.tobytes()
                for name, tensor in st.items():
                    if tensor.numel() >= 4:
                        for dtype in (np.float32, np.float64):
                            assert tensor.numpy().astype(dtype).tobytes() not in blob, name
            per_position[i][0].append(w[7])
            per_position[i][1].append(float(received[i].view(np.int64)[7]))
    n = flatten(_state(0)).size
    # |r| of independent data has sd 1/sqrt(n): 5 sd is a failure, not chance.
    assert max(abs(c) for c in per_element) < 5 / np.sqrt(n), max(per_element)
    for i, (w, y) in per_position.items():
        assert abs(np.corrcoef(w, y)[0, 1]) < 5 / np.sqrt(runs), i
    # The control: the same check finds the weights when nothing is masked.
    states = [_state(1), _state(2)]
    unmasked = np.rint(flatten(states[0]) * 68 * 2.0**FRACTION_BITS)
    assert np.corrcoef(unmasked, flatten(states[0]) * 2.0**FRACTION_BITS)[0, 1] > 0.99


def test_batch_norm_statistics_of_a_long_run_fit_the_fixed_point_range():
    """us-nerve's mask decoder input norm reached running variances of 8e4 after 400 epochs;
    with 68 images a site that overflowed 32 fractional bits and a site dropped out."""
    secret = generate_secret()
    states = [{"norm.running_var": torch.tensor([8.2e4, 1.0, 3e5]) * (1 + i)} for i in range(3)]
    weights = [5000, 68, 70]  # a large hospital too
    _, total = _round(secret, "r/9", states, weights)
    mean, _ = unblind(total, secret, "r/9", SITES, states[0])
    plain = _mean(states, weights)
    rel = (mean["norm.running_var"] - plain["norm.running_var"]).norm() / plain[
        "norm.running_var"
    ].norm()
    assert rel < 1e-6


def test_a_dropped_site_is_left_out_of_the_sum_not_corrupting_it():
    secret, weights = generate_secret(), [68, 70, 66]
    states = [_state(i) for i in range(3)]
    pairs = zip(states, weights, SITES, strict=True)
    received = [blind(st, w, secret, "r/3", s) for st, w, s in pairs]
    present = [0, 2]  # hospital-2 failed before its vector arrived
    total = add_blinded(received[i] for i in present)
    names = [SITES[i] for i in present]
    mean, n = unblind(total, secret, "r/3", names, states[0])
    plain = _mean([states[i] for i in present], [weights[i] for i in present])
    assert n == 134
    assert np.linalg.norm(flatten(mean) - flatten(plain)) / np.linalg.norm(flatten(plain)) < 1e-6
    # A server that names the wrong sites gets a refusal, never a wrong average.
    with pytest.raises(BlindAggregationError, match="does not decode"):
        unblind(total, secret, "r/3", SITES, states[0])
    # ...and so does a sum under another round's label, or another federation's secret.
    with pytest.raises(BlindAggregationError, match="does not decode"):
        unblind(total, secret, "r/4", names, states[0])
    with pytest.raises(BlindAggregationError, match="does not decode"):
        unblind(total, generate_secret(), "r/3", names, states[0])


def test_a_site_never_blinds_twice_under_one_label_and_refuses_sums_without_it():
    site = BlindSite(generate_secret(), "hospital-1")
    site.blind(_state(0), 10, "run/5")
    with pytest.raises(BlindAggregationError, match="twice"):
        site.blind(_state(1), 10, "run/5")
    with pytest.raises(BlindAggregationError, match="leaves this site out"):
        site.unblind(np.zeros(10, np.uint64), "run/5", ["hospital-2"], _state(0))
    assert "secret" in repr(site) and "b'" not in repr(site)


def test_bad_vectors_are_refused_by_name():
    secret = generate_secret()
    with pytest.raises(BlindAggregationError, match="not finite"):
        blind({"w": torch.tensor([1.0, float("nan")])}, 3, secret, "l", "hospital-1")
    with pytest.raises(BlindAggregationError, match="fixed-point range"):
        blind({"w": torch.tensor([1e9, 0.0])}, 3, secret, "l", "hospital-1")  # 3e9 > 2.1e9
    with pytest.raises(BlindAggregationError, match="not 1-D uint64"):
        add_blinded([np.zeros(4, np.float32)])
    with pytest.raises(BlindAggregationError, match="differ"):
        add_blinded([np.zeros(4, np.uint64), np.zeros(5, np.uint64)])


def test_blind_needs_the_federation_secret_and_client_custody(tmp_path):
    cfg = blind_config(tmp_path)
    cfg.privacy.key_scope = "site"
    with pytest.raises(ConfigError, match="key_scope"):
        cfg.validate()
    cfg = blind_config(tmp_path)
    cfg.privacy.custody = "server"
    with pytest.raises(ConfigError, match="custody"):
        cfg.validate()


def test_blind_split_training_in_process_equals_plain_averaging(tmp_path: Path):
    """The same seeds and batches: an epoch of blind split training ends with the models plain
    averaging ends with (to the fixed-point rounding), one model at every site. (Over more
    epochs the two drift apart as any two float orders of summation do: Adam turns a 1e-10
    difference in a near-zero gradient into a full-sized step.)"""
    results = {}
    for share in ("blind", "average"):
        cfg = blind_config(tmp_path / share, epochs=1)
        cfg.training.finetune_share = share
        tuners = {}
        for s in load_federation(cfg):
            torch.manual_seed(0)
            models, _ = train_site(cfg, s.train)
            key = tmp_path / "keys" / "federation.key"  # one secret for both runs
            blinder = site_blinder(cfg, key, s.name, create=True)
            tuners[s.name] = SiteFinetuner(
                cfg, s.train, models, site_transform(cfg, key, create=True), blinder
            )
        losses = split_train(Coordinator(cfg, list(tuners)), tuners)
        results[share] = (losses, [flatten(t.shared_state()) for t in tuners.values()])
    blind_losses, blind_states = results["blind"]
    plain_losses, plain_states = results["average"]
    assert all(np.array_equal(blind_states[0], s) for s in blind_states[1:])  # one model
    rel = np.linalg.norm(blind_states[0] - plain_states[0]) / np.linalg.norm(plain_states[0])
    assert rel < 1e-6, rel
    assert blind_losses == plain_losses


@pytest.fixture(scope="module")
def blind_run(tmp_path_factory):
    """The default mode through Flower and Ray: three hospitals, the third down in every
    aggregation round (a profile's dropout), every payload kept by the sites' audit."""
    from fedseg.config import HospitalConfig
    from simulations.engine import simulate

    tmp = tmp_path_factory.mktemp("blind")
    cfg = blind_config(tmp / "out", epochs=2)
    cfg.hospitals = [HospitalConfig(count=2), HospitalConfig(name="flaky", dropout=0.99)]
    cfg.privacy.audit_dir = str(tmp / "audit")
    cfg.baselines.centralized_unet = cfg.baselines.local_unet = False
    simulate(cfg.validate())
    return cfg


@pytest.mark.slow
def test_flower_blind_run_sums_the_sites_present_and_a_failed_site_rejoins(blind_run):
    import json

    from fedseg.site import SiteModels, site_models_path

    out = Path(blind_run.out_dir)
    metrics = json.loads((out / "metrics.json").read_text())
    assert not metrics["dropped"], metrics["dropped"]
    assert metrics["aggregation_absent"] == [["flaky"], ["flaky"]]  # down in both rounds
    assert set(metrics["sites"]) == {"synthetic-1", "synthetic-2", "flaky"}  # still scored
    assert len(metrics["share_bytes"]) == 2 and min(metrics["share_bytes"]) > 0
    saved = {
        s: SiteModels.load(blind_run, site_models_path(out, s))[0].state() for s in metrics["sites"]
    }
    shared = [
        k
        for k, v in saved["synthetic-1"].items()
        if k.startswith(("image.encoder.", "mask.decoder.")) and v.is_floating_point()
    ]
    assert shared and all(
        torch.equal(saved["synthetic-1"][k], saved["synthetic-2"][k]) for k in shared
    )
    # The sum over the two present sites is theirs alone: the absent site kept its own model.
    assert any(not torch.equal(saved["synthetic-1"][k], saved["flaky"][k]) for k in shared)


@pytest.mark.slow
def test_flower_blind_run_sends_no_readable_weights_and_stores_none(blind_run):
    """Every aggregation reply carries one masked uint64 vector and nothing else; the server's
    checkpoints hold the UMN only."""
    audit = Path(blind_run.privacy.audit_dir)
    shares = 0
    for site in ("synthetic-1", "synthetic-2"):
        for dump in sorted((audit / site).glob("*_train_finetune_forward.npz")):
            with np.load(dump) as payload:
                names = [n for n in payload.files if n != "__texts__"]
                assert not any(n.startswith("weights") for n in names), names
                if "blinded.sum" in names:
                    shares += 1
                    assert names == ["blinded.sum"] and payload["blinded.sum"].dtype == np.uint64
    assert shares == 4  # 2 sites x 2 epochs
    for path in (Path(blind_run.out_dir) / "checkpoints").glob("*.pt"):
        state = torch.load(path, weights_only=False, map_location="cpu")
        text = repr(list(state)) + repr(list(state.get("umn", {})))
        assert "encoder" not in text and "decoder" not in text, path


@pytest.mark.slow
def test_pipelined_split_training_takes_one_exchange_a_step(tmp_path: Path):
    """training.finetune_pipeline: each backward exchange brings the next batch's latents and
    takes the last batch's encoder gradient, so a site gets one forward request per epoch to
    start, one to share and one at the end, and one backward exchange a step."""
    import json

    from simulations.engine import simulate

    epochs = 2
    cfg = blind_config(tmp_path / "out", sites=2, epochs=epochs)
    cfg.training.finetune_pipeline = True
    cfg.privacy.audit_dir = str(tmp_path / "audit")
    cfg.baselines.centralized_unet = cfg.baselines.local_unet = False
    simulate(cfg.validate())
    metrics = json.loads((Path(cfg.out_dir) / "metrics.json").read_text())
    assert not metrics["dropped"], metrics["dropped"]
    assert all(np.isfinite(metrics["finetune_losses"]))
    steps = cfg.data.synthetic_train // cfg.training.batch_size
    audit = Path(cfg.privacy.audit_dir)
    for site in ("hospital-1", "hospital-2"):
        forward = sorted((audit / site).glob("*_train_finetune_forward.npz"))
        backward = sorted((audit / site).glob("*_train_finetune_backward.npz"))
        assert len(forward) == 2 * epochs + 1 and len(backward) == epochs * steps
        carried = 0
        for dump in backward:
            with np.load(dump) as payload:
                carried += any(n.startswith("latents.") for n in payload.files)
        assert carried == epochs * (steps - 1)  # every step but an epoch's last sends the next
