"""The server trusts no reply: every payload is checked against what was asked for, and a bad
one is refused for its step with the reason recorded, while the run goes on (issue 24)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord

import strategies.common as common
from fedseg.wire import MagnitudeGuard, WireError, check_fields, unpack
from strategies.evaluation import checked_metrics
from tests.helpers import blind_config

SHAPES = [(4, 8, 8), (4, 4, 4), (4, 2, 2)]


def _latents(n: int, scale: float = 1.0, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        f"image{s}": (scale * rng.standard_normal((n, *shape))).astype(np.float16)
        for s, shape in enumerate(SHAPES)
    }


def test_unknown_fields_are_refused_by_name():
    arrays = {**_latents(2), "smuggled": np.zeros(10, np.float16)}
    with pytest.raises(WireError, match="smuggled"):
        check_fields(arrays, ("image",), len(SHAPES))
    check_fields(_latents(2), ("image",), len(SHAPES))  # exactly the agreed fields pass


@pytest.mark.parametrize(
    ("n", "kwargs", "message"),
    [
        (0, {}, "no items"),
        (20, {"max_items": 2}, "limit is 2"),
        (20, {"items": 2}, "20 items, 2 were asked for"),
    ],
)
def test_item_counts_are_checked_against_the_request(n, kwargs, message):
    with pytest.raises(WireError, match=message):
        unpack(_latents(n), "image", SHAPES, **kwargs)
    assert unpack(_latents(2), "image", SHAPES, items=2)[0].shape[0] == 2


def test_the_magnitude_guard_refuses_x100_and_keeps_its_reference():
    guard = MagnitudeGuard(bound=10.0, warmup=3)
    for seed in range(5):  # honest payloads vary a little: all pass
        guard.check("a", _latents(4, scale=1.0 + 0.2 * seed, seed=seed))
    with pytest.raises(WireError, match="image0.*x the largest this site sent before"):
        guard.check("a", _latents(4, scale=100.0, seed=9))
    guard.check("a", _latents(4, scale=1.5, seed=10))  # the refused one did not move the bar
    guard.check("b", _latents(4, scale=100.0))  # each site has its own reference
    MagnitudeGuard(bound=0).check("a", _latents(4, scale=1e4))  # 0 = off


def test_the_magnitude_guard_lets_shrinking_gradients_vary():
    """Honest gradients fall by orders of magnitude over training, then vary from batch to
    batch: a late batch 14x the recent ones is still far below the site's early ones."""
    guard = MagnitudeGuard(bound=10.0, warmup=3)
    for step in range(40):
        guard.check("a", _latents(4, scale=10.0 ** (-step / 8), seed=step))  # 1 -> 1e-5
    guard.check("a", _latents(4, scale=14e-5, seed=41))  # a hard batch late in training
    with pytest.raises(WireError, match="magnitude"):
        guard.check("a", _latents(4, scale=100.0, seed=42))  # x100 the early peak


def test_reply_size_is_checked_on_the_bytes_before_any_conversion(monkeypatch):
    monkeypatch.setattr(common, "MAX_PAYLOAD_BYTES", 1000)
    record = ArrayRecord({"image0": Array(np.zeros(2000, np.uint8))})
    converted = []
    monkeypatch.setattr(Array, "numpy", lambda self: converted.append(1))
    with pytest.raises(WireError, match=r"record of 2\d\d\d bytes exceeds 1000"):
        common.arrays_of(record)
    assert not converted
    with pytest.raises(WireError, match="no 'grad' record"):
        common.arrays_of(None, "grad")


def _metrics_reply(metrics: dict | str) -> str:
    return metrics if isinstance(metrics, str) else json.dumps(metrics)


