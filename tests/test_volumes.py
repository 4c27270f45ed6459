"""Volumes scored as volumes (fedseg/data/volumes.py, fedseg/evaluation.py volume_metrics):
whole test volumes, reassembly in slice order on the volume's own grid, distances in mm from
the NIfTI header, predicted volumes written with the source's affine and header, 2.5D input,
and the 3D UNet reference."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from fedseg.config import ConfigError, DatasetConfig, RunConfig, config_from_dict
from fedseg.data import load_federation, train_test_split
from fedseg.data.nifti import load_nifti
from fedseg.data.volumes import predicted_volumes, whole_volumes, with_context
from fedseg.evaluation import mean_over_sites, volume_metrics
from fedseg.site import evaluate_predictions, predictions_dir, score_test
from strategies.evaluation import checked_metrics

AFFINE = np.array([[-0.9, 0, 0, 12.0], [0, 1.1, 0, -7.0], [0, 0, 3.0, 40.0], [0, 0, 0, 1]])


def make_volumes(folder: Path, n: int = 4, shape=(32, 32, 9)) -> None:
    """Volumes whose slice z has intensity pattern z (so slices are told apart) and a label
    box over slices 2..6 (classes 1 and 2); slices 0, 1, 7, 8 have no foreground."""
    (folder / "images").mkdir(parents=True)
    (folder / "labels").mkdir()
    rng = np.random.default_rng(0)
    for i in range(n):
        image = rng.random(shape).astype(np.float32) + np.arange(shape[2])[None, None, :]
        label = np.zeros(shape, np.uint8)
        label[8 + i : 20, 6:18, 2:7] = 1
        label[20:26, 6:18, 2:7] = 2
        for name, data in (("images", image), ("labels", label)):
            img = nib.Nifti1Image(data, AFFINE)
            img.header["descrip"] = b"fedseg volume test"
            nib.save(img, folder / name / f"case_{i:03d}.nii.gz")


def nifti_config(folder: Path, size: int = 32, context: int = 1) -> DatasetConfig:
    return DatasetConfig(
        kind="nifti",
        path=str(folder),
        class_names=["background", "a", "b"],
        axis=2,
        context_slices=context,
    )


@pytest.fixture(scope="module")
def volumes(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("volumes")
    make_volumes(folder)
    return folder


def test_context_channels_are_the_neighbours_with_the_end_slice_repeated():
    planes = np.arange(5, dtype=np.float32)[:, None, None] * np.ones((1, 2, 2), np.float32)
    three = with_context(planes, 3)[:, :, 0, 0]
    np.testing.assert_array_equal(three, [[0, 0, 1], [0, 1, 2], [1, 2, 3], [2, 3, 4], [3, 4, 4]])
    five = with_context(planes, 5)[:, :, 0, 0]
    np.testing.assert_array_equal(five[0], [0, 0, 0, 1, 2])
    np.testing.assert_array_equal(five[1], [0, 0, 1, 2, 3])
    np.testing.assert_array_equal(five[4], [2, 3, 4, 4, 4])
    with pytest.raises(ValueError, match="odd"):
        with_context(planes, 2)


def test_a_2_5d_sample_is_its_slice_and_its_neighbours_even_where_they_are_not_samples(volumes):
    flat = load_nifti(volumes, nifti_config(volumes), 32, "flat")
    stacked = load_nifti(volumes, nifti_config(volumes, context=3), 32, "stacked")
    assert stacked.images.shape == (len(flat), 3, 32, 32) and stacked.context == 3
    np.testing.assert_array_equal(stacked.images[:, 1], flat.images[:, 0])  # the slice itself
    np.testing.assert_array_equal(stacked.masks, flat.masks)
    # Slice 2 is the first with foreground: its lower neighbour (slice 1) is no sample, but
    # it is the channel below; the upper neighbour is slice 3, the next sample.
    first = np.flatnonzero(stacked.slice_index == 2)[0]
    assert stacked.slice_index[first + 1] == 3
    np.testing.assert_array_equal(stacked.images[first, 2], flat.images[first + 1, 0])
    volume = stacked.volumes[stacked.groups[first]]
    below = volume.rest_images[list(volume.rest_index).index(1)]
    np.testing.assert_array_equal(stacked.images[first, 0], below[1])
    assert stacked.shown(np.array([first])).shape == (1, 1, 32, 32)


def test_a_whole_test_split_has_every_slice_in_order_and_the_same_per_slice_scores(volumes):
    data = load_nifti(volumes, nifti_config(volumes), 32, "site")
    train, test = train_test_split(data, 0.5, 0)
    whole = whole_volumes(test)
    assert len(whole) == 9 * len(test.volumes) and len(test) == 5 * len(test.volumes)
    for group in test.volumes:
        mine = whole.groups == group
        assert whole.slice_index[mine].tolist() == list(range(9))  # in order along the axis
        empty = whole.masks[mine][[0, 1, 7, 8]]
        assert not empty.any()
    assert whole_volumes(whole).images.shape == whole.images.shape  # idempotent
    # Empty slices add nothing per slice: a class counts where the truth has it.
    rng = np.random.default_rng(1)
    pred = np.where(rng.random(whole.masks.shape) < 0.1, 1, whole.masks)
    kept = np.flatnonzero(whole.masks.reshape(len(whole), -1).any(1))
    on_whole = evaluate_predictions(whole, pred)
    on_samples = evaluate_predictions(whole.subset(kept), pred[kept])
    assert on_whole["dice"] == pytest.approx(on_samples["dice"])
    assert on_whole["volume"]["n_volumes"] == len(test.volumes)


def test_volumes_are_reassembled_by_slice_position_not_by_sample_order(volumes):
    data = whole_volumes(load_nifti(volumes, nifti_config(volumes), 32, "site"))
    shuffled = data.subset(np.random.default_rng(3).permutation(len(data)))
    rebuilt = predicted_volumes(shuffled, shuffled.masks)
    for group, volume in shuffled.volumes.items():
        # 32 px slices at 32 px: no resampling, so the truth comes back voxel for voxel
        np.testing.assert_array_equal(rebuilt[group], volume.label)
        truth = np.asarray(nib.load(volume.path.replace("images", "labels")).dataobj)
        np.testing.assert_array_equal(rebuilt[group], truth)
    # A slice moved to another position is a different volume.
    swapped = shuffled.subset(np.arange(len(shuffled)))
    a, b = np.flatnonzero(swapped.groups == swapped.groups[0])[:2]
    swapped.slice_index[[a, b]] = swapped.slice_index[[b, a]]
    moved = predicted_volumes(swapped, swapped.masks)[swapped.groups[0]]
    assert not np.array_equal(moved, shuffled.volumes[swapped.groups[0]].label)
    with pytest.raises(ValueError, match="slices"):
        predicted_volumes(data.subset(np.arange(1, len(data))), data.masks[1:])


def test_resized_slices_go_back_to_the_volume_grid(volumes):
    data = whole_volumes(load_nifti(volumes, nifti_config(volumes), 64, "site"))
    assert data.masks.shape[1:] == (64, 64)
    rebuilt = predicted_volumes(data, data.masks)
    for group, volume in data.volumes.items():
        assert rebuilt[group].shape == volume.shape == (32, 32, 9)
        metrics = volume_metrics(
            [rebuilt[group]], [volume.label], [volume.spacing], ["bg", "a", "b"]
        )
        assert metrics["dice_mean"] > 0.97  # 32 -> 64 -> 32 px loses almost nothing


def test_distances_are_in_mm_of_the_header_spacing():
    truth = np.zeros((20, 20, 12), np.int64)
    truth[5:15, 5:15, 3:8] = 1
    pred = np.roll(truth, 1, axis=2)  # one slice off along the 3 mm axis
    names = ["background", "a"]
    in_mm = volume_metrics([pred], [truth], [(0.9, 1.1, 3.0)], names)
    assert in_mm["units"] == "mm" and in_mm["hd95"]["a"] == pytest.approx(3.0)
    in_px = volume_metrics([pred], [truth], [(np.nan, 1.0, 1.0)], names)
    assert in_px["units"] == "px" and in_px["hd95"]["a"] == pytest.approx(1.0)
    assert in_mm["dice"]["a"] == pytest.approx(0.8)  # 4 of 5 slices overlap
    nothing = volume_metrics([np.zeros_like(truth)], [truth], [(1.0, 1.0, 3.0)], names)
    diagonal = np.sqrt(20**2 + 20**2 + 36**2)
    assert nothing["dice"]["a"] == 0 and nothing["hd95"]["a"] == pytest.approx(diagonal)


def test_the_loader_keeps_the_header_spacing_for_the_volume_metrics(volumes):
    data = whole_volumes(load_nifti(volumes, nifti_config(volumes), 32, "site"))
    group = data.groups[0]
    assert data.volumes[group].spacing == pytest.approx((0.9, 1.1, 3.0))
    mine = np.flatnonzero(data.groups == group)
    pred = data.masks.copy()
    # the prediction of each slice is the truth of the slice below: one slice (3 mm) off
    order = mine[np.argsort(data.slice_index[mine])]
    pred[order[1:]] = data.masks[order[:-1]]
    pred[order[0]] = 0
    metrics = evaluate_predictions(data.subset(mine), pred[mine])
    assert metrics["volume"]["hd95"]["a"] == pytest.approx(3.0)


def test_predicted_volumes_are_written_with_the_source_affine_header_and_shape(volumes, tmp_path):
    data = whole_volumes(load_nifti(volumes, nifti_config(volumes), 64, "site"))
    cfg = RunConfig(out_dir=str(tmp_path))
    cfg.evaluation.write_volumes = True
    pred = data.masks.copy()
    score_test(cfg, data, pred, (tmp_path, "hospital-1", "blind split training"))
    folder = predictions_dir(tmp_path, "hospital-1", "blind split training")
    assert folder == tmp_path / "sites" / "hospital-1" / "predictions" / "blind-split-training"
    written = sorted(folder.glob("*.nii.gz"))
    assert [p.name.split(".")[0] for p in written] == sorted(data.volumes)
    rebuilt = predicted_volumes(data, pred)
    for path in written:
        source = nib.load(data.volumes[path.name.split(".")[0]].path)
        mask = nib.load(path)
        assert mask.shape == source.shape
        np.testing.assert_allclose(mask.affine, source.affine)
        assert mask.header.get_zooms() == pytest.approx(source.header.get_zooms())
        assert mask.header["descrip"].tobytes().startswith(b"fedseg volume test")
        np.testing.assert_array_equal(np.asarray(mask.dataobj), rebuilt[path.name.split(".")[0]])


def test_sites_report_means_and_counts_and_the_federation_pools_volumes():
    def site(dice_a: float, n: int) -> dict:
        block = {
            "dice": {"a": dice_a},
            "hd95": {"a": 1.0},
            "asd": {"a": 0.5},
            "dice_mean": dice_a,
            "hd95_mean": 1.0,
            "asd_mean": 0.5,
            "units": "mm",
            "n_volumes": n,
            "n_scored": {"a": n},
        }
        return {"dice_mean": 0.5, "hd95_mean": 1, "asd_mean": 1, "units": "mm", "volume": block}

    mean = mean_over_sites({"s1": site(0.9, 3), "s2": site(0.5, 1)})
    assert mean["volume"]["dice"]["a"] == pytest.approx((0.9 * 3 + 0.5) / 4)  # over volumes
    assert mean["volume"]["n_volumes"] == 4
    assert "volume" not in mean_over_sites({"s1": {"dice_mean": 0.5, "units": "px"}})


def test_the_server_refuses_forged_volume_scores():
    good = {
        "dice": {"a": 0.5},
        "hd95": {"a": 1.0},
        "asd": {"a": 1.0},
        "dice_mean": 0.5,
        "hd95_mean": 1.0,
        "asd_mean": 1.0,
        "units": "mm",
        "n_test": 3,
    }
    import json

    checked_metrics(json.dumps({**good, "volume": {**good, "n_volumes": 1}}), 3)
    forged = {**good, "volume": {**good, "dice": {"a": 1.5}}}
    with pytest.raises(ValueError, match="volume dice"):
        checked_metrics(json.dumps(forged), 3)
    with pytest.raises(ValueError, match="volume hd95"):
        checked_metrics(json.dumps({**good, "volume": {**good, "hd95_mean": -2}}), 3)


def test_context_slices_are_checked(volumes):
    base = {"data": {"kind": "nifti", "path": str(volumes), "context_slices": 3}}
    assert config_from_dict(base).data.context_slices == 3
    with pytest.raises(ConfigError, match="context_slices"):
        config_from_dict({"data": {**base["data"], "context_slices": 2}})
    with pytest.raises(ConfigError, match="needs volumes"):
        config_from_dict({"data": {"kind": "pairs", "path": "x", "context_slices": 3}})
    # 0 (the default): 3 slices when the run reads only volumes, else 1
    auto = config_from_dict({"data": {"kind": "nifti", "path": str(volumes)}})
    assert auto.data.context_slices == 3
    assert config_from_dict({"data": {"kind": "pairs", "path": "x"}}).data.context_slices == 1
    mixed = config_from_dict(
        {
            "sources": {"mri": {"kind": "nifti", "path": str(volumes)}},
            "hospitals": [{"source": "mri"}, {"source": "synthetic"}],
        }
    )
    assert mixed.sources["mri"].context_slices == 1


def test_a_federation_of_volumes_scores_whole_test_volumes_and_trains_on_samples(volumes):
    cfg = config_from_dict(
        {
            "data": {
                "kind": "nifti",
                "path": str(volumes),
                "class_names": ["background", "a", "b"],
                "context_slices": 3,
            },
            "federation": {"num_sites": 2, "test_fraction": 0.5},
            "model": {"image_size": 32},
        }
    )
    for site in load_federation(cfg):
        assert site.train.masks.reshape(len(site.train), -1).any(1).all()  # foreground only
        assert len(site.test) == 9 * len(site.test.volumes) and site.test.images.shape[1] == 3
    cfg.evaluation.per_volume = False
    for site in load_federation(cfg):
        assert len(site.test) == 5 * len(site.test.volumes)


def test_the_3d_unet_reference_scores_per_volume_and_per_slice(volumes, tmp_path):
    from fedseg.reference_runs import centralized_unet3d

    cfg = config_from_dict(
        {
            "data": {
                "kind": "nifti",
                "path": str(volumes),
                "class_names": ["background", "a", "b"],
            },
            "federation": {"num_sites": 2, "test_fraction": 0.5},
            "model": {"image_size": 32},
            "baselines": {"epochs": 1, "unet3d_channels": [4, 8]},
            "out_dir": str(tmp_path),
        }
    )
    cfg.training.threads = 1
    sites = load_federation(cfg)
    block, examples = centralized_unet3d(cfg, sites, 0.0)
    assert block["epochs"] == 1 and set(block["sites"]) == {s.name for s in sites}
    for site in sites:
        scores = block["sites"][site.name]
        assert scores["n_test"] == len(site.test)
        assert scores["volume"]["n_volumes"] == len(site.test.volumes)
        assert 0 <= scores["volume"]["dice_mean"] <= 1


@pytest.mark.slow
def test_a_flower_run_on_volumes_reports_per_volume_and_writes_volumes_at_the_sites(
    volumes, tmp_path
):
    """Through Flower and Ray: the sites score whole test volumes, only metrics come back, and
    each site's predicted volumes are on its own disk with their sources' geometry."""
    import json

    from simulations.engine import simulate
    from tests.helpers import blind_config

    cfg = blind_config(tmp_path / "out", sites=2, epochs=1)
    cfg.data = nifti_config(volumes, context=3)
    cfg.data.class_names = ["background", "a", "b"]
    cfg.data.channels = 1
    cfg.federation.test_fraction = 0.5
    cfg.evaluation.write_volumes = True
    cfg.validate()
    simulate(cfg)
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert not metrics["dropped"]
    assert metrics["mean"]["volume"]["n_volumes"] == 2
    for site, scores in metrics["sites"].items():
        assert scores["n_test"] == 9 and scores["volume"]["units"] == "mm"
        written = list(predictions_dir(tmp_path / "out", site, "blind split training").iterdir())
        assert len(written) == 1
        mask, source = nib.load(written[0]), nib.load(volumes / "images" / written[0].name)
        assert mask.shape == source.shape
        np.testing.assert_allclose(mask.affine, source.affine)
    assert "Per volume (3D" in (tmp_path / "out" / "report.md").read_text()


def test_fedseg_segment_reads_a_volume_as_training_did_and_writes_it_back_in_place(
    volumes, tmp_path
):
    from fedseg.serving.images import read_scan, write_mask

    source = volumes / "images" / "case_000.nii.gz"
    flat = read_scan(source, 64, 2)
    stacked = read_scan(source, 64, 2, context=3)
    assert stacked.images.shape == (9, 3, 64, 64)
    np.testing.assert_array_equal(stacked.images[:, 1], flat.images[:, 0])
    np.testing.assert_array_equal(stacked.images[0, 0], flat.images[0, 0])  # edge repeats
    truth = np.asarray(nib.load(volumes / "labels" / "case_000.nii.gz").dataobj).astype(np.int64)
    data = whole_volumes(load_nifti(volumes, nifti_config(volumes), 64, "site"))
    mine = np.flatnonzero(data.groups == "case_000")
    pred = data.masks[mine][np.argsort(data.slice_index[mine])]  # slices in order, at 64 px
    out = write_mask(stacked, pred, tmp_path / "mask.nii.gz", [])
    written = nib.load(out)
    assert written.shape == truth.shape
    np.testing.assert_allclose(written.affine, nib.load(source).affine)
    # the same resampling evaluation scores with
    expected = predicted_volumes(data.subset(mine), data.masks[mine])["case_000"]
    np.testing.assert_array_equal(np.asarray(written.dataobj), expected)


def test_the_report_labels_per_slice_and_per_volume_figures():
    from fedseg.report import render_report

    per_slice = {"dice": {"a": 0.7}, "hd95": {"a": 3.0}, "asd": {"a": 1.0}, "units": "mm"}
    volume = {
        "dice": {"a": 0.85},
        "hd95": {"a": 2.5},
        "asd": {"a": 0.6},
        "dice_mean": 0.85,
        "units": "mm",
        "n_volumes": 5,
        "n_scored": {"a": 5},
    }
    site = {**per_slice, "dice_mean": 0.7, "hd95_mean": 3.0, "asd_mean": 1.0, "n_test": 40}
    metrics = {"method": "blind split training", "sites": {"h1": {**site, "volume": volume}}}
    metrics["mean"] = mean_over_sites(metrics["sites"])
    text = render_report(metrics, [], "run")
    assert "0.700 per slice (0.850 per volume)" in text
    assert "## Blind split training (per slice): per site" in text
    assert "## Per volume (3D, the Decathlon convention)" in text
    assert "| blind split training | 5 | 0.850 | 0.850 | 2.50 | 0.60 | mm |" in text
