"""Issue 26's benchmarks: the time-to-Dice arithmetic (when a curve first reaches a target,
the ratio, scoring kept off the clock) and the split-step profile's accounting."""

from __future__ import annotations

import importlib.util
import json
import time
from pathlib import Path

import pytest

from fedseg.config import demo_config
from fedseg.site_worker import SERVER_THREADS_FROM_PX, cores_left

_BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, _BENCH / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


ttd = _load("time_to_dice")
profile = _load("split_profile")


def test_time_to_a_target_is_interpolated_between_the_points_around_it():
    curve = [
        {"seconds": 100, "dice": 0.6},
        {"seconds": 300, "dice": 0.8},
        {"seconds": 200, "dice": 0.7},
    ]
    assert ttd.time_to(curve, 0.75) == pytest.approx(250.0)
    assert ttd.time_to(curve, 0.5) == 100  # already there at the first point
    assert ttd.time_to(curve, 0.9) is None  # never reached


def test_the_ratio_is_taken_on_the_flower_clock_and_bounded_when_never_reached():
    fed = {
        "points": [
            {"epoch": 10, "seconds": 5, "dice": 0.5},
            {"epoch": 20, "seconds": 10, "dice": 0.7},
        ]
    }
    unet = {"points": [{"seconds": 30, "dice": 0.6}, {"seconds": 60, "dice": 0.72}]}
    rate = {"seconds_per_epoch": 5.0, "start_up_seconds": 20.0, "registration_seconds": 11.0}
    result = ttd.summarise("s", fed, rate, unet)
    # target 0.70: the UNet gets there at 30 + 30 * (0.1 / 0.12) = 55 s; fedseg at epoch 20,
    # 120 s through Flower (20 s of start-up, 20 x 5 s) and 10 s of compute.
    assert result["target_dice"] == pytest.approx(0.70)
    assert result["seconds_to_target"]["unet"] == pytest.approx(55.0)
    assert result["seconds_to_target"]["fedseg_flower"] == pytest.approx(120.0)
    assert result["ratio_flower"] == pytest.approx(120 / 55)
    assert result["ratio_compute"] == pytest.approx(10 / 55)
    # The hospitals' registration comes before split training's clock; counted, 131 s.
    assert result["seconds_to_target"]["fedseg_flower_with_registration"] == pytest.approx(131.0)
    assert result["ratio_flower_with_registration"] == pytest.approx(131 / 55)
    assert result["ratio_flower_at_least"] is None

    slow = {"points": [{"epoch": 20, "seconds": 10, "dice": 0.6}]}
    bounded = ttd.summarise("s", slow, rate, unet)
    assert bounded["ratio_flower"] is None
    assert bounded["ratio_flower_at_least"] == pytest.approx(120 / 55)


def test_scoring_time_is_kept_off_the_training_clock():
    clock = ttd.PausedClock()
    clock.scoring(lambda: time.sleep(0.2) or {})
    assert clock.seconds() < 0.1


def test_the_profile_splits_an_exchange_into_messaging_guard_call_and_compute(tmp_path):
    # Three epochs of one exchange each, 10 s apart, the server's UMN step after each; the
    # first epoch is left out, so two exchanges and the one gap between them count.
    lines = []
    for t0 in (0.0, 10.0, 20.0):
        lines += [
            f"strategies.common.exchange 1 {t0:.6f} {t0 + 1.0:.6f}",
            f"clients.app.Hospital.outgoing_guard 2 {t0 + 0.2:.6f} {t0 + 0.9:.6f}",
            f"clients.app.Hospital.finetune_backward 2 {t0 + 0.2:.6f} {t0 + 0.8:.6f}",
            f"fedseg.hospital.finetune_backward 3 {t0 + 0.3:.6f} {t0 + 0.7:.6f}",
            f"fedseg.coordinator.Coordinator.finetune_backward 1 {t0 + 1.1:.6f} {t0 + 1.4:.6f}",
        ]
    log = tmp_path / "calls.log"
    log.write_text("\n".join(lines) + "\n")
    result = profile.breakdown(profile.read_calls(log), epochs=3)
    ms = result["ms_per_epoch"]
    assert result["exchanges_per_epoch"] == 1
    assert ms["sites' compute"] == pytest.approx(400, abs=1)
    assert ms["site call (decode, worker call, encode)"] == pytest.approx(200, abs=1)
    assert ms["key guard"] == pytest.approx(100, abs=1)
    assert ms["Flower and Ray messaging"] == pytest.approx(300, abs=1)
    assert ms["server's UMN compute"] == pytest.approx(300 / 2, abs=1)  # one gap, two epochs
    assert ms["server bookkeeping"] == pytest.approx((9_000 - 300) / 2, abs=1)
    compute = 400 + 150
    assert result["non_compute_share"] == pytest.approx(1 - compute / sum(ms.values()))