@pytest.mark.parametrize(
    ("metrics", "message"),
    [
        ("{not json", "no metrics JSON"),
        ({"dice_mean": 1.7, "dice": {"a": 0.5}, "n_test": 4}, "outside"),
        ({"dice_mean": 0.5, "dice": {"a": 0.5}, "hd95_mean": -3.0, "n_test": 4}, "not a score"),
        ({"dice_mean": 0.5, "dice": {"a": 0.5}, "n_test": 40}, "scored 40 images, registered 4"),
        ({"dice_mean": 0.5, "dice": {"a": 0.5}, "n_test": 4}, "SiteScores: missing asd"),
    ],
)
def test_forged_metrics_are_refused(metrics, message):
    with pytest.raises(ValueError, match=message):
        checked_metrics(_metrics_reply(metrics), n_test=4)


def test_honest_metrics_pass():
    honest = {"dice_mean": 0.8, "dice": {"a": 0.8, "b": None}, "hd95_mean": 3.0, "n_test": 4}
    honest |= {"hd95": {"a": 3.0, "b": None}, "asd": {"a": 1.0, "b": None}, "asd_mean": 1.0}
    honest["units"] = "px"
    assert checked_metrics(_metrics_reply(honest), n_test=4)["dice_mean"] == 0.8


@pytest.mark.slow
def test_a_malicious_site_is_refused_step_by_step_and_the_run_completes(tmp_path: Path):
    """Through Flower and Ray: one site sends a reply without its latents, 10x the items
    asked, latents x100, a 1 GiB reply, and forged metrics, in turn. Each is refused with its
    reason in metrics.json; the honest sites are never refused and are scored."""
    from fedseg.config import TAMPERING, HospitalConfig
    from simulations.engine import simulate

    cfg = blind_config(tmp_path / "out", sites=3, epochs=9)
    cfg.hospitals = [HospitalConfig(count=2), HospitalConfig(name="mallory", tamper=TAMPERING)]
    cfg.baselines.centralized_unet = cfg.baselines.local_unet = False
    simulate(cfg.validate())
    metrics = json.loads((Path(cfg.out_dir) / "metrics.json").read_text())
    reasons = [r["reason"] for r in metrics["rejected"]]
    assert {r["site"] for r in metrics["rejected"]} == {"mallory"}, metrics["rejected"]
    assert len(reasons) == 4, reasons
    assert "no latents in the reply" in reasons[0]
    assert "the limit is" in reasons[1]  # 10x the batch asked for
    assert "the largest this site sent before" in reasons[2]  # the magnitude guard
    assert "exceeds" in reasons[3]
    assert [d["site"] for d in metrics["dropped"]] == ["mallory"]
    assert "metrics refused" in metrics["dropped"][0]["reason"]
    assert set(metrics["sites"]) == {"synthetic-1", "synthetic-2"}
    assert all(0 <= s["dice_mean"] <= 1 for s in metrics["sites"].values())


def test_two_nodes_cannot_hold_one_site_and_registrations_are_checked():
    from strategies.autoencoders import registration

    info = {"site": "h1", "class_names": ["bg", "fg"], "stats_json": "{}"}
    first = registration(7, {"n_train": 8, "n_test": 4}, info, {})
    assert first.name == "h1" and first.node_id == 7
    with pytest.raises(ValueError, match="already held by node 7"):
        registration(8, {"n_train": 8, "n_test": 4}, info, {"h1": first})
    with pytest.raises(ValueError, match="site name"):
        registration(9, {"n_train": 8, "n_test": 4}, {**info, "site": "../../etc"}, {})
    with pytest.raises(ValueError, match="0 training"):
        registration(9, {"n_train": 0, "n_test": 4}, info, {})


def test_the_shipped_malicious_scenario_makes_every_attack():
    from fedseg.config import TAMPERING, load_config

    root = Path(__file__).resolve().parents[1]
    cfg = load_config(root / "simulations" / "scenarios" / "demo-malicious.toml")
    assert [h.tamper for h in cfg.hospitals if h.tamper] == [list(TAMPERING)]
    assert cfg.federation.num_sites == 3 and cfg.training.finetune_share == "blind"
