"""Property-based tests (hypothesis): the loaders, label mapping, wire decoding and the privacy
transforms' round trips hold for generated inputs, not only for the examples we thought of.
Every failure is either the right answer or a clear error of the module's own type."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from PIL import Image

from fedseg.config import DatasetConfig
from fedseg.data import DataError, LabelMap, load_pairs
from fedseg.data.dataset import resize_mask
from fedseg.data.labels import OPEN_MAX_CLASSES
from fedseg.privacy.blind import add_blinded, blind, unblind
from fedseg.privacy.keys import KeyRing
from fedseg.privacy.klt import LatentTransform
from fedseg.privacy.knt import KntKeyRing, KntTransform
from fedseg.serving.protocol import from_body, to_body
from fedseg.wire import WIRE_DTYPE, WireError, pack, unpack

FAST = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SLOW = settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])

shapes_2d = st.tuples(st.integers(1, 12), st.integers(1, 12))
label_sets = st.lists(st.integers(0, 255), min_size=1, max_size=6, unique=True)


# --- label mapping -----------------------------------------------------------------------


@FAST
@given(values=label_sets, shape=shapes_2d, data=st.data())
def test_label_values_map_back_to_what_was_stored(values, shape, data):
    picks = data.draw(hnp.arrays(np.int64, shape, elements=st.integers(0, len(values) - 1)))
    raw = np.asarray(values, np.uint8)[picks]
    out = LabelMap(values).apply(raw, "m.png")
    assert out.dtype == np.int64 and out.shape == raw.shape
    np.testing.assert_array_equal(np.asarray(values)[out], raw)


@FAST
@given(values=label_sets, stray=st.integers(0, 255), shape=shapes_2d)
def test_a_value_outside_the_map_is_an_error_naming_the_file(values, stray, shape):
    raw = np.full(shape, values[0], np.uint8)
    raw.flat[-1] = stray
    if stray in values:
        LabelMap(values).apply(raw, "m.png")
    else:
        try:
            LabelMap(values).apply(raw, "dir/m.png")
        except DataError as err:
            assert "dir/m.png" in str(err) and str(stray) in str(err)
        else:
            raise AssertionError("a stored value outside label_values passed")


@FAST
@given(
    raw=hnp.arrays(
        np.uint8, st.tuples(st.integers(1, 9), st.integers(1, 9), st.sampled_from([1, 3]))
    ),
    threshold=st.floats(0, 254.5),
)
def test_threshold_is_the_max_channel_above_it(raw, threshold):
    mask = raw[..., 0] if raw.shape[-1] == 1 else raw
    out = LabelMap(threshold=threshold).apply(mask, "m.jpg")
    expected = (raw.max(-1) > threshold).astype(np.int64)
    np.testing.assert_array_equal(out, expected)


@FAST
@given(
    colours=st.lists(
        st.tuples(st.integers(0, 255), st.integers(0, 255), st.integers(0, 255)),
        min_size=2,
        max_size=5,
        unique=True,
    ),
    shape=shapes_2d,
    data=st.data(),
)
def test_colours_within_tolerance_are_their_class(colours, shape, data):
    palette = np.asarray(colours, np.int64)
    gaps = np.sqrt(((palette[:, None] - palette[None]) ** 2).sum(-1))
    gap = gaps[~np.eye(len(colours), dtype=bool)].min()
    tolerance = float(gap / 2 - 1)
    if tolerance < 2:
        return  # colours too close for a tolerance: nothing to assert
    classes = data.draw(hnp.arrays(np.int64, shape, elements=st.integers(0, len(colours) - 1)))
    step = int(tolerance / np.sqrt(3))
    noise = data.draw(hnp.arrays(np.int64, (*shape, 3), elements=st.integers(-step, step)))
    raw = np.clip(palette[classes] + noise, 0, 255).astype(np.uint8)
    out = LabelMap(colors=[list(c) for c in colours], tolerance=tolerance).apply(raw, "m.png")
    np.testing.assert_array_equal(out, classes)


@FAST
@given(values=st.sets(st.integers(0, 255), min_size=1, max_size=40))
def test_no_label_map_means_few_classes_or_a_clear_error(values):
    try:
        classes = LabelMap().resolve(values, "masks/")
    except DataError as err:
        assert "masks/" in str(err) and "mask_threshold" in str(err)
        assert max(values) >= OPEN_MAX_CLASSES
        return
    assert 2 <= len(classes.class_names) <= OPEN_MAX_CLASSES  # never 256 classes
    mapped = classes.apply(np.asarray(sorted(values)))
    assert mapped.max() < len(classes.class_names)


@FAST
@given(mask=hnp.arrays(np.int64, shapes_2d, elements=st.integers(0, 4)), size=st.integers(1, 20))
def test_resizing_a_mask_invents_no_class(mask, size):
    out = resize_mask(mask, size)
    assert out.shape == (size, size) and set(np.unique(out)) <= set(np.unique(mask))


# --- the loader --------------------------------------------------------------------------


@SLOW
@given(
    n=st.integers(1, 3),
    side=st.integers(4, 24),
    values=st.lists(st.integers(0, 255), min_size=2, max_size=4, unique=True),
    colour=st.booleans(),
    data=st.data(),
)
def test_pairs_load_back_what_was_written(n, side, values, colour, data):
    """Images and masks written as PNG load at their own size: the masks exactly (as classes),
    the images normalised, colour kept as three channels."""
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "images").mkdir()
        (root / "masks").mkdir()
        written = []
        for i in range(n):
            classes = data.draw(
                hnp.arrays(np.int64, (side, side), elements=st.integers(0, len(values) - 1))
            )
            shape = (side, side, 3) if colour else (side, side)
            image = data.draw(hnp.arrays(np.uint8, shape))
            Image.fromarray(image).save(root / "images" / f"s{i}.png")
            Image.fromarray(np.asarray(values, np.uint8)[classes]).save(
                root / "masks" / f"s{i}.png"
            )
            written.append((image, classes))
        cfg = DatasetConfig(kind="pairs", label_values=values, channels=3 if colour else 1)
        site = load_pairs(root, cfg, side, "site")
    assert site.images.shape == (n, 3 if colour else 1, side, side)
    for k, (image, classes) in enumerate(written):
        np.testing.assert_array_equal(site.masks[k], classes)
        if image.std() > 0:
            assert abs(float(site.images[k].mean())) < 1e-3
            assert abs(float(site.images[k].std()) - 1) < 1e-2


@SLOW
@given(garbage=st.binary(min_size=0, max_size=200))
def test_a_damaged_file_is_an_error_naming_it(garbage):
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "images").mkdir()
        (root / "masks").mkdir()
        (root / "images" / "x.png").write_bytes(garbage)
        Image.fromarray(np.zeros((4, 4), np.uint8)).save(root / "masks" / "x.png")
        try:
            load_pairs(root, DatasetConfig(kind="pairs", label_values=[0]), 4, "s")
        except DataError as err:
            assert "x.png" in str(err)
        else:
            raise AssertionError("garbage loaded as an image")


# --- wire decoding -----------------------------------------------------------------------

wire_shapes = st.lists(
    st.tuples(st.integers(1, 4), st.integers(1, 4), st.integers(1, 4)), min_size=1, max_size=3
)


@FAST
@given(shapes=wire_shapes, items=st.integers(1, 3), data=st.data())
def test_latents_survive_pack_body_unpack(shapes, items, data):
    latents = [
        torch.from_numpy(
            data.draw(
                hnp.arrays(np.float32, (items, *s), elements=st.floats(-1000, 1000, width=32))
            )
        )
        for s in shapes
    ]
    body, count = to_body(pack(latents, "image"), "image", shapes)
    assert count == items
    back = unpack(from_body(body, items, "image", shapes), "image", shapes, items=items)
    for a, b in zip(latents, back, strict=True):
        np.testing.assert_array_equal(a.numpy().astype(WIRE_DTYPE), b.numpy().astype(WIRE_DTYPE))


@FAST
@given(shapes=wire_shapes, items=st.integers(1, 3), body=st.binary(max_size=400))
def test_any_body_decodes_exactly_or_is_a_wire_error(shapes, items, body):
    expected = items * sum(int(np.prod(s)) for s in shapes) * 2
    try:
        latents = unpack(from_body(body, items, "mask", shapes), "mask", shapes, items=items)
    except WireError:
        return
    assert len(body) == expected and [tuple(z.shape[1:]) for z in latents] == shapes


@FAST
@given(
    shape=st.tuples(st.integers(0, 3), st.integers(1, 4), st.integers(1, 3), st.integers(1, 3)),
    dtype=st.sampled_from([np.float16, np.float32, np.float64, np.int8]),
    special=st.sampled_from([None, np.nan, np.inf]),
)
def test_unpack_refuses_what_was_not_agreed(shape, dtype, special):
    arr = np.zeros(shape, dtype)
    if special is not None and arr.size and dtype != np.int8:
        arr.flat[0] = special
    agreed = [(2, 2, 2)]
    ok = dtype == np.float16 and shape[0] > 0 and shape[1:] == (2, 2, 2) and special is None
    try:
        unpack({"image0": arr}, "image", agreed)
    except WireError:
        assert not ok
    else:
        assert ok


# --- the privacy transforms' round trips -------------------------------------------------

secrets = st.binary(min_size=32, max_size=32)
latent_batches = st.tuples(st.integers(1, 3), st.integers(1, 4)).flatmap(
    lambda nh: st.lists(
        hnp.arrays(np.float32, (nh[0], 4, nh[1], nh[1]), elements=st.floats(-50, 50, width=32)),
        min_size=3,
        max_size=3,
    )
)


@FAST
@given(secret=secrets, arrays=latent_batches, role=st.sampled_from(["image", "mask"]))
def test_klt_round_trip_and_preserves_distances(secret, arrays, role):
    transform = LatentTransform(KeyRing.from_secret(secret, 4))
    latents = [torch.from_numpy(a).double() for a in arrays]
    keyed = transform.forward(latents, role)
    back = transform.inverse(keyed, role)
    for z, k, b in zip(latents, keyed, back, strict=True):
        torch.testing.assert_close(b, z, atol=1e-6, rtol=1e-6)
        if len(z) > 1:  # orthogonal mixing: distances between latents are kept
            torch.testing.assert_close((k[0] - k[1]).norm(), (z[0] - z[1]).norm())


@SLOW
@given(secret=secrets, arrays=latent_batches, role=st.sampled_from(["image", "mask"]))
def test_knt_round_trip(secret, arrays, role):
    transform = KntTransform(KntKeyRing.from_secret(secret, 4))
    latents = [torch.from_numpy(a).double() for a in arrays]
    back = transform.inverse(transform.forward(latents, role), role)
    for z, b in zip(latents, back, strict=True):
        torch.testing.assert_close(b, z, atol=1e-5, rtol=1e-5)


@FAST
@given(
    secret=secrets,
    weights=st.lists(st.integers(1, 50), min_size=1, max_size=4),
    data=st.data(),
)
def test_blind_sum_unblinds_to_the_weighted_average(secret, weights, data):
    states = [
        {
            "w": torch.from_numpy(
                data.draw(hnp.arrays(np.float32, (5,), elements=st.floats(-10, 10, width=32)))
            )
        }
        for _ in weights
    ]
    sites = [f"site-{i}" for i in range(len(weights))]
    masked = [
        blind(s, w, secret, "r1", site) for s, w, site in zip(states, weights, sites, strict=True)
    ]
    average, total = unblind(add_blinded(masked), secret, "r1", sites, states[0])
    expected = sum(w * s["w"].double() for w, s in zip(weights, states, strict=True)) / sum(weights)
    assert total == sum(weights)
    torch.testing.assert_close(average["w"].double(), expected, atol=1e-5, rtol=1e-5)
