"""Data as users store it: JPEG and colour-coded masks, masks without a label map, colour
images kept as colour (through the loaders, models, baselines, service and figures), the
pixel limit, and the real colour set ``shared/data/hrf`` loaded from its masks as stored."""

from __future__ import annotations

import io
import logging
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fedseg.config import DatasetConfig, HospitalConfig, RunConfig, load_config
from fedseg.data import DataError, LabelMap, load_dataset, load_pairs, site_for_partition
from fedseg.data.pairs import folder_channels, read_image
from fedseg.figures import Examples, write_overlays
from fedseg.models.baselines import make_unet
from fedseg.serving.images import mask_values_of, read_scan, write_mask
from tests.test_data import SCENARIOS, needs


def save(path: Path, array: np.ndarray, **options) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, **options)
    return path


def disc(h: int = 48, w: int = 48) -> np.ndarray:
    """A filled disc: a binary mask with a long curved boundary (JPEG's worst case)."""
    yy, xx = np.mgrid[:h, :w]
    return ((yy - h / 2) ** 2 + (xx - w / 2) ** 2 < (h / 3) ** 2).astype(np.uint8)


def colour_image(h: int = 48, w: int = 48, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    image = np.zeros((h, w, 3), np.uint8)
    image[..., 0] = 200
    image[..., 1] = rng.integers(0, 120, (h, w))
    image[..., 2] = 40
    return image


def jpeg_pairs(root: Path, n: int = 3, rgb_mask: bool = False) -> Path:
    """Colour images with binary masks stored as JPEG quality 75 (noise around the edge)."""
    for i in range(n):
        save(root / "images" / f"c{i}.png", colour_image(seed=i))
        mask = disc() * 255
        save(root / "masks" / f"c{i}.jpg", np.dstack([mask] * 3) if rgb_mask else mask, quality=75)
    return root


# --- masks as stored ---------------------------------------------------------------------


@pytest.mark.parametrize("rgb_mask", [False, True])
def test_mask_threshold_reads_jpeg_masks(tmp_path: Path, rgb_mask: bool) -> None:
    folder = jpeg_pairs(tmp_path, rgb_mask=rgb_mask)
    with Image.open(folder / "masks" / "c0.jpg") as im:
        stored = np.asarray(im)
    assert len(np.unique(stored)) > 10  # the JPEG really spread the values
    data = load_pairs(folder, DatasetConfig(kind="pairs", mask_threshold=127), 48, "s")
    assert data.class_names == ["background", "foreground"]
    agree = (data.masks == disc()[None]).mean()
    assert agree > 0.99
    with pytest.raises(DataError, match=r"c0\.jpg: unexpected mask value.*mask_threshold"):
        load_pairs(folder, DatasetConfig(kind="pairs", label_values=[0, 255]), 48, "s")


def test_no_label_map_binary_255_is_two_classes_with_a_notice(tmp_path, caplog) -> None:
    for i in range(3):
        save(tmp_path / "images" / f"g{i}.png", (disc() * 90 + 20).astype(np.uint8))
        save(tmp_path / "masks" / f"g{i}.png", disc() * 255)
    with caplog.at_level(logging.INFO, logger="fedseg.data"):
        data = load_pairs(tmp_path, DatasetConfig(kind="pairs"), 24, "s")
    assert data.num_classes == 2 and set(np.unique(data.masks)) == {0, 1}
    assert "exactly 0 and 255" in caplog.text and "masks" in caplog.text


def test_no_label_map_never_256_classes(tmp_path: Path) -> None:
    folder = jpeg_pairs(tmp_path)
    with pytest.raises(DataError) as err:
        load_pairs(folder, DatasetConfig(kind="pairs"), 48, "s")
    message = str(err.value)
    assert "masks" in message and "distinct values" in message
    for setting in ("mask_threshold", "label_colors"):
        assert setting in message


def test_no_label_map_few_large_values_suggests_label_values() -> None:
    labels = LabelMap()
    raw = np.array([[0, 150], [200, 250]], np.uint8)
    values = set(np.unique(labels.apply(raw, "m.png")).tolist())
    with pytest.raises(DataError, match=r"label_values = \[0, 150, 200, 250\]"):
        labels.resolve(values, "masks/")
    assert labels.resolve({0, 1, 2}, "masks/").class_names == ["background", "class1", "class2"]


def test_colour_coded_masks_need_label_colors(tmp_path: Path) -> None:
    """The issue's case: a red and a green region with label_values = [0, 255] used to collapse
    into one class silently; now it is an error, and label_colors reads them as two."""
    mask = np.zeros((40, 40, 3), np.uint8)
    mask[:20, :20] = (255, 0, 0)
    mask[20:, 20:] = (0, 255, 0)
    save(tmp_path / "images" / "a.png", (np.arange(1600).reshape(40, 40) % 251).astype(np.uint8))
    save(tmp_path / "masks" / "a.png", mask)
    with pytest.raises(DataError, match=r"a\.png: colour mask.*label_colors"):
        load_pairs(tmp_path, DatasetConfig(kind="pairs", label_values=[0, 255]), 40, "s")
    colours = [[0, 0, 0], [255, 0, 0], [0, 255, 0]]
    cfg = DatasetConfig(kind="pairs", label_colors=colours)
    data = load_pairs(tmp_path, cfg, 40, "s")
    assert data.num_classes == 3
    assert (data.masks[0, :20, :20] == 1).all() and (data.masks[0, 20:, 20:] == 2).all()
    assert data.masks[0, :20, 20:].sum() == 0
    # the same mask as a JPEG: colours within the tolerance, or an error naming the file
    (tmp_path / "masks" / "a.png").unlink()
    save(tmp_path / "masks" / "a.jpg", mask, quality=90, subsampling=0)
    data = load_pairs(tmp_path, DatasetConfig(kind="pairs", label_colors=colours), 40, "s")
    assert (data.masks[0, 2:18, 2:18] == 1).all() and (data.masks[0, 22:38, 22:38] == 2).all()
    strict = DatasetConfig(kind="pairs", label_colors=colours, label_color_tolerance=0)
    with pytest.raises(DataError, match=r"a\.jpg: .* farther than label_color_tolerance = 0"):
        load_pairs(tmp_path, strict, 40, "s")


def test_palette_mask_colours_with_label_colors(tmp_path: Path) -> None:
    im = Image.new("P", (8, 8))
    im.putpalette([0, 0, 0, 255, 0, 0, 0, 0, 255] + [0] * (256 * 3 - 9))
    indices = np.zeros((8, 8), np.uint8)
    indices[:4] = 1
    indices[6:] = 2
    im.putdata(indices.ravel().tolist())
    (tmp_path / "masks").mkdir(parents=True)
    im.save(tmp_path / "masks" / "p.png")
    save(tmp_path / "images" / "p.png", (indices * 50 + 10).astype(np.uint8))
    cfg = DatasetConfig(kind="pairs", label_colors=[[0, 0, 0], [0, 0, 255], [255, 0, 0]])
    data = load_pairs(tmp_path, cfg, 8, "s")
    # classes follow the colours given, not the palette's index order
    assert data.masks[0].tolist() == np.choose(indices, [0, 2, 1]).tolist()


# --- colour images -----------------------------------------------------------------------


def test_colour_images_keep_their_colour(tmp_path: Path) -> None:
    folder = jpeg_pairs(tmp_path)
    colour = load_pairs(folder, DatasetConfig(kind="pairs", mask_threshold=127), 32, "s")
    assert colour.images.shape == (3, 3, 32, 32)
    assert colour.images[:, 0].mean() > colour.images[:, 2].mean() + 1  # red stays red
    assert abs(float(colour.images[0].mean())) < 1e-4  # normalised over all channels
    grey = load_pairs(folder, DatasetConfig(kind="pairs", mask_threshold=127, channels=1), 32, "s")
    assert grey.images.shape == (3, 1, 32, 32)
    # a grey file in a colour set is repeated into three channels
    save(folder / "images" / "c1.png", (disc() * 100 + 50).astype(np.uint8))
    mixed = load_pairs(folder, DatasetConfig(kind="pairs", mask_threshold=127), 32, "s")
    np.testing.assert_array_equal(mixed.images[1, 0], mixed.images[1, 2])


def test_auto_channels_grey_stored_as_rgb_stays_grey(tmp_path: Path) -> None:
    grey = (disc() * 100 + 50).astype(np.uint8)
    save(tmp_path / "grey" / "a.png", np.dstack([grey] * 3))  # RGB file, no colour
    tinted = np.dstack([grey, grey, np.clip(grey.astype(int) + 3, 0, 255).astype(np.uint8)])
    save(tmp_path / "grey" / "b.png", tinted)  # a slight tint (us-nerve's RGB files)
    assert folder_channels(tmp_path / "grey") == 1
    save(tmp_path / "colour" / "a.png", colour_image())
    assert folder_channels(tmp_path / "colour") == 3
    assert read_image(tmp_path / "colour" / "a.png").ndim == 2  # one channel: luminance


def test_colour_runs_through_unet_and_autoencoders() -> None:
    from fedseg.site import SiteModels

    x = torch.randn(2, 3, 64, 64)
    assert make_unet(2, [8, 16, 32], in_channels=3)(x).shape == (2, 2, 64, 64)
    cfg = RunConfig()
    cfg.data.channels = 3
    cfg.model.image_size = 64
    models = SiteModels.build(cfg, 2)
    assert models.image_ae(x).shape == (2, 3, 64, 64)


def test_service_reads_and_writes_as_stored(tmp_path: Path) -> None:
    path = save(tmp_path / "in.png", colour_image(30, 50))
    scan = read_scan(path, 32, 2, channels=3)
    assert scan.images.shape == (1, 3, 32, 32) and scan.plane_shape == (30, 50)
    assert read_scan(path, 32, 2).images.shape == (1, 1, 32, 32)
    pred = np.zeros((1, 32, 32), np.int64)
    pred[0, :16] = 1
    thresholded = DatasetConfig(kind="pairs", mask_threshold=127)
    out = write_mask(scan, pred, tmp_path / "out.png", mask_values_of(thresholded))
    assert set(np.unique(np.asarray(Image.open(out)))) == {0, 255}
    coded = DatasetConfig(kind="pairs", label_colors=[[0, 0, 0], [0, 255, 0]])
    out = write_mask(scan, pred, tmp_path / "rgb.png", mask_values_of(coded))
    written = np.asarray(Image.open(out))
    assert written.shape == (30, 50, 3) and tuple(written[0, 0]) == (0, 255, 0)


def test_colour_overlays_are_drawn_in_colour(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    images = rng.standard_normal((2, 3, 16, 16)).astype(np.float32)
    images[:, 0] += 3  # red
    truth = (rng.random((2, 16, 16)) > 0.5).astype(int)
    path = write_overlays(tmp_path, "site", Examples(images, truth, truth), ["bg", "fg"])
    assert path is not None
    drawn = np.asarray(Image.open(path).convert("RGB")).astype(int)
    assert ((drawn[..., 0] - drawn[..., 2]) > 100).mean() > 0.02  # a red image panel


# --- limits ------------------------------------------------------------------------------


def test_huge_image_is_refused_before_decoding(tmp_path: Path) -> None:
    """A 12000x12000 PNG of a few KB on disk: refused from its header (no 3 GB decode)."""
    buffer = io.BytesIO()
    Image.new("1", (12000, 12000)).save(buffer, format="PNG")
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    (tmp_path / "images" / "big.png").write_bytes(buffer.getvalue())
    (tmp_path / "masks" / "big.png").write_bytes(buffer.getvalue())
    started = time.perf_counter()
    with pytest.raises(DataError, match=r"big\.png: 12000x12000 = 144,000,000 pixels.*max_pixels"):
        load_pairs(tmp_path, DatasetConfig(kind="pairs", mask_threshold=0), 32, "s")
    assert time.perf_counter() - started < 2.0


# --- a simulated client loads only its own source ----------------------------------------


def test_a_site_loads_only_its_own_source(tmp_path: Path) -> None:
    good = jpeg_pairs(tmp_path / "good", n=6)
    broken = tmp_path / "broken"
    (broken / "images").mkdir(parents=True)
    (broken / "masks").mkdir()
    (broken / "images" / "x.png").write_bytes(b"not a png")
    (broken / "masks" / "x.png").write_bytes(b"not a png")
    cfg = RunConfig(
        sources={
            "good": DatasetConfig(kind="pairs", path=str(good), mask_threshold=127),
            "broken": DatasetConfig(kind="pairs", path=str(broken), mask_threshold=127),
        },
        hospitals=[
            HospitalConfig(name="a", source="good"),
            HospitalConfig(name="b", source="broken"),
        ],
    )
    cfg.federation.num_sites = 2
    cfg.data.channels = 3
    cfg.model.image_size = 32
    site = site_for_partition(cfg, 0)
    assert site.name == "a" and site.train.images.shape[1:] == (3, 32, 32)
    with pytest.raises(DataError, match=r"x\.png: cannot read image"):
        site_for_partition(cfg, 1)


# --- the real colour set -----------------------------------------------------------------


def test_hrf_scenario_loads_masks_as_stored_in_colour() -> None:
    root = needs("hrf")
    text = (SCENARIOS / "hrf.toml").read_text()
    section = text.split("[data]\n", 1)[1].split("\n\n", 1)[0].strip().splitlines()
    assert len(section) == 3 and any("masks-as-stored" in line for line in section)
    cfg = load_config(SCENARIOS / "hrf.toml")
    assert (cfg.data.kind, cfg.data.channels, cfg.data.mask_threshold) == ("pairs", 3, 127)
    cfg.data.max_items = 9
    stored = load_dataset(cfg.data, 128)
    assert stored.images.shape == (9, 3, 128, 128) and stored.class_names[1] == "foreground"
    assert 0.03 < stored.masks.mean() < 0.15  # vessels: 5-11% of the pixels
    exact = load_dataset(
        DatasetConfig(kind="pairs", mask_threshold=127, max_items=9), 128, str(root)
    )
    assert (stored.masks == exact.masks).mean() > 0.99  # JPEG noise thresholded away
    grey = load_config(SCENARIOS / "hrf-grey.toml")
    assert grey.data.channels == 1
    with pytest.raises(DataError, match="mask_threshold"):
        load_dataset(
            DatasetConfig(kind="pairs", mask_dir="masks-as-stored", max_items=3), 64, str(root)
        )
