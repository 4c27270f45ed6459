"""What makes two seeded runs' metrics.json differ, fixed at library level: the sites' reply
order (float sums in the mean) and wall-clock fields (named, and left out of the comparison)."""

from __future__ import annotations

import json

from fedseg.config import RunConfig
from fedseg.report import federated_metrics, load_metrics, without_timings


def site(dice: float) -> dict:
    return {
        "dice": {"class1": dice},
        "hd95": {"class1": 3.0},
        "asd": {"class1": 1.0},
        "dice_mean": dice,
        "hd95_mean": 3.0,
        "asd_mean": 1.0,
        "units": "px",
        "n_test": 4,
        "decode_seconds": dice / 10,
    }


def record(tmp_path, name: str, order: list[str], seconds: float) -> str:
    cfg = RunConfig(name="repro", out_dir=str(tmp_path / name))
    dice = {"hospital-1": 0.1, "hospital-2": 0.2, "hospital-3": 0.3}
    sites = {s: {**site(dice[s]), "decode_seconds": seconds} for s in order}
    timing = {"training_total": seconds, "evaluation": seconds / 2}
    rounds = [{"round": 1, "participation": seconds, "umn": seconds, "loss": 0.5}]
    federated_metrics(
        cfg, sites, timing, 1024, [], rounds=rounds, share_seconds=[seconds], finetune_losses=[1.0]
    )
    text = (tmp_path / name / "metrics.json").read_text()
    return text.replace(str(tmp_path / name), "<out>")  # the one difference: the folder


def test_the_order_sites_answer_in_does_not_change_metrics_json(tmp_path):
    # (0.1 + 0.2) + 0.3 != (0.3 + 0.2) + 0.1 in floating point: reply order used to show
    first = record(tmp_path, "a", ["hospital-1", "hospital-2", "hospital-3"], 1.0)
    second = record(tmp_path, "b", ["hospital-3", "hospital-2", "hospital-1"], 1.0)
    assert first == second
    assert list(json.loads(second)["sites"]) == ["hospital-1", "hospital-2", "hospital-3"]


def test_without_timings_keeps_every_figure_but_the_wall_clock(tmp_path):
    record(tmp_path, "a", ["hospital-1", "hospital-2", "hospital-3"], 1.0)
    record(tmp_path, "b", ["hospital-2", "hospital-1", "hospital-3"], 7.5)
    a, b = load_metrics(tmp_path / "a"), load_metrics(tmp_path / "b")
    b["config"]["out_dir"] = a["config"]["out_dir"]  # the folders differ, not the runs
    assert a != b  # the runs took different times
    assert without_timings(a) == without_timings(b)
    kept = without_timings(a)
    assert "timing_s" not in kept and "share_seconds" not in kept
    assert kept["rounds"] == [{"round": 1, "loss": 0.5}]
    assert "decode_seconds" not in kept["sites"]["hospital-1"]
    assert kept["sites"]["hospital-1"]["dice_mean"] == 0.1
    assert kept["mean"]["dice"] == a["mean"]["dice"]
    assert kept["finetune_losses"] == [1.0] and kept["bytes_per_query"] == 1024
