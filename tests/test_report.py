"""The results folder: a strict-JSON record, a readable report and non-empty figures."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from fedseg.report import Examples, load_metrics, write_results

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def site_metrics(dice: float, units: str = "mm") -> dict:
    return {
        "dice": {"organ": dice, "tumour": None},
        "hd95": {"organ": 4.25, "tumour": None},
        "asd": {"organ": 1.5, "tumour": None},
        "dice_mean": dice,
        "hd95_mean": 4.25,
        "asd_mean": 1.5,
        "units": units,
        "n_test": 7,
    }


def make_metrics() -> dict:
    return {
        "config": {
            "name": "unit-run",
            "privacy": {"transform": "klt", "custody": "client"},
            "model": {"image_size": 32},
            "data": {"kind": "synthetic", "class_names": ["background", "organ", "tumour"]},
        },
        "method": "PPCMI-SF",
        "sites": {"hospital_a": site_metrics(0.8123), "hospital_b": site_metrics(0.6, "px")},
        "mean": {"dice": 0.70615, "hd95": float("nan"), "asd": 1.5, "units": "mixed"},
        "baselines": {
            "centralized_unet": {
                "sites": {"hospital_a": site_metrics(0.9), "hospital_b": site_metrics(0.85)},
                "mean": {"dice": 0.875, "hd95": 4.25, "asd": 1.5, "units": "mm"},
            },
            "local_unet": {},
        },
        "timing_s": {"autoencoders": np.float32(12.5), "umn": 30.0},
        "bytes_per_query": np.int64(65536),
        "leakage_ssim": np.float64(0.12),
    }


def make_examples(k: int = 2, size: int = 32) -> Examples:
    rng = np.random.default_rng(0)
    truth = np.zeros((k, size, size), dtype=np.int64)
    truth[:, 8:20, 8:20] = 1
    truth[:, 22:28, 22:28] = 2
    pred = np.roll(truth, 2, axis=2)
    return Examples(images=rng.random((k, size, size)), truth=truth, pred=pred)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("run")
    examples = {"hospital_a": make_examples(), "hospital_b": make_examples(k=1)}
    baseline = {"centralized_unet": {"hospital_a": make_examples()}}
    assert write_results(out, make_metrics(), examples, baseline) == out
    return out


def test_metrics_json_round_trips(run_dir: Path) -> None:
    text = (run_dir / "metrics.json").read_text()
    assert "NaN" not in text and "Infinity" not in text
    loaded = load_metrics(run_dir)
    assert loaded["mean"]["hd95"] is None
    assert loaded["sites"]["hospital_a"]["dice"]["organ"] == pytest.approx(0.8123)
    assert loaded["timing_s"]["autoencoders"] == 12.5
    assert loaded["bytes_per_query"] == 65536
    assert json.loads(text) == loaded
    assert not list(run_dir.glob(".*.tmp"))


def test_report_mentions_sites_and_numbers(run_dir: Path) -> None:
    report = (run_dir / "report.md").read_text()
    assert "# Results: unit-run" in report
    for expected in ("hospital_a", "hospital_b", "0.812", "0.706", "0.875", "4.25", "mm", "px"):
        assert expected in report
    assert "Centralized UNet" in report
    assert "65,536 bytes" in report
    assert "klt" in report and "leakage_ssim" in report
    assert "figures/site_dice.png" in report and "figures/overlays_hospital_a.png" in report


@pytest.mark.parametrize(
    "name", ["site_dice.png", "overlays_hospital_a.png", "overlays_hospital_b.png"]
)
def test_figures_are_non_empty_pngs(run_dir: Path, name: str) -> None:
    data = (run_dir / "figures" / name).read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 1000


def test_bad_examples_do_not_lose_metrics(tmp_path: Path) -> None:
    bad = Examples(images=np.zeros((2, 8, 8)), truth=np.zeros((2, 4, 4), int), pred=np.zeros(3))
    write_results(tmp_path, make_metrics(), {"hospital_a": bad})
    assert load_metrics(tmp_path)["method"] == "PPCMI-SF"
    assert not (tmp_path / "figures" / "overlays_hospital_a.png").exists()
    assert "overlays_hospital_a" not in (tmp_path / "report.md").read_text()


def test_minimal_metrics_without_baselines(tmp_path: Path) -> None:
    metrics = {"sites": {"x": site_metrics(0.5)}}
    write_results(tmp_path, metrics)
    report = (tmp_path / "report.md").read_text()
    assert "fedseg reached a mean foreground Dice of 0.500" in report  # no method recorded
    assert (tmp_path / "figures" / "site_dice.png").stat().st_size > 0


def test_load_metrics_missing(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="metrics.json"):
        load_metrics(tmp_path / "nope")


def test_results_are_readable_by_others(tmp_path):
    import stat

    from fedseg.report import write_results

    write_results(tmp_path, {"config": {}, "sites": {}, "mean": {}})
    assert stat.S_IMODE((tmp_path / "metrics.json").stat().st_mode) == 0o644
