"""Everything a hospital computes, behind the few calls its Flower handlers make.

The site owns its data, its two autoencoders and its key; it only ever hands out keyed latents
and metrics. Training latents are produced in chunks of a deterministic, augmented stream
(sample j is image j mod n under augmentation copy j div n), so the server can pull them chunk
by chunk and a retried chunk is identical.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fedseg.atomic import torch_save_atomic
from fedseg.config import RunConfig, method_name
from fedseg.data import SiteData, SiteSplit, input_channels, load_local_site, site_for_partition
from fedseg.data.volumes import is_whole, predicted_volumes, write_volumes
from fedseg.deploy.runtime import deployed_site, node_out_dir
from fedseg.evaluation import segmentation_metrics, volume_metrics
from fedseg.figures import Examples, write_overlays
from fedseg.models.autoencoder import SkipAutoencoder, latent_shapes
from fedseg.privacy.blind import BlindSite
from fedseg.privacy.keys import (
    FINGERPRINT_FILE,
    KeyFileError,
    bind_key,
    load_or_create_key,
    needs_secret,
    read_key_file,
    simulated_secret,
    site_key_file,
)
from fedseg.privacy.klt import LatentTransform
from fedseg.privacy.transforms import Keyed, keyed_transform
from fedseg.training import (
    AutoencoderStats,
    Budget,
    augment,
    decode_masks,
    encode,
    one_hot,
    train_autoencoders,
)
from fedseg.wire import pack, unpack


@dataclass
class SiteModels:
    image_ae: SkipAutoencoder
    mask_ae: SkipAutoencoder

    @classmethod
    def build(cls, cfg: RunConfig, num_classes: int) -> SiteModels:
        m, c = cfg.model, input_channels(cfg)  # 3: colour images; 2.5D: slices per sample
        return cls(
            SkipAutoencoder(c, c, m.ae_widths, m.latent_channels),
            SkipAutoencoder(
                num_classes,
                num_classes,
                m.ae_widths,
                m.latent_channels,
                m.local_skips,
                m.decoder_input_norm,
            ),
        )

    def state(self) -> dict[str, torch.Tensor]:
        out = {f"image.{k}": v for k, v in self.image_ae.state_dict().items()}
        out.update({f"mask.{k}": v for k, v in self.mask_ae.state_dict().items()})
        return out

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        for prefix, net in (("image.", self.image_ae), ("mask.", self.mask_ae)):
            net.load_state_dict(
                {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
            )
            net.eval()

    def save(self, path: str | Path, class_names: list[str]) -> Path:
        """Keep the site's AEs on the site's own disk (0600: decoders can reveal its images)."""
        return torch_save_atomic(
            {"state": self.state(), "class_names": list(class_names)}, path, mode=0o600
        )

    @classmethod
    def load(cls, cfg: RunConfig, path: str | Path) -> tuple[SiteModels, list[str]]:
        """The AEs a site saved with :meth:`save`, for ``cfg``'s model sizes."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"site autoencoders not found: {path}")
        saved = torch.load(path, weights_only=True)
        names = list(saved["class_names"])
        models = cls.build(cfg, len(names))
        try:
            models.load_state(saved["state"])
        except RuntimeError as err:
            raise ValueError(f"{path}: autoencoders do not match the model config: {err}") from err
        return models, names


def site_models_path(out_dir: str | Path, site: str) -> Path:
    """Where a site keeps its trained AEs (its own disk; never sent)."""
    return Path(out_dir) / "sites" / site / "autoencoders.pt"


def site_transform(cfg: RunConfig, key_file: str | Path | None, create: bool = False) -> Keyed:
    """The site's keyed transform; the secret is read here and never returned. ``create``: a
    simulated hospital's first start may make its secret; otherwise a missing file is an error
    (only ``fedseg keygen`` makes a real hospital's)."""
    if cfg.privacy.transform == "none":
        return LatentTransform(None)
    if key_file is None:
        raise ValueError(
            f"privacy.transform = {cfg.privacy.transform!r} needs a key file "
            "(node config 'key-file')"
        )
    return keyed_transform(cfg, _secret(cfg, key_file, create))


def site_blinder(
    cfg: RunConfig, key_file: str | Path | None, site: str, create: bool = False
) -> BlindSite | None:
    """The site's blind-aggregation masker (``finetune_share = "blind"``), keyed by the
    federation secret; None in the other modes."""
    if cfg.training.finetune_share != "blind":
        return None
    if key_file is None:
        raise ValueError("training.finetune_share = 'blind' needs the federation key file")
    return BlindSite(_secret(cfg, key_file, create), site)


