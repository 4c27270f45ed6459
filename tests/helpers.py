"""Small configurations shared by the tests that train real models."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from fedseg.config import RunConfig, preset_config
from fedseg.data.synthetic import synthetic_site


def small_config(
    out_dir: Path, sites: int, widths: list[int], umn_width: int, **training
) -> RunConfig:
    """Synthetic hospitals at 64 px with tiny networks, the paper preset's pipeline: tests the
    plumbing, not accuracy. :func:`blind_config` is the default mode's twin."""
    cfg = preset_config("paper", name="tiny", out_dir=str(out_dir))
    cfg.data.synthetic_train, cfg.data.synthetic_test = (
        12 if sites == 1 else 8,
        6 if sites == 1 else 4,
    )
    cfg.federation.num_sites = sites
    cfg.model.image_size = 64
    cfg.model.ae_widths = widths
    cfg.model.latent_channels = 16
    cfg.model.umn_width = umn_width
    cfg.model.umn_blocks = 1
    cfg.training.augment_copies = 1
    cfg.training.umn_rounds = 1
    for key, value in training.items():
        setattr(cfg.training, key, value)
    return cfg


def blind_config(out_dir: Path, sites: int = 3, epochs: int = 3) -> RunConfig:
    """The default mode (blind split training) with tiny networks on synthetic hospitals."""
    cfg = RunConfig(name="tiny-blind", out_dir=str(out_dir))
    cfg.data.synthetic_train, cfg.data.synthetic_test = 8, 4
    cfg.federation.num_sites = sites
    cfg.model.image_size = 64
    cfg.model.ae_widths = [8, 16, 16, 32, 32]
    cfg.model.latent_channels = 16
    cfg.model.umn_width = 32
    cfg.model.umn_blocks = 1
    cfg.training.batch_size = 4
    cfg.training.finetune_epochs = epochs
    return cfg.validate()


def write_site_data(folder: Path, index: int) -> None:
    """8 training and 4 test PNG pairs of one synthetic hospital, as a site would have them."""
    for sub, n, seed in (("", 8, 0), ("test", 4, 1)):
        data = synthetic_site(index, n, 64, seed=seed)
        (folder / sub / "images").mkdir(parents=True, exist_ok=True)
        (folder / sub / "masks").mkdir(parents=True, exist_ok=True)
        for j in range(n):
            image = data.images[j, 0]
            image = ((image - image.min()) / (np.ptp(image) + 1e-6) * 255).astype(np.uint8)
            Image.fromarray(image).save(folder / sub / "images" / f"p{j:03d}.png")
            mask = data.masks[j].astype(np.uint8)
            Image.fromarray(mask).save(folder / sub / "masks" / f"p{j:03d}.png")
