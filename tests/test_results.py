"""A run's typed results: metrics.json round-trips through them, and a malformed site is named."""

from __future__ import annotations

import pytest

from fedseg.results import MethodResults, RunResults, SiteScores
from tests.test_report import site_metrics


def test_metrics_json_round_trips_through_the_typed_results():
    metrics = {
        "config": {"name": "x"},
        "method": "blind split training",
        "sites": {"a": {**site_metrics(0.8), "decode_seconds": 0.5}, "b": site_metrics(0.6)},
        "mean": {"dice": 0.7, "hd95": 4.25, "asd": 1.5, "units": "mm"},
        "baselines": {"centralized_unet": {"sites": {"a": site_metrics(0.9)}, "epochs": 12}},
        "timing_s": {"finetuning": 12.0},
        "bytes_per_query": 1024,
        "dropped": [{"phase": "evaluation", "site": "c", "reason": "x"}],
        "rejected": [],
        "finetune_losses": [1.0, 0.5],
    }
    results = RunResults.from_dict(metrics)
    assert results.federated.sites["a"].dice_mean == 0.8
    assert results.federated.sites["a"].extra == {"decode_seconds": 0.5}
    assert results.baselines["centralized_unet"].extra == {"epochs": 12}
    assert results.baselines["centralized_unet"].mean["dice"] == 0.9  # computed when missing
    assert results.extra == {"finetune_losses": [1.0, 0.5]}
    again = results.to_dict()
    assert again["sites"] == metrics["sites"] and again["dropped"] == metrics["dropped"]
    assert RunResults.from_dict(again) == results


def test_a_site_without_a_score_is_named():
    broken = site_metrics(0.8)
    del broken["dice_mean"], broken["n_test"]
    with pytest.raises(ValueError, match="SiteScores: missing dice_mean, n_test"):
        SiteScores.from_dict(broken)
    with pytest.raises(ValueError, match="missing"):
        MethodResults.from_dict({"sites": {"a": broken}})