def _secret(cfg: RunConfig, key_file: str | Path, create: bool) -> bytes:
    """The key file's secret. ``create``: a simulated hospital's, made on first use from the
    run's seed, as a simulated federation's sites make theirs (:func:`resolve_site`), so an
    in-process study draws the keys of the Flower run it stands for, and repeats with one seed.
    """
    if not create:
        return read_key_file(key_file)
    return load_or_create_key(key_file, simulated_secret(cfg.training.seed, Path(key_file).stem))


def train_site(
    cfg: RunConfig, data: SiteData, on_epoch=None
) -> tuple[SiteModels, AutoencoderStats]:
    torch.manual_seed(cfg.training.seed)
    models = SiteModels.build(cfg, data.num_classes)
    t = cfg.training
    if t.ae_epochs == 0 and t.ae_minutes <= 0:  # split training starts from the seeded init
        models.image_ae.eval()
        models.mask_ae.eval()
        return models, AutoencoderStats(float("nan"), float("nan"), 0, 0.0)
    budget = Budget(t.ae_epochs, t.ae_minutes)
    return models, _train_local(cfg, data, models, budget, t.ae_lr, t.seed, on_epoch)


def _train_local(
    cfg: RunConfig,
    data: SiteData,
    models: SiteModels,
    budget: Budget,
    lr: float,
    seed: int,
    on_epoch=None,
) -> AutoencoderStats:
    t = cfg.training
    return train_autoencoders(
        data.images,
        data.masks,
        models.image_ae,
        models.mask_ae,
        data.num_classes,
        budget,
        lr,
        t.batch_size,
        seed,
        on_epoch,
        latent_noise=t.mask_latent_noise,
        cross_weight=t.cross_decoding_weight,
    )


def stream_length(data: SiteData, augment_copies: int) -> int:
    """Length of the training stream: the originals, then ``augment_copies`` augmented passes."""
    return len(data) * (1 + augment_copies)


def training_chunk(
    cfg: RunConfig,
    data: SiteData,
    models: SiteModels,
    transform: Keyed,
    start: int,
    stop: int,
) -> dict[str, np.ndarray]:
    """Keyed image and mask latents of stream items [start, stop), as fp16 wire arrays."""
    n = len(data)
    index = np.arange(start, stop)
    images = torch.from_numpy(data.images[index % n])
    masks = torch.from_numpy(data.masks[index % n])
    copies = index // n
    for copy in np.unique(copies[copies > 0]):
        sel = torch.from_numpy(np.flatnonzero(copies == copy))
        gen = torch.Generator().manual_seed(cfg.training.seed * 100_003 + int(copy) * 7919 + start)
        images[sel], masks[sel] = augment(images[sel], masks[sel], gen)
    image_latents = transform.forward(encode(models.image_ae, images), "image")
    mask_latents = transform.forward(
        encode(models.mask_ae, one_hot(masks, data.num_classes)), "mask"
    )
    return {**pack(image_latents, "image"), **pack(mask_latents, "mask")}


def query_chunk(
    data: SiteData, models: SiteModels, transform: Keyed, start: int, stop: int
) -> dict[str, np.ndarray]:
    """Keyed image latents of test images [start, stop): the inference query."""
    images = torch.from_numpy(data.images[start:stop])
    return pack(transform.forward(encode(models.image_ae, images), "image"), "image")


def segment_mapped(
    cfg: RunConfig,
    models: SiteModels,
    transform: Keyed,
    arrays: dict[str, np.ndarray],
    images: np.ndarray | None = None,
) -> np.ndarray:
    """Un-key the server's mapped mask latents and decode them into class maps. ``images``:
    the queried images, which a decoder with ``model.local_skips`` also reads (locally)."""
    shapes = latent_shapes(cfg.model.image_size, cfg.model.latent_channels)
    mapped = unpack(arrays, "mask", shapes)
    return decode_masks(models.mask_ae, transform.inverse(mapped, "mask"), models.image_ae, images)


def evaluate_predictions(
    data: SiteData, pred: np.ndarray, volumes: dict[str, np.ndarray] | None = None
) -> dict:
    """Per-slice (2D) metrics of ``pred`` on ``data``'s test slices; for whole volumes also
    ``volume``: each volume scored in 3D on its own grid (``volumes``: the predicted volumes,
    else reassembled from ``pred``)."""
    if pred.shape != data.masks.shape:
        raise ValueError(f"prediction shape {pred.shape} != test masks {data.masks.shape}")
    spacing = data.spacing if data.spacing_known else None
    metrics = segmentation_metrics(pred, data.masks, data.class_names, spacing)
    if volumes is not None or is_whole(data):
        if volumes is None:
            volumes = predicted_volumes(data, pred)
        refs = [data.volumes[g] for g in volumes]
        metrics["volume"] = volume_metrics(
            list(volumes.values()),
            [r.label for r in refs],
            [r.spacing for r in refs],
            data.class_names,
        )
    return metrics


