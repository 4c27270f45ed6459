"""The PPCMI-SF pipeline at library level (no Flower): wire format, custody, KLT bijection."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fedseg.config import RunConfig
from fedseg.coordinator import Coordinator
from fedseg.data import load_federation
from fedseg.privacy.keys import write_key_file
from fedseg.site import query_chunk, segment_mapped, site_transform, train_site, training_chunk
from fedseg.wire import WireError, pack, unpack
from tests.helpers import small_config as tiny


def small_config(tmp_path, transform="klt", custody="server") -> RunConfig:
    cfg = tiny(tmp_path, 1, [8, 16, 16, 32, 32], 32, ae_epochs=6, umn_epochs_per_round=4)
    cfg.privacy.transform = transform
    cfg.privacy.custody = custody
    cfg.privacy.key_dir = str(tmp_path / "keys")
    return cfg.validate()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pipeline")
    cfg = small_config(tmp)
    site = load_federation(cfg)[0]
    write_key_file(tmp / "keys" / f"{site.name}.key")
    models, _ = train_site(cfg, site.train)
    return cfg, site, models


def _predict(cfg, site, models, coordinator) -> np.ndarray:
    transform = site_transform(cfg, f"{cfg.privacy.key_dir}/{site.name}.key", create=True)
    query = query_chunk(site.test, models, transform, 0, len(site.test))
    return segment_mapped(cfg, models, transform, coordinator.map_query(site.name, query))


def test_server_custody_klt_is_a_bijection(trained):
    """With the server holding the keys, KLT on or off gives the same segmentation."""
    cfg, site, models = trained
    keyed = Coordinator(cfg, [site.name], key_dir=cfg.privacy.key_dir)
    transform = site_transform(cfg, f"{cfg.privacy.key_dir}/{site.name}.key", create=True)
    n = len(site.train) * 2
    keyed.add_chunk(site.name, training_chunk(cfg, site.train, models, transform, 0, n))
    keyed.train_round()

    plain_cfg = small_config(Path(cfg.out_dir), transform="none")
    plain = Coordinator(plain_cfg, [site.name])
    plain.umn.load_state_dict(keyed.umn.state_dict())
    plain.umn.eval()

    with_klt = _predict(cfg, site, models, keyed)
    without = _predict(plain_cfg, site, models, plain)
    agreement = (with_klt == without).mean()
    assert agreement > 0.999, f"only {agreement:.4%} of pixels agree"


def test_server_custody_trains_on_plain_latents(trained):
    """The server un-keys what it receives: its stored latents equal the plain encodings."""
    cfg, site, models = trained
    keyed = Coordinator(cfg, [site.name], key_dir=cfg.privacy.key_dir)
    plain = Coordinator(small_config(Path(cfg.out_dir), transform="none"), [site.name])
    transform = site_transform(cfg, f"{cfg.privacy.key_dir}/{site.name}.key", create=True)
    none = site_transform(small_config(Path(cfg.out_dir), transform="none"), None)
    keyed.add_chunk(site.name, training_chunk(cfg, site.train, models, transform, 0, 8))
    plain.add_chunk(site.name, training_chunk(cfg, site.train, models, none, 0, 8))
    a, b = keyed.site_latents()[0], plain.site_latents()[0]
    for za, zb in zip(a.image + a.mask, b.image + b.mask, strict=True):
        # fp16 on the wire, un-keyed in fp32: equal to within fp16 rounding of keyed values
        assert (za.float() - zb.float()).abs().max().item() < 0.05


def test_training_stream_is_deterministic(trained):
    cfg, site, models = trained
    transform = site_transform(cfg, f"{cfg.privacy.key_dir}/{site.name}.key", create=True)
    n = len(site.train)
    first = training_chunk(cfg, site.train, models, transform, n - 2, n + 4)  # spans a copy
    again = training_chunk(cfg, site.train, models, transform, n - 2, n + 4)
    for key in first:
        assert first[key].dtype == np.float16
        np.testing.assert_array_equal(first[key], again[key])


def test_client_custody_server_holds_no_keys_and_maps_keyed_space(trained, tmp_path):
    cfg, site, models = trained
    client_cfg = small_config(Path(cfg.out_dir), custody="client")
    client_cfg.privacy.key_dir = str(tmp_path / "nowhere")  # the server has no key files
    coordinator = Coordinator(client_cfg, [site.name], key_dir=client_cfg.privacy.key_dir)
    transform = site_transform(cfg, f"{cfg.privacy.key_dir}/{site.name}.key", create=True)
    chunk = training_chunk(cfg, site.train, models, transform, 0, 8)
    assert coordinator.add_chunk(site.name, chunk) == 8
    with pytest.raises(ValueError, match="unknown site 'intruder'"):
        coordinator.map_query("intruder", {k: v for k, v in chunk.items() if "image" in k})


def test_wire_rejects_bad_payloads():
    import torch

    shapes = [(4, 8, 8), (4, 4, 4), (4, 2, 2)]
    good = pack([torch.randn(3, *s) for s in shapes], "image")
    assert [z.shape[0] for z in unpack(good, "image", shapes)] == [3, 3, 3]
    cases = {
        "missing field 'image2'": {k: v for k, v in good.items() if k != "image2"},
        "dtype float32": {**good, "image0": good["image0"].astype(np.float32)},
        "shape": {**good, "image1": np.zeros((3, 4, 5, 5), np.float16)},
        "NaN": {**good, "image0": np.full((3, 4, 8, 8), np.nan, np.float16)},
        "items, other scales": {**good, "image2": np.zeros((2, 4, 2, 2), np.float16)},
    }
    for message, payload in cases.items():
        with pytest.raises(WireError, match=message):
            unpack(payload, "image", shapes)
    with pytest.raises(WireError, match="float16 range"):
        pack([torch.full((1, 4, 8, 8), 1e6)], "image")


def test_site_models_saved_privately_and_reloaded(trained, tmp_path):
    import stat

    import torch

    from fedseg.site import SiteModels, site_models_path

    cfg, site, models = trained
    path = models.save(site_models_path(tmp_path, site.name), site.train.class_names)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    loaded, names = SiteModels.load(cfg, path)
    assert names == list(site.train.class_names)
    x = torch.from_numpy(site.test.images[:2])
    with torch.no_grad():
        torch.testing.assert_close(loaded.image_ae(x), models.image_ae.eval()(x))
    other = small_config(tmp_path)
    other.model.latent_channels = 8
    with pytest.raises(ValueError, match="do not match the model config"):
        SiteModels.load(other, path)


def test_client_custody_trains_like_server_custody(trained):
    """Key-free canonical bases make the UMN see the same coordinates in either custody."""
    import torch

    from fedseg.models.autoencoder import latent_shapes

    cfg, site, models = trained
    transform = site_transform(cfg, f"{cfg.privacy.key_dir}/{site.name}.key", create=True)
    chunk = training_chunk(cfg, site.train, models, transform, 0, len(site.train) * 2)
    query = query_chunk(site.test, models, transform, 0, len(site.test))
    shapes = latent_shapes(cfg.model.image_size, cfg.model.latent_channels)
    mapped = {}
    for custody in ("server", "client"):
        run_cfg = small_config(Path(cfg.out_dir), custody=custody)
        coordinator = Coordinator(run_cfg, [site.name], key_dir=cfg.privacy.key_dir)
        coordinator.add_chunk(site.name, chunk)
        coordinator.train_round()
        keyed = unpack(coordinator.map_query(site.name, query), "mask", shapes)
        mapped[custody] = torch.cat([z.flatten(1) for z in transform.inverse(keyed, "mask")], 1)
    difference = (mapped["server"] - mapped["client"]).norm() / mapped["server"].norm()
    assert difference < 0.05, f"custodies' mapped latents differ by {difference:.1%}"