def test_the_profile_times_the_start_up_from_the_first_process():
    calls = [
        ("process.start:split_profile.py", 1, 100.0, 100.0),
        ("strategies.common.exchange", 1, 107.0, 120.0),  # registration
        ("strategies.common.exchange", 1, 121.0, 123.0),  # the first batch
        ("strategies.common.exchange", 1, 123.5, 123.8),
    ]
    assert profile.start_up(calls) == pytest.approx(
        {
            "registered_at_s": 20.0,
            "registration_s": 13.0,
            "first_batch_at_s": 23.0,
            "first_exchange_s": 2.0,
        }
    )


@pytest.mark.parametrize("size", [64, SERVER_THREADS_FROM_PX])
def test_the_server_takes_the_runs_threads_only_where_its_maps_gain_from_them(size):
    cfg = demo_config()
    cfg.model.image_size = size
    cfg.training.threads = 2
    expected = 2 if size >= SERVER_THREADS_FROM_PX else 1
    assert cores_left(cfg) == expected


def test_both_systems_are_scored_densely_before_their_regular_interval():
    scored = [e for e in range(1, 31) if ttd.scored_epoch(e, 10)]
    assert scored == [1, 2, 4, 8, 10, 20, 30]
    times, last = [], 0.0
    while last < 200:
        last = ttd.next_score_at(last, 40.0)
        times.append(last)
    assert times == [5.0, 10.0, 20.0, 40.0, 80.0, 120.0, 160.0, 200.0]


def _fedseg_only_argv(out: Path, epochs: int, *extra: str) -> list[str]:
    """``--fedseg-only`` on a tiny synthetic federation: ``epochs`` of split training."""
    argv = ["time_to_dice.py", "--fedseg-only", "--out", str(out), *extra]
    for item in (
        f"training.finetune_epochs={epochs}",
        "training.threads=1",
        "data.synthetic_train=8",
        "data.synthetic_test=4",
        "model.image_size=32",
    ):
        argv += ["--set", item]
    return argv


def test_fedseg_only_draws_the_in_process_curve_of_a_variant(tmp_path, monkeypatch):
    """``--fedseg-only`` with ``--set``: the variant's curve alone, scored after the last
    epoch, the override in force (nothing of Flower or the UNet runs)."""
    out = tmp_path / "curve"
    argv = _fedseg_only_argv(out, 3, "--every", "2", "--set", "training.local_batch_norm=false")
    monkeypatch.setattr("sys.argv", argv)
    monkeypatch.setattr(ttd, "flower_rate", None)  # called, it would fail the test
    monkeypatch.setattr(ttd, "unet_curve", None)
    ttd.main()
    curve = json.loads((out / "fedseg_curve.json").read_text())
    assert [p["epoch"] for p in curve["points"]] == [1, 2, 3]
    assert all(0.0 <= p["dice"] <= 1.0 for p in curve["points"])
    assert "local_batch_norm=false" in curve["command"]


def test_fedseg_only_at_given_epochs_scores_those_and_stops_after_the_last(tmp_path, monkeypatch):
    """``--at``: a variant's early curve, scored where asked, the rest of the phase not run."""
    out = tmp_path / "curve"
    monkeypatch.setattr("sys.argv", _fedseg_only_argv(out, 6, "--at", "3,1"))
    epochs_run = []
    real = ttd.split_train

    def counting(coordinator, tuners, on_epoch):
        def seen(epoch, total, loss):
            epochs_run.append(epoch)
            on_epoch(epoch, total, loss)

        return real(coordinator, tuners, seen)

    monkeypatch.setattr(ttd, "split_train", counting)
    ttd.main()
    curve = json.loads((out / "fedseg_curve.json").read_text())
    assert [p["epoch"] for p in curve["points"]] == [1, 3]
    assert epochs_run == [1, 2, 3]  # stopped after epoch 3 of 6


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--at", "2"], "--at needs --fedseg-only"),
        (["--fedseg-only", "--at", "two"], "not a list of epochs"),
        (["--fedseg-only", "--at", "0,2"], "epochs start at 1"),
    ],
)
def test_at_is_checked_before_any_work(monkeypatch, capsys, argv, message):
    monkeypatch.setattr("sys.argv", ["time_to_dice.py", *argv])
    monkeypatch.setattr(ttd, "load_federation", None)  # called, it would fail the test
    with pytest.raises(SystemExit):
        ttd.main()
    assert message in capsys.readouterr().err