def whole_volume_predictions(data: SiteData, pred: np.ndarray) -> dict[str, np.ndarray] | None:
    """The predicted volumes of a test split of whole volumes; None for other data."""
    return predicted_volumes(data, pred) if is_whole(data) else None


def predictions_dir(out_dir: str | Path, site: str, method: str) -> Path:
    """Where a site keeps one method's predicted volumes (its own disk)."""
    slug = "".join(c if c.isalnum() else "-" for c in method.lower()).strip("-")
    return site_models_path(out_dir, site).parent / "predictions" / slug


def score_test(
    cfg: RunConfig,
    data: SiteData,
    pred: np.ndarray,
    where: tuple[str | Path, str, str],
    volumes: dict[str, np.ndarray] | None = None,
) -> dict:
    """:func:`evaluate_predictions`, and with ``evaluation.write_volumes`` the predicted
    volumes as NIfTI beside the site's models; ``where``: (out dir, site, method), as
    :func:`predictions_dir` takes them."""
    if volumes is None:
        volumes = whole_volume_predictions(data, pred)
    metrics = evaluate_predictions(data, pred, volumes)
    if volumes and cfg.evaluation.write_volumes:
        write_volumes(volumes, data.volumes, predictions_dir(*where))
    return metrics


def score_on_test(cfg: RunConfig, setup: SiteSetup, pred: np.ndarray) -> dict:
    """The site's metrics of ``pred`` on its test split (:func:`score_test`: per volume too,
    and the predicted volumes written where asked), and its overlay figure: overlays show
    patient images, so they are written locally, never sent."""
    test = setup.split.test
    method = method_name(cfg)
    metrics = score_test(cfg, test, pred, (setup.out_dir, setup.split.name, method))
    pick = pick_examples(test, cfg.overlays_per_site)
    write_overlays(
        setup.out_dir,
        setup.split.name,
        Examples(test.shown(pick), test.masks[pick], pred[pick]),
        test.class_names,
        method=method,
    )
    return metrics


def pick_examples(data: SiteData, k: int) -> np.ndarray:
    """Indices of k test images spread over the set, preferring ones with foreground."""
    fg = np.flatnonzero(data.masks.reshape(len(data), -1).max(1) > 0)
    pool = fg if len(fg) >= k else np.arange(len(data))
    return pool[np.linspace(0, len(pool) - 1, min(k, len(pool))).astype(int)]


@dataclass
class SiteSetup:
    """Where a hospital's data, key and local outputs are, from its node config."""

    split: SiteSplit
    key_file: Path | None
    out_dir: Path


def resolve_site(cfg: RunConfig, node_config: dict) -> SiteSetup:
    """A real SuperNode names its data and key; a simulated one gets a partition of the scenario.

    Node config keys: ``data-dir``, ``key-file``, ``site-name``, ``out-dir`` (deployment) or
    ``partition-id`` (simulation).
    """
    out_dir = node_out_dir(cfg.out_dir, node_config)
    deployed = deployed_site(node_config)
    if deployed is not None:
        split = load_local_site(cfg, Path(str(node_config["data-dir"])), deployed.name)
    elif "partition-id" in node_config:
        split = site_for_partition(cfg, int(node_config["partition-id"]))
    else:
        raise ValueError("node config needs 'data-dir' (deployment) or 'partition-id' (simulation)")
    key_file = site_key_file(cfg, node_config, split.name)
    if key_file is None and needs_secret(cfg):
        raise KeyFileError("this site needs a secret: node config 'key-file' (fedseg keygen)")
    if key_file is not None and "key-file" not in node_config:
        # A simulated hospital's first start makes its secret, from the run's seed (so seeded
        # runs repeat); nothing else creates one. Key files the user gave are used as they are.
        _secret(cfg, key_file, create=True)
    if key_file is not None:  # a missing, mistyped or wrong key is an error before any work
        _bind_once(site_models_path(out_dir, split.name).parent, key_file)
    return SiteSetup(split, key_file, out_dir)


_BOUND: set[tuple] = set()


def _bind_once(folder: Path, key_file: Path) -> None:
    """``bind_key`` once per key file version and models folder in a process: resolve_site runs
    for every message, and reading and hashing the secret each time was I/O in the hot loop."""
    st = key_file.stat() if key_file.is_file() else None
    stamp = (folder, key_file, st.st_ino, st.st_mtime_ns) if st else None
    if stamp is None or stamp not in _BOUND or not (folder / FINGERPRINT_FILE).is_file():
        bind_key(folder, key_file)
        if stamp is not None:
            _BOUND.add(stamp)
