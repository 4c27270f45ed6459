"""A federation in which hospitals really fail in some UMN rounds still completes.

Three synthetic hospitals through Flower + Ray: one raises in round 1 and comes back in round 2,
one stalls past the round deadline in round 2. The run must finish, list who dropped in which
round, let the failed hospital rejoin (and send its fresh latents again), and evaluate all three.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedseg.config import HospitalConfig, RunConfig
from simulations.engine import simulate
from simulations.profiles import fails_in_round
from tests.helpers import small_config

pytestmark = pytest.mark.slow  # Flower + Ray federations (minutes)


def _dropout_failing_only_in(index: int, rnd: int, rounds: int, seed: int) -> float | None:
    """A dropout probability whose draws fail hospital ``index`` in round ``rnd`` only."""
    for p in [x / 100 for x in range(1, 100)]:
        profile = HospitalConfig(dropout=p)
        fails = [fails_in_round(profile, seed, index, r) for r in range(1, rounds + 1)]
        if fails == [r == rnd for r in range(1, rounds + 1)]:
            return p
    return None


def _seed_with_pattern() -> tuple[int, float, float]:
    """A federation seed at which hospital 1 fails only round 1 and hospital 2 only round 2."""
    for seed in range(100):
        p1, p2 = _dropout_failing_only_in(1, 1, 3, seed), _dropout_failing_only_in(2, 2, 3, seed)
        if p1 and p2:
            return seed, p1, p2
    raise AssertionError("no seed gives the failure pattern")


@pytest.fixture(scope="module")
def failing_run(tmp_path_factory) -> RunConfig:
    tmp = tmp_path_factory.mktemp("failure")
    cfg = small_config(tmp / "out", 3, [8, 8, 16, 16, 16], 16, ae_epochs=1, umn_epochs_per_round=1)
    cfg.training.umn_rounds = 3
    cfg.training.threads = 1
    cfg.federation.round_timeout_s = 8.0
    cfg.federation.actors, cfg.federation.client_cpus = 2, 1.0  # the staller blocks only one
    cfg.federation.round_items = 4
    cfg.federation.seed, p1, p2 = _seed_with_pattern()
    cfg.hospitals = [
        HospitalConfig(name="steady", samples=8),
        HospitalConfig(name="flaky", samples=8, dropout=p1),
        HospitalConfig(name="stalling", samples=8, failure="timeout", dropout=p2),
    ]
    cfg.federation.num_sites = 3
    simulate(cfg.validate())
    return cfg


def test_run_completes_and_evaluates_every_hospital(failing_run):
    metrics = json.loads((Path(failing_run.out_dir) / "metrics.json").read_text())
    assert set(metrics["sites"]) == {"steady", "flaky", "stalling"}


def test_drops_are_listed_by_round_with_the_reason(failing_run):
    metrics = json.loads((Path(failing_run.out_dir) / "metrics.json").read_text())
    drops = {(d["site"], d["round"]): d["reason"] for d in metrics["dropped"]}
    assert set(drops) == {("flaky", 1), ("stalling", 2)}
    assert "simulated outage in round 1" in drops[("flaky", 1)]
    assert "no reply within" in drops[("stalling", 2)]
    report = (Path(failing_run.out_dir) / "report.md").read_text()
    assert "| 1 | flaky |" in report and "| 2 | stalling |" in report


def test_dropped_hospitals_rejoin_and_resume_their_stream(failing_run):
    metrics = json.loads((Path(failing_run.out_dir) / "metrics.json").read_text())
    rounds = {r["round"]: r for r in metrics["rounds"]}
    assert rounds[1]["dropped"] == ["flaky"] and "flaky" not in rounds[1]["present"]
    assert rounds[2]["rejoined"] == ["flaky"] and rounds[2]["dropped"] == ["stalling"]
    assert rounds[3]["rejoined"] == ["stalling"]
    assert sorted(rounds[3]["present"]) == ["flaky", "stalling", "steady"]


def test_non_iid_statistics_reach_the_report(failing_run):
    out = Path(failing_run.out_dir)
    stats = json.loads((out / "metrics.json").read_text())["data_stats"]
    assert set(stats) == {"steady", "flaky", "stalling"}
    for s in stats.values():
        assert s["n_train"] == 8 and abs(sum(s["class_fraction"].values()) - 1) < 1e-6
        assert abs(sum(s["intensity_hist"]) - 1) < 1e-3
    assert (out / "figures" / "data_stats.png").stat().st_size > 1000
    assert "## Data per site" in (out / "report.md").read_text()
