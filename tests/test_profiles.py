"""Hospital profiles: parsing, sample shares, acquisition effects, dropout draws, Ray backend."""

from __future__ import annotations

import re
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fedseg.config import ConfigError, HospitalConfig, RunConfig, config_from_dict, load_config
from fedseg.data import load_federation
from fedseg.data.dataset import DataError
from fedseg.data.hospitals import apply_profile, expand_hospitals, share_counts
from fedseg.data.stats import site_statistics
from fedseg.data.synthetic import synthetic_site
from fedseg.report import render_report
from simulations.engine import backend_config
from simulations.profiles import SimulatedOutage, fails_in_round, simulate_outage, slow_down

SCENARIOS = Path(__file__).resolve().parents[1] / "simulations" / "scenarios"
SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def _pairs(folder: Path, n: int) -> Path:
    """n tiny image/mask PNG pairs (a square whose position depends on i)."""
    (folder / "images").mkdir(parents=True)
    (folder / "masks").mkdir()
    for i in range(n):
        mask = np.zeros((32, 32), np.uint8)
        mask[4 + i % 8 : 14 + i % 8, 6:20] = 1
        image = (40 + 150 * mask + np.arange(32)[None, :]).astype(np.uint8)
        Image.fromarray(image).save(folder / "images" / f"p{i:02d}.png")
        Image.fromarray(mask).save(folder / "masks" / f"p{i:02d}.png")
    return folder


def _cfg(hospitals: list[dict], **sections) -> RunConfig:
    values = {"model": {"image_size": 32}, "hospitals": hospitals, **sections}
    values["data"] = {"synthetic_train": 6, "synthetic_test": 3, **values.get("data", {})}
    return config_from_dict(values)


def test_toml_hospitals_and_sources_parse_with_relative_paths(tmp_path):
    _pairs(tmp_path / "set", 4)
    toml = tmp_path / "scenarios" / "s.toml"
    toml.parent.mkdir()
    toml.write_text(
        '[sources.a]\nkind = "pairs"\npath = "../set"\n\n'
        '[[hospitals]]\nname = "x"\nsource = "a"\ndropout = 0.2\n\n'
        "[[hospitals]]\ncount = 3\nspeed = 0.5\n"
    )
    cfg = load_config(toml)
    assert cfg.sources["a"].path == str((tmp_path / "set").resolve())
    assert cfg.federation.num_sites == 4
    assert [h.dropout for h in cfg.hospitals] == [0.2, 0.0] and cfg.hospitals[1].speed == 0.5
    names = [h.name for h in expand_hospitals(cfg)]
    assert names == ["x", "synthetic-1", "synthetic-2", "synthetic-3"]


