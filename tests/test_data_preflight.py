"""Every site's data is checked before the federation starts: one message per problem, each
naming its file, raised by the simulation before Ray (or Flower) is started."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from fedseg.config import DatasetConfig, HospitalConfig, RunConfig, load_config
from fedseg.data.preflight import DataCheckError, check_run_data

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
SCENARIOS = Path(__file__).resolve().parents[1] / "simulations" / "scenarios"


def save(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


def good_pair(root: Path, stem: str, size: tuple[int, int] = (24, 24)) -> None:
    mask = np.zeros(size, np.uint8)
    mask[: size[0] // 2] = 1
    save(root / "images" / f"{stem}.png", (mask * 80 + 30).astype(np.uint8))
    save(root / "masks" / f"{stem}.png", mask)


def run_on(folder: Path, sites: int = 1, **data) -> RunConfig:
    cfg = RunConfig()
    cfg.data = DatasetConfig(kind="pairs", path=str(folder), **data)
    cfg.federation.num_sites = sites
    return cfg


def test_every_problem_is_listed_with_its_file(tmp_path: Path) -> None:
    for i in range(6):
        good_pair(tmp_path, f"ok{i}")
    save(tmp_path / "images" / "lonely.png", np.zeros((24, 24), np.uint8))
    save(tmp_path / "masks" / "orphan.png", np.zeros((24, 24), np.uint8))
    good_pair(tmp_path, "small")
    save(tmp_path / "masks" / "small.png", np.zeros((20, 24), np.uint8))  # size mismatch
    good_pair(tmp_path, "corrupt")
    (tmp_path / "images" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    good_pair(tmp_path, "label")
    save(tmp_path / "masks" / "label.png", np.full((24, 24), 7, np.uint8))
    good_pair(tmp_path, "huge", (60, 60))
    with pytest.raises(DataCheckError) as err:
        check_run_data(run_on(tmp_path, label_values=[0, 1], max_pixels=2000))
    problems = err.value.problems
    expected = ["lonely.png", "orphan.png", "small.png", "corrupt.png", "label.png", "huge.png"]
    assert len(problems) == len(expected)
    for name, problem in zip(sorted(expected), sorted(problems, key=_file_of), strict=True):
        assert name in problem
    assert "6 problems in the data" in str(err.value)
    assert "expected label_values [0, 1]" in str(err.value)
    assert "max_pixels" in str(err.value)


def _file_of(problem: str) -> str:
    return Path(problem.split(":")[0].split(" ")[0]).name


def test_open_masks_without_a_map_are_one_problem_with_the_fix(tmp_path: Path) -> None:
    for i in range(4):
        good_pair(tmp_path, f"p{i}")
    save(tmp_path / "masks" / "p0.png", (np.arange(576).reshape(24, 24) % 256).astype(np.uint8))
    with pytest.raises(DataCheckError) as err:
        check_run_data(run_on(tmp_path))
    assert len(err.value.problems) == 1
    assert "mask_threshold" in err.value.problems[0]


def test_notices_and_too_few_patients(tmp_path: Path) -> None:
    mask = np.zeros((24, 24), np.uint8)
    mask[:12] = 255
    for i in range(4):
        good_pair(tmp_path, f"p{i}")
        save(tmp_path / "masks" / f"p{i}.png", mask)
    notices = check_run_data(run_on(tmp_path, sites=2))
    assert len(notices) == 1 and "exactly 0 and 255" in notices[0]
    with pytest.raises(DataCheckError, match="4 patient.*3 site.*need 6"):
        check_run_data(run_on(tmp_path, sites=3))


def test_nifti_volumes_are_checked(tmp_path: Path) -> None:
    (tmp_path / "images").mkdir()
    (tmp_path / "labels").mkdir()
    image = np.random.default_rng(0).random((8, 8, 4)).astype(np.float32)
    for name, label_shape in (("a", (8, 8, 4)), ("b", (8, 8, 5))):  # b's label is off by a slice
        nib.save(nib.Nifti1Image(image, np.eye(4)), tmp_path / "images" / f"{name}.nii.gz")
        label = np.zeros(label_shape, np.uint8)
        nib.save(nib.Nifti1Image(label, np.eye(4)), tmp_path / "labels" / f"{name}.nii.gz")
    cfg = RunConfig()
    cfg.data = DatasetConfig(kind="nifti", path=str(tmp_path))
    with pytest.raises(DataCheckError) as err:
        check_run_data(cfg)
    assert len(err.value.problems) == 1 and "b.nii.gz" in err.value.problems[0]


def test_profiled_sources_are_all_checked(tmp_path: Path) -> None:
    for i in range(3):
        good_pair(tmp_path / "one", f"p{i}")
    (tmp_path / "two" / "images").mkdir(parents=True)
    (tmp_path / "two" / "masks").mkdir()
    cfg = RunConfig(
        sources={
            "one": DatasetConfig(kind="pairs", path=str(tmp_path / "one")),
            "two": DatasetConfig(kind="pairs", path=str(tmp_path / "two")),
        },
        hospitals=[HospitalConfig(source="one"), HospitalConfig(source="two")],
    )
    with pytest.raises(DataCheckError) as err:
        check_run_data(cfg)
    assert len(err.value.problems) == 1
    assert err.value.problems[0].startswith(f"{tmp_path / 'two' / 'images'}: no image files")


def test_simulation_checks_before_ray_starts(tmp_path: Path, monkeypatch) -> None:
    from simulations.engine import simulate

    started = []
    fake = types.ModuleType("flwr.simulation")
    fake.run_simulation = lambda **_: started.append(True)  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "flwr.simulation", fake)
    good_pair(tmp_path, "a")
    save(tmp_path / "images" / "b.png", np.zeros((24, 24), np.uint8))
    with pytest.raises(DataCheckError, match=r"b\.png: no mask"):
        simulate(run_on(tmp_path))
    assert not started


def test_hrf_passes_the_check() -> None:
    if not (DATA / "hrf").is_dir():
        pytest.skip("shared/data/hrf not available")
    assert check_run_data(load_config(SCENARIOS / "hrf.toml")) == []
