"""Loaders, label maps and patient-level splits, on generated files and on the real data sets."""

from __future__ import annotations

import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import tifffile
from PIL import Image

from fedseg.config import DatasetConfig, FederationConfig, ModelConfig, RunConfig, load_config
from fedseg.data import (
    DataError,
    LabelMap,
    SiteData,
    load_dataset,
    load_federation,
    load_nifti,
    load_pairs,
    mask_to_2d,
    site_for_partition,
    split_groups,
    synthetic_site,
    train_test_split,
)
from fedseg.data.pairs import read_mask

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
SCENARIOS = Path(__file__).resolve().parents[1] / "simulations" / "scenarios"


def needs(name: str) -> Path:
    path = DATA / name
    if not path.is_dir():
        pytest.skip(f"{path} not available")
    return path


def write_png(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def regions(h: int, w: int) -> np.ndarray:
    """Three large blocks, so every class survives any reasonable resize."""
    mask = np.zeros((h, w), np.uint8)
    mask[: h // 2, : w // 2] = 1
    mask[h // 2 :, w // 2 :] = 2
    return mask


def pairs_folder(root: Path, n: int = 4, h: int = 40, w: int = 40) -> Path:
    rng = np.random.default_rng(0)
    for i in range(n):
        mask = regions(h, w)
        image = (mask * 60 + rng.integers(0, 40, (h, w))).astype(np.uint8)
        write_png(root / "images" / f"p{i}_scan.png", image)
        write_png(root / "masks" / f"p{i}_scan.png", mask)
    return root


# --- labels ------------------------------------------------------------------------------


def test_label_map_jsrt_values() -> None:
    raw = np.array([[0, 150], [200, 250]], np.uint8)
    out = LabelMap([0, 150, 200, 250]).apply(raw, "x.png")
    assert out.dtype == np.int64
    assert out.tolist() == [[0, 1], [2, 3]]


def test_label_map_unexpected_value_names_file_and_value() -> None:
    raw = np.array([[0, 150], [201, 250]], np.uint8)
    with pytest.raises(DataError, match=r"JPCLN001\.png.*201"):
        LabelMap([0, 150, 200, 250]).apply(raw, "masks/JPCLN001.png")


def test_label_map_identity_with_names_rejects_extra_class() -> None:
    labels = LabelMap([], ["background", "nerve", "vessel"])
    assert labels.apply(np.array([[0, 2]]), "m.png").tolist() == [[0, 2]]
    with pytest.raises(DataError, match="m.png"):
        labels.apply(np.array([[0, 3]]), "m.png")


def test_label_map_length_mismatch() -> None:
    with pytest.raises(DataError, match="class_names"):
        LabelMap([0, 255], ["background", "a", "b"])


def test_rgb_mask_collapses_to_max_channel() -> None:
    rgb = np.zeros((4, 5, 3), np.uint8)
    rgb[1, 1] = 255
    rgb[2, 2, 0] = 255  # only the red channel set: still foreground
    out = mask_to_2d(rgb, "m.png")
    assert out.shape == (4, 5)
    assert out[1, 1] == 255 and out[2, 2] == 255 and out.sum() == 510


def test_palette_png_keeps_indices(tmp_path: Path) -> None:
    indices = np.zeros((6, 6), np.uint8)
    indices[:3] = 1
    indices[4:, 4:] = 2
    im = Image.new("P", (6, 6))
    im.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0] + [0] * (256 * 3 - 9))
    im.putdata(indices.ravel().tolist())
    im.save(tmp_path / "m.png")
    with Image.open(tmp_path / "m.png") as saved:
        assert saved.mode == "P"
    out = read_mask(tmp_path / "m.png")
    assert out.tolist() == indices.tolist()


# --- pairs -------------------------------------------------------------------------------


def test_resize_keeps_classes_and_scales_spacing(tmp_path: Path) -> None:
    folder = pairs_folder(tmp_path, n=2, h=60, w=90)
    cfg = DatasetConfig(kind="pairs", spacing_mm=0.5)
    data = load_pairs(folder, cfg, 32, "site")
    assert data.images.shape == (2, 1, 32, 32) and data.images.dtype == np.float32
    assert data.masks.shape == (2, 32, 32) and data.masks.dtype == np.int64
    assert set(np.unique(data.masks)) == {0, 1, 2}
    assert data.class_names == ["background", "class1", "class2"]
    np.testing.assert_allclose(data.spacing, [[0.5 * 60 / 32, 0.5 * 90 / 32]] * 2)
    assert data.units == "mm"
    np.testing.assert_allclose(data.images.mean(axis=(1, 2, 3)), 0, atol=1e-5)
    np.testing.assert_allclose(data.images.std(axis=(1, 2, 3)), 1, atol=1e-3)


def test_unknown_spacing_and_groups(tmp_path: Path) -> None:
    folder = pairs_folder(tmp_path, n=3)
    data = load_pairs(folder, DatasetConfig(kind="pairs", group_regex=r"^(p\d+)_"), 16, "s")
    assert np.isnan(data.spacing).all() and data.units == "px" and not data.spacing_known
    assert data.groups.tolist() == ["p0", "p1", "p2"]
    assert data.names == ["p0_scan.png", "p1_scan.png", "p2_scan.png"]
    assert len(load_pairs(folder, DatasetConfig(kind="pairs", max_items=2), 16, "s")) == 2


def test_constant_image_becomes_zeros(tmp_path: Path) -> None:
    write_png(tmp_path / "images" / "a.png", np.full((8, 8), 7, np.uint8))
    write_png(tmp_path / "labels" / "a.png", regions(8, 8))  # labels/ used when no masks/
    data = load_pairs(tmp_path, DatasetConfig(kind="pairs"), 8, "s")
    assert not data.images.any()


def test_spacing_from_csv(tmp_path: Path) -> None:
    folder = pairs_folder(tmp_path, n=2)
    csv = tmp_path / "spacing.csv"
    csv.write_text("filename,pixel size(mm),hc\np0_scan.png,0.1,3\np1_scan.png,0.2,4\n")
    data = load_pairs(folder, DatasetConfig(kind="pairs", spacing_csv=str(csv)), 20, "s")
    np.testing.assert_allclose(data.spacing[:, 0], [0.1 * 40 / 20, 0.2 * 40 / 20])
    csv.write_text("filename,pixel size(mm)\np0_scan.png,0.1\n")
    with pytest.raises(DataError, match="p1_scan.png"):
        load_pairs(folder, DatasetConfig(kind="pairs", spacing_csv=str(csv)), 20, "s")


def test_rgb_image_and_tiff(tmp_path: Path) -> None:
    mask = regions(10, 12)
    rgb = np.repeat((mask * 80)[..., None], 3, axis=2).astype(np.uint8)
    write_png(tmp_path / "images" / "a.png", rgb)
    (tmp_path / "masks").mkdir()
    tifffile.imwrite(tmp_path / "images" / "b.tif", mask.astype(np.float32) * 3.5)
    tifffile.imwrite(tmp_path / "masks" / "b.tiff", mask)
    write_png(tmp_path / "masks" / "a.png", mask)
    data = load_pairs(tmp_path, DatasetConfig(kind="pairs"), 12, "s")
    assert data.names == ["a.png", "b.tif"]
    # Both images are a monotone function of the mask, so after normalisation they agree.
    np.testing.assert_allclose(data.images[0], data.images[1], atol=1e-4)


@pytest.mark.parametrize("missing", ["masks", "images"])
def test_unpaired_file_is_named(tmp_path: Path, missing: str) -> None:
    folder = pairs_folder(tmp_path, n=2)
    (folder / missing / "p1_scan.png").unlink()
    other = "images" if missing == "masks" else "masks"
    with pytest.raises(DataError, match=rf"{other}/p1_scan\.png"):
        load_pairs(folder, DatasetConfig(kind="pairs"), 16, "s")


def test_size_mismatch_names_both_files(tmp_path: Path) -> None:
    folder = pairs_folder(tmp_path, n=1)
    write_png(folder / "masks" / "p0_scan.png", regions(30, 40))
    with pytest.raises(DataError, match=r"images/p0_scan\.png.*masks/p0_scan\.png"):
        load_pairs(folder, DatasetConfig(kind="pairs"), 16, "s")


@pytest.mark.parametrize("content", [b"not an image at all", "truncated"])
def test_corrupt_image_is_named(tmp_path: Path, content: bytes | str) -> None:
    folder = pairs_folder(tmp_path, n=2)
    target = folder / "images" / "p1_scan.png"
    data = target.read_bytes()
    target.write_bytes(data[: len(data) // 2] if content == "truncated" else content)
    with pytest.raises(DataError, match=r"p1_scan\.png"):
        load_pairs(folder, DatasetConfig(kind="pairs"), 16, "s")


def test_nan_in_tiff_image_is_named(tmp_path: Path) -> None:
    image = np.ones((8, 8), np.float32)
    image[3, 3] = np.nan
    (tmp_path / "images").mkdir()
    tifffile.imwrite(tmp_path / "images" / "bad.tif", image)
    write_png(tmp_path / "masks" / "bad.png", regions(8, 8))
    with pytest.raises(DataError, match=r"bad\.tif.*NaN"):
        load_pairs(tmp_path, DatasetConfig(kind="pairs"), 8, "s")


def test_empty_or_missing_folder(tmp_path: Path) -> None:
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    with pytest.raises(DataError, match="images"):
        load_pairs(tmp_path, DatasetConfig(kind="pairs"), 8, "s")
    with pytest.raises(DataError, match="nowhere"):
        load_pairs(tmp_path / "nowhere", DatasetConfig(kind="pairs"), 8, "s")


# --- NIfTI -------------------------------------------------------------------------------


def write_volume(path: Path, array: np.ndarray, zooms: tuple[float, float, float]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = nib.Nifti1Image(array, np.diag([*zooms, 1.0]))
    img.header.set_zooms(zooms)
    nib.save(img, path)


def test_nifti_slices_spacing_and_empty_slices(tmp_path: Path) -> None:
    label = np.zeros((10, 14, 6), np.uint8)
    label[2:8, 3:10, 1:4] = 1
    label[4:6, 5:8, 2] = 2
    image = (label * 50 + 10).astype(np.int16)
    for vol in ("v1", "v2"):
        write_volume(tmp_path / "images" / f"{vol}.nii.gz", image, (1.0, 2.0, 3.0))
        write_volume(tmp_path / "labels" / f"{vol}.nii.gz", label, (1.0, 2.0, 3.0))
    data = load_nifti(tmp_path, DatasetConfig(kind="nifti"), 16, "s")
    assert len(data) == 6  # 3 slices with foreground per volume
    assert data.names[:3] == ["v1.nii.gz#1", "v1.nii.gz#2", "v1.nii.gz#3"]
    assert data.groups.tolist() == ["v1"] * 3 + ["v2"] * 3
    np.testing.assert_allclose(data.spacing, [[1.0 * 10 / 16, 2.0 * 14 / 16]] * 6)
    assert data.class_names == ["background", "class1", "class2"]
    assert (
        len(load_nifti(tmp_path, DatasetConfig(kind="nifti", keep_empty_slices=True), 16, "s"))
        == 12
    )
    along_x = load_nifti(tmp_path, DatasetConfig(kind="nifti", axis=0, max_items=1), 16, "s")
    np.testing.assert_allclose(along_x.spacing[0], [2.0 * 14 / 16, 3.0 * 6 / 16])


def test_nifti_shape_mismatch_names_both(tmp_path: Path) -> None:
    write_volume(tmp_path / "images" / "v.nii.gz", np.zeros((4, 4, 3), np.int16), (1, 1, 1))
    write_volume(tmp_path / "labels" / "v.nii.gz", np.zeros((4, 4, 2), np.uint8), (1, 1, 1))
    with pytest.raises(DataError, match=r"images/v\.nii\.gz.*labels/v\.nii\.gz"):
        load_nifti(tmp_path, DatasetConfig(kind="nifti"), 8, "s")


# --- SiteData and splits -----------------------------------------------------------------


def toy(groups: list[str], name: str = "toy", classes: int = 2) -> SiteData:
    n = len(groups)
    return SiteData(
        name=name,
        images=np.arange(n, dtype=np.float32).reshape(n, 1, 1, 1).repeat(4, 2).repeat(4, 3),
        masks=np.zeros((n, 4, 4), np.int64),
        spacing=np.full((n, 2), np.nan),
        groups=np.array(groups, dtype=str),
        names=[f"s{i}" for i in range(n)],
        class_names=["background"] + [f"class{i}" for i in range(1, classes)],
    )


def test_subset_and_concat() -> None:
    data = toy(["a", "a", "b"])
    sub = data.subset([2, 0], name="x")
    assert sub.name == "x" and sub.names == ["s2", "s0"] and sub.groups.tolist() == ["b", "a"]
    both = SiteData.concat([data, sub], "pool")
    assert len(both) == 5 and both.num_classes == 2 and both.units == "px"
    with pytest.raises(DataError, match="class_names"):
        SiteData.concat([data, toy(["c"], classes=3)], "pool")


def test_split_groups_never_shares_a_group() -> None:
    rng = np.random.default_rng(1)
    groups = [f"g{g}" for g in range(23) for _ in range(int(rng.integers(1, 9)))]
    data = toy(groups)
    parts = split_groups(data, 3, seed=5, names=["a", "b", "c"])
    assert [p.name for p in parts] == ["a", "b", "c"]
    assert sum(len(p) for p in parts) == len(data)
    sets = [set(p.groups) for p in parts]
    assert not (sets[0] & sets[1] or sets[0] & sets[2] or sets[1] & sets[2])
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 8  # at most one largest group apart
    again = split_groups(data, 3, seed=5, names=["a", "b", "c"])
    assert [p.names for p in parts] == [p.names for p in again]
    with pytest.raises(DataError, match="3 sites"):
        split_groups(toy(["a", "a", "b"]), 3, 0, ["x", "y", "z"])


def test_train_test_split_by_group() -> None:
    data = toy([f"g{i // 3}" for i in range(30)])
    train, test = train_test_split(data, 0.2, seed=0)
    assert len(train) + len(test) == 30 and len(test) == 6
    assert not set(train.groups) & set(test.groups)
    train, test = train_test_split(toy(["a", "b"]), 0.01, seed=0)
    assert len(train) == 1 and len(test) == 1
    with pytest.raises(DataError):
        train_test_split(toy(["a", "a"]), 0.2, seed=0)


# --- synthetic ---------------------------------------------------------------------------


def test_synthetic_is_deterministic_and_fast() -> None:
    start = time.perf_counter()
    big = synthetic_site(0, 100, 128, seed=0, name="h")
    assert time.perf_counter() - start < 2.0
    again = synthetic_site(0, 5, 128, seed=0, name="h")
    np.testing.assert_array_equal(big.images[:5], again.images)
    np.testing.assert_array_equal(big.masks[:5], again.masks)
    other = synthetic_site(0, 5, 128, seed=1, name="h")
    assert not np.array_equal(other.images, again.images)
    assert big.class_names == ["background", "organ", "lesion"]
    assert len(set(big.groups)) == 100 and big.units == "mm"


def test_synthetic_sites_differ_but_stay_learnable() -> None:
    sites = [synthetic_site(i, 24, 64, seed=0, name=f"h{i}") for i in range(4)]
    organ_means, lesion_shift = [], []
    for site in sites:
        x, y = site.images[:, 0], site.masks
        assert set(np.unique(y)) == {0, 1, 2}
        background, organ, lesion = (float(x[y == c].mean()) for c in range(3))
        assert organ - background > 0.5  # a clear margin a small CNN can pick up
        organ_means.append(organ)
        lesion_shift.append(lesion - organ)
    assert max(organ_means) - min(organ_means) > 0.2
    assert min(lesion_shift) < 0 < max(lesion_shift)  # lesions darker at some sites
    assert len({float(s.spacing[0, 0]) for s in sites}) > 1


def test_load_federation_synthetic_and_cache() -> None:
    cfg = RunConfig(
        data=DatasetConfig(synthetic_train=6, synthetic_test=3),
        federation=FederationConfig(num_sites=2),
        model=ModelConfig(image_size=32),
    )
    sites = load_federation(cfg)
    assert [s.name for s in sites] == ["hospital-1", "hospital-2"]
    assert [(len(s.train), len(s.test)) for s in sites] == [(6, 3), (6, 3)]
    assert not set(sites[0].train.groups) & set(sites[0].test.groups)
    assert site_for_partition(cfg, 1) is site_for_partition(cfg, 1)
    np.testing.assert_array_equal(site_for_partition(cfg, 1).test.images, sites[1].test.images)
    with pytest.raises(DataError, match="partition_id"):
        site_for_partition(cfg, 2)


def test_load_federation_shares_out_test_folder(tmp_path: Path) -> None:
    pairs_folder(tmp_path / "set", n=7)
    pairs_folder(tmp_path / "set" / "test", n=4)
    cfg = RunConfig(
        data=DatasetConfig(
            kind="pairs", path=str(tmp_path / "set"), test_path=str(tmp_path / "set" / "test")
        ),
        federation=FederationConfig(num_sites=2),
        model=ModelConfig(image_size=32),
    )
    sites = load_federation(cfg)
    assert [s.name for s in sites] == ["set-1", "set-2"]
    assert sum(len(s.train) for s in sites) == 7 and [len(s.test) for s in sites] == [2, 2]
    assert load_dataset(cfg.data, 16).images.shape == (7, 1, 16, 16)


# --- real data sets ----------------------------------------------------------------------


def test_real_us_nerve() -> None:
    data = load_dataset(DatasetConfig(kind="pairs", max_items=12), 128, str(needs("us-nerve")))
    assert len(data) == 12 and data.units == "px" and data.num_classes == 3
    assert set(np.unique(data.masks)) == {0, 1, 2}


def test_real_hc18_spacing_from_csv() -> None:
    root = needs("hc18")
    cfg = DatasetConfig(
        kind="pairs",
        label_values=[0, 255],
        spacing_csv=str(root / "pixel_size_and_hc.csv"),
        group_regex=r"^(\d+)_",
        max_items=12,
    )
    data = load_dataset(cfg, 128, str(root))
    assert data.units == "mm" and set(np.unique(data.masks)) == {0, 1}
    for name, (row_mm, col_mm) in zip(data.names, data.spacing, strict=True):
        with Image.open(root / "images" / name) as im:
            w, h = im.size
        original = row_mm * 128 / h
        assert 0.05 <= original <= 0.3
        assert col_mm * 128 / w == pytest.approx(original)
    assert all(g.isdigit() for g in data.groups)


def test_real_jsrt_label_values() -> None:
    cfg = DatasetConfig(kind="pairs", label_values=[0, 150, 200, 250], max_items=10)
    data = load_dataset(cfg, 128, str(needs("jsrt")))
    assert set(np.unique(data.masks)) == {0, 1, 2, 3}
    # SCR convention: 150 is the patient's right lung, shown on the left of the image.
    cols = np.arange(128)
    assert (data.masks == 1).mean(axis=(0, 1)) @ cols < (data.masks == 2).mean(axis=(0, 1)) @ cols


def test_real_hippocampus_spacing_and_groups() -> None:
    root = needs("hippocampus")
    data = load_dataset(DatasetConfig(kind="nifti", max_items=6), 128, str(root))
    assert data.units == "mm" and set(np.unique(data.masks)) == {0, 1, 2}
    first = data.names[0].split("#")[0]
    shape = nib.load(root / "images" / first).shape
    np.testing.assert_allclose(data.spacing[0], [shape[0] / 128, shape[1] / 128])
    train, test = train_test_split(data, 0.3, seed=0)
    assert not set(train.groups) & set(test.groups)
    assert len(set(data.groups)) == 6


@pytest.mark.parametrize("scenario", ["us-nerve", "hc18", "jsrt", "hippocampus"])
def test_scenario_configs_load(scenario: str) -> None:
    needs(scenario)
    cfg = load_config(SCENARIOS / f"{scenario}.toml")
    assert cfg.federation.num_sites == 3 and Path(cfg.data.path).is_dir()
    cfg.data.max_items = 12  # keep the test fast; full sizes are in the data README
    cfg.model.image_size = 64
    sites = load_federation(cfg)
    assert [s.name for s in sites] == [f"{scenario}-{i}" for i in (1, 2, 3)]
    seen: set[str] = set()
    for site in sites:
        assert len(site.train) and len(site.test)
        assert site.train.class_names == cfg.data.class_names
        groups = set(site.train.groups) | set(site.test.groups)
        assert not set(site.train.groups) & set(site.test.groups) and not groups & seen
        seen |= groups


def _same_site(a, b) -> None:
    for split in ("train", "test"):
        x, y = getattr(a, split), getattr(b, split)
        assert (x.name, x.names, x.class_names) == (y.name, y.names, y.class_names)
        assert np.array_equal(x.images, y.images) and np.array_equal(x.masks, y.masks)
        assert np.array_equal(x.groups, y.groups)
        assert np.array_equal(x.spacing, y.spacing, equal_nan=True)


@pytest.mark.parametrize("scenario", ["hc18", "us-nerve"])
def test_a_simulated_hospital_loads_its_own_part_only(scenario, monkeypatch):
    """A hospital's part of a shared set (hc18: held out from its part; us-nerve: its part of
    the test folder too) is the part the whole federation's load cuts, with only its own
    images decoded."""
    cfg = load_config(SCENARIOS / f"{scenario}.toml")
    if not Path(cfg.data.path).is_dir():
        pytest.skip(f"{cfg.data.path} is not here")
    cfg.data.max_items = 90
    whole = load_federation(cfg)
    import fedseg.data.pairs as pairs

    decoded: list[str] = []
    read = pairs.read_image
    monkeypatch.setattr(
        pairs, "read_image", lambda path, *a: decoded.append(path) or read(path, *a)
    )
    for i, site in enumerate(whole):
        decoded.clear()
        _same_site(load_federation(cfg, only=i)[0], site)
        assert len(decoded) == len(site.train) + len(site.test)


def test_open_classes_are_read_from_every_mask_even_for_one_hospital(tmp_path):
    """Without a label map the classes come from every mask, so a hospital's own part of the
    set has the same classes as the federation's (here only one hospital's masks hold class 2)."""
    folder = tmp_path / "set"
    (folder / "images").mkdir(parents=True)
    (folder / "masks").mkdir()
    for i in range(9):
        mask = np.zeros((16, 16), np.uint8)
        mask[2:8, 2:8] = 1
        if i == 0:
            mask[10:14, 10:14] = 2
        Image.fromarray((40 + 60 * mask).astype(np.uint8)).save(folder / "images" / f"{i}.png")
        Image.fromarray(mask).save(folder / "masks" / f"{i}.png")
    cfg = RunConfig(
        data=DatasetConfig(kind="pairs", path=str(folder)),
        federation=FederationConfig(num_sites=3, test_fraction=0.34),
        model=ModelConfig(image_size=16),
    )
    whole = load_federation(cfg)
    assert len(whole[0].train.class_names) == 3
    for i, site in enumerate(whole):
        _same_site(load_federation(cfg, only=i)[0], site)