@pytest.mark.parametrize(
    ("hospital", "message"),
    [
        ({"source": "nowhere"}, "source 'nowhere'"),
        ({"dropout": 1.0}, "dropout must be in [0, 1)"),
        ({"speed": 0.0}, "speed must be > 0"),
        ({"colour": 1}, "unknown key(s) in [hospitals[0]]: colour"),
        ({"failure": "explode"}, "hospitals[0].failure must be one of"),
    ],
)
def test_bad_profiles_are_refused_naming_the_field(hospital, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        _cfg([hospital])


def test_duplicate_hospital_names_are_refused():
    with pytest.raises(DataError, match="'a' is used twice"):
        expand_hospitals(_cfg([{"name": "a"}, {"name": "a"}]))


def test_share_counts_keep_explicit_counts_and_split_the_rest():
    assert share_counts(30, [10, 0, 0], 0.0, 0) == [10, 10, 10]
    skewed = share_counts(200, [0] * 8, 0.3, 1)
    assert sum(skewed) == 200 and min(skewed) >= 2
    assert max(skewed) > 3 * min(skewed)  # a small alpha really skews the shares
    assert skewed == share_counts(200, [0] * 8, 0.3, 1)  # deterministic in the seed
    assert skewed != share_counts(200, [0] * 8, 0.3, 2)
    with pytest.raises(DataError, match="patients left"):
        share_counts(10, [9, 0], 0.0, 0)


def test_synthetic_hospitals_get_their_sample_counts():
    cfg = _cfg([{"name": "big", "samples": 9}, {"name": "small", "samples": 3, "test_samples": 2}])
    sites = load_federation(cfg)
    assert [(s.name, len(s.train), len(s.test)) for s in sites] == [
        ("big", 9, 3),
        ("small", 3, 2),
    ]
    assert [s.index for s in sites] == [0, 1] and sites[1].profile.samples == 3


def test_shared_source_is_cut_by_patient_without_overlap(tmp_path):
    _pairs(tmp_path / "set", 20)
    hospitals = [{"name": "a", "source": "s", "samples": 12}, {"name": "b", "source": "s"}]
    sources = {"s": {"kind": "pairs", "path": str(tmp_path / "set")}}
    sites = load_federation(_cfg(hospitals, sources=sources))
    a, b = sites
    assert len(a.train) + len(a.test) == 12 and len(b.train) + len(b.test) == 8
    groups = [set(s.train.groups) | set(s.test.groups) for s in sites]
    assert not groups[0] & groups[1]
    assert not set(a.train.groups) & set(a.test.groups)


def test_acquisition_shifts_survive_normalisation_and_label_noise_spares_the_test_set():
    data = synthetic_site(0, 12, 64, 0)
    shifted = apply_profile(
        data, HospitalConfig(intensity_shift=0.5, contrast=2.0), 64, 0, train=True
    )
    assert abs(shifted.images.mean() - 0.5) < 1e-3 and abs(shifted.images.std() - 2.0) < 1e-2
    low = apply_profile(data, HospitalConfig(resolution=16), 64, 0, train=True)
    detail = float(np.abs(np.diff(data.images, axis=-1)).mean())
    assert float(np.abs(np.diff(low.images, axis=-1)).mean()) < 0.6 * detail
    noisy = HospitalConfig(label_noise=1.0)
    assert (apply_profile(data, noisy, 64, 0, train=True).masks != data.masks).any()
    assert (apply_profile(data, noisy, 64, 0, train=False).masks == data.masks).all()


def test_dropout_draws_are_per_round_deterministic_and_at_the_profile_rate():
    profile = HospitalConfig(dropout=0.2)
    draws = [fails_in_round(profile, 0, i, r) for i in range(50) for r in range(1, 41)]
    assert 0.17 < np.mean(draws) < 0.23
    assert draws == [fails_in_round(profile, 0, i, r) for i in range(50) for r in range(1, 41)]
    assert not any(fails_in_round(HospitalConfig(), 0, i, 1) for i in range(50))
    with pytest.raises(SimulatedOutage, match="round 3"):
        simulate_outage(profile, "x", 3, 0.0)


def test_slow_hospital_really_takes_longer():
    started = time.perf_counter()
    extra = slow_down(HospitalConfig(speed=0.5), 0.2)
    assert extra == pytest.approx(0.2) and time.perf_counter() - started >= 0.19
    assert slow_down(HospitalConfig(speed=1.0), 0.2) == 0.0


def test_ray_backend_runs_the_configured_number_of_actors():
    cfg = _cfg([{"count": 10}], federation={"actors": 3, "client_cpus": 1.5})
    for actors, sites, expected in [(3, 10, 3), (3, 1, 1), (4, 50, 4), (1, 5, 1)]:
        cfg = _cfg([{"count": sites}], federation={"actors": actors, "client_cpus": 0.5})
        backend = backend_config(cfg)
        per_client = backend["client_resources"]["num_cpus"]
        assert per_client >= 0.5 and isinstance(backend["init_args"]["num_cpus"], int)
        # Flower's pool size: int(CPUs / CPUs per client); never more actors than sites
        assert int(backend["init_args"]["num_cpus"] / per_client) == expected


def test_site_statistics_are_aggregates_of_the_training_set():
    site = synthetic_site(1, 10, 32, 0)
    stats = site_statistics(site.subset(range(8)), site.subset(range(8, 10)))
    assert (stats["n_train"], stats["n_test"]) == (8, 2)
    assert sum(stats["class_fraction"].values()) == pytest.approx(1.0)
    assert stats["class_fraction"]["organ"] > 0 and len(stats["intensity_hist"]) == 32
    assert all(not isinstance(v, np.ndarray) for v in stats.values())


def test_report_lists_per_site_data_with_different_class_sets():
    metrics = {
        "sites": {},
        "data_stats": {
            "nerve": {
                "n_train": 5,
                "class_names": ["background", "nerve"],
                "class_fraction": {"background": 0.9, "nerve": 0.1},
            },
            "head": {
                "n_train": 7,
                "class_names": ["background", "head"],
                "class_fraction": {"background": 0.6, "head": 0.4},
            },
        },
        "dropped": [{"phase": "umn_round", "round": 2, "site": "head", "reason": "boom"}],
    }
    text = render_report(metrics, [], "x")
    assert "| nerve | 5 | - | - | 90 | 10 | - |" in text
    assert "| head | 7 | - | - | 60 | - | 40 |" in text
    assert "| 2 | head | umn_round | boom |" in text


@pytest.mark.parametrize(
    "name", ["fifty-synthetic", "three-sites-us-nerve", "hippocampus-by-volume", "mixed-ultrasound"]
)
def test_named_scenarios_load(name):
    cfg = load_config(SCENARIOS / f"{name}.toml")
    assert cfg.hospitals and cfg.federation.num_sites == sum(h.count for h in cfg.hospitals)
    if name == "fifty-synthetic":
        assert cfg.federation.num_sites == 50
    if name == "mixed-ultrasound" and SHARED.is_dir():
        assert set(cfg.sources) == {"us-nerve", "hc18"}
        assert all(Path(s.path).is_dir() for s in cfg.sources.values())
