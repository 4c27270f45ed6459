"""Metric values on hand-checkable shapes, so a MONAI upgrade cannot silently change them."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fedseg.evaluation import dice_per_image, mean_over_sites, segmentation_metrics

NAMES = ["background", "organ"]
H = W = 48


def square(y: int, x: int, size: int, label: int = 1) -> np.ndarray:
    out = np.zeros((H, W), dtype=np.int64)
    out[y : y + size, x : x + size] = label
    return out


def vline(x: int) -> np.ndarray:
    """A 1-px wide vertical line: every edge pixel sits exactly the shift away from the other."""
    out = np.zeros((H, W), dtype=np.int64)
    out[10:40, x] = 1
    return out


def test_perfect_prediction() -> None:
    truth = np.stack([square(5, 5, 10), square(20, 20, 12)])
    m = segmentation_metrics(truth.copy(), truth, NAMES, None)
    assert m["dice"] == {"organ": 1.0}
    assert m["hd95"]["organ"] == 0.0 and m["asd"]["organ"] == 0.0
    assert m["dice_mean"] == 1.0
    assert m["units"] == "px" and m["n_test"] == 2
    assert all(isinstance(v, float) for v in (m["dice_mean"], m["hd95_mean"], m["asd_mean"]))


def test_dice_of_overlapping_squares() -> None:
    # 10x10 squares shifted by 3 columns: overlap 10x7 = 70 -> Dice 2*70/(100+100) = 0.7
    m = segmentation_metrics(square(5, 8, 10)[None], square(5, 5, 10)[None], NAMES, None)
    assert m["dice"]["organ"] == pytest.approx(0.7)


def test_hd95_of_shifted_square_is_the_shift() -> None:
    m = segmentation_metrics(square(10, 13, 20)[None], square(10, 10, 20)[None], NAMES, None)
    assert m["hd95"]["organ"] == pytest.approx(3.0)


def test_distances_of_shifted_line_and_spacing() -> None:
    pred, truth = vline(13)[None], vline(10)[None]
    px = segmentation_metrics(pred, truth, NAMES, None)
    assert px["hd95"]["organ"] == pytest.approx(3.0)
    assert px["asd"]["organ"] == pytest.approx(3.0)
    mm = segmentation_metrics(pred, truth, NAMES, np.array([[0.5, 0.5]]))
    assert mm["units"] == "mm"
    assert mm["hd95"]["organ"] == pytest.approx(1.5)
    assert mm["asd"]["organ"] == pytest.approx(1.5)
    # spacing is (row, column): only the column spacing matters for a horizontal shift
    aniso = segmentation_metrics(pred, truth, NAMES, np.array([[2.0, 0.5]]))
    assert aniso["hd95"]["organ"] == pytest.approx(1.5)


def test_per_image_spacing_and_unknown_spacing() -> None:
    pred, truth = np.stack([vline(13)] * 2), np.stack([vline(10)] * 2)
    m = segmentation_metrics(pred, truth, NAMES, np.array([[1.0, 1.0], [0.5, 0.5]]))
    assert m["hd95"]["organ"] == pytest.approx((3.0 + 1.5) / 2)
    isotropic = segmentation_metrics(pred, truth, NAMES, np.array([1.0, 0.5]))
    assert isotropic["hd95"]["organ"] == pytest.approx((3.0 + 1.5) / 2)
    unknown = segmentation_metrics(pred, truth, NAMES, np.array([[0.5, 0.5], [np.nan, np.nan]]))
    assert unknown["units"] == "px"
    assert unknown["hd95"]["organ"] == pytest.approx(3.0)


def test_predicted_empty_counts_as_diagonal() -> None:
    truth = square(5, 5, 10)[None]
    pred = np.zeros_like(truth)
    m = segmentation_metrics(pred, truth, NAMES, None)
    assert m["dice"]["organ"] == 0.0
    assert m["hd95"]["organ"] == pytest.approx(math.hypot(H, W))
    assert m["asd"]["organ"] == pytest.approx(math.hypot(H, W))
    mm = segmentation_metrics(pred, truth, NAMES, np.array([[0.5, 2.0]]))
    assert mm["hd95"]["organ"] == pytest.approx(math.hypot(H * 0.5, W * 2.0))


def test_absent_class_is_none_and_predicted_absent_class_is_ignored() -> None:
    names = ["background", "organ", "tumour"]
    truth = square(5, 5, 10)[None]
    pred = truth + square(30, 30, 5)[None] * 2  # tumour predicted but not in the truth
    m = segmentation_metrics(pred, truth, names, None)
    assert m["dice"]["tumour"] is None
    assert m["hd95"]["tumour"] is None and m["asd"]["tumour"] is None
    assert m["dice"]["organ"] == 1.0
    assert m["dice_mean"] == 1.0  # the mean is over classes that have a value


def test_class_scored_only_where_present() -> None:
    # image 0 has the organ and is perfect; image 1 has none but predicts some: ignored
    truth = np.stack([square(5, 5, 10), np.zeros((H, W), dtype=np.int64)])
    pred = np.stack([square(5, 5, 10), square(20, 20, 5)])
    m = segmentation_metrics(pred, truth, NAMES, None)
    assert m["dice"]["organ"] == 1.0 and m["hd95"]["organ"] == 0.0


@pytest.mark.parametrize(
    ("pred", "truth", "spacing", "field"),
    [
        (np.zeros((1, 4, 4), np.int64), np.zeros((1, 4, 5), np.int64), None, "pred"),
        (np.zeros((1, 4, 4), np.float32), np.zeros((1, 4, 4), np.int64), None, "pred"),
        (np.zeros((1, 4, 4), np.int64), np.full((1, 4, 4), 2, np.int64), None, "truth"),
        (np.zeros((1, 4, 4), np.int64), np.zeros((4, 4), np.int64), None, "truth"),
        (np.zeros((1, 4, 4), np.int64), np.zeros((1, 4, 4), np.int64), np.ones((2, 2)), "spacing"),
        (np.zeros((1, 4, 4), np.int64), np.zeros((1, 4, 4), np.int64), -np.ones((1, 2)), "spacing"),
    ],
)
def test_input_validation_names_the_field(pred, truth, spacing, field) -> None:
    with pytest.raises(ValueError, match=field):
        segmentation_metrics(pred, truth, NAMES, spacing)


def test_mean_over_sites() -> None:
    sites = {
        "a": {"dice_mean": 0.8, "hd95_mean": 4.0, "asd_mean": 1.0, "units": "mm"},
        "b": {"dice_mean": 0.6, "hd95_mean": None, "asd_mean": 3.0, "units": "mm"},
    }
    out = mean_over_sites(sites)
    assert out["dice"] == pytest.approx(0.7)
    assert out["hd95"] == pytest.approx(4.0)
    assert out["asd"] == pytest.approx(2.0)
    assert out["units"] == "mm"
    sites["b"]["units"] = "px"
    assert mean_over_sites(sites)["units"] == "mixed"


def test_dice_per_image() -> None:
    truth = np.stack([square(5, 5, 10), square(5, 5, 10), np.zeros((H, W), np.int64)])
    pred = np.stack([square(5, 5, 10), square(5, 8, 10), np.zeros((H, W), np.int64)])
    np.testing.assert_allclose(dice_per_image(pred, truth, 2), [1.0, 0.7, 1.0])
