"""What a hospital does for each request of the protocol (``fedseg/protocol.py``), without
Flower: each function takes the site's config and setup and the request's decoded parts, and
returns the reply's parts. ``clients/app.py`` turns Flower messages into these calls.

A site's models and its split-training state live on its own disk (0600), never in a message
or in Flower's ``context.state`` (which a simulation ships to its Ray actor and back with every
message: 4.7 MB of weights each way was most of a split-training step's messaging).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedseg.atomic import write_text_atomic
from fedseg.checkpoint import fingerprint, save_private
from fedseg.config import RunConfig, method_name
from fedseg.data.stats import site_statistics
from fedseg.figures import Examples, write_overlays
from fedseg.finetune import SiteFinetuner, kept_finetuners
from fedseg.models.autoencoder import latent_shapes
from fedseg.privacy.audit import ckks_secret_file
from fedseg.privacy.blind import mask_label
from fedseg.privacy.ckks import HospitalCkks, Packing, query_packing
from fedseg.protocol import FINAL_STEP, SHARE_STEP, FinetuneRequest, LatentRequest, RoundRequest
from fedseg.site import (
    SiteModels,
    SiteSetup,
    pick_examples,
    query_chunk,
    score_test,
    segment_mapped,
    site_blinder,
    site_models_path,
    site_transform,
    train_site,
    training_chunk,
)

log = logging.getLogger("fedseg.client")
FINETUNED = "+finetuned"  # appended to a site's AE tag: not the AEs its kept latents came from
Arrays = dict[str, np.ndarray]


def load_models(cfg: RunConfig, setup: SiteSetup) -> SiteModels:
    """The site's current models, from its own disk."""
    path = site_models_path(setup.out_dir, setup.split.name)
    if not path.is_file():
        raise RuntimeError(f"site {setup.split.name}: no trained models yet ({path.name})")
    return SiteModels.load(cfg, path)[0]


def register(cfg: RunConfig, setup: SiteSetup, reuse: bool) -> tuple[dict, dict]:
    """(metrics, site record): sizes and losses; name, class names and aggregate statistics.
    Trains the site's models (the seeded start of split training, or the paper preset's
    autoencoders), or with ``reuse`` (resuming) reloads the ones the server's kept latents
    came from."""
    site = setup.split
    site_transform(cfg, setup.key_file)  # checks the site's key before any work
    saved = site_models_path(setup.out_dir, site.name)
    tag = saved.with_suffix(".config")
    metrics: dict[str, Any] = {"n_train": len(site.train), "n_test": len(site.test)}
    # Fine-tuned AEs (tag + FINETUNED) no longer match the latents the server kept.
    if reuse and saved.is_file() and tag.is_file() and tag.read_text() == fingerprint(cfg):
        _, names = SiteModels.load(cfg, saved)
        if names != list(site.train.class_names):
            raise ValueError(f"{saved}: classes {names} != the data's {site.train.class_names}")
        log.info("%s: reloaded autoencoders from %s", site.name, saved)
        metrics["reused"] = 1
    else:
        log.info("%s: training autoencoders on %d images", site.name, len(site.train))
        models, stats = train_site(cfg, site.train)
        models.save(saved, site.train.class_names)
        write_text_atomic(tag, fingerprint(cfg))
        metrics.update(
            image_loss=stats.image_loss,
            mask_loss=stats.mask_loss,
            epochs=stats.epochs,
            seconds=stats.seconds,
        )
    info = {
        "site": site.name,
        "class_names": list(site.train.class_names),
        # Aggregates only (sizes, class fractions, an intensity histogram).
        "stats_json": json.dumps(site_statistics(site.train, site.test)),
    }
    return metrics, info


def latent_chunk(cfg: RunConfig, setup: SiteSetup, request: LatentRequest) -> Arrays:
    """Keyed latents of items [start, stop) of the training stream or the test split."""
    models = load_models(cfg, setup)
    transform = site_transform(cfg, setup.key_file)
    if request.split == "train":
        return training_chunk(
            cfg, setup.split.train, models, transform, request.start, request.stop
        )
    if request.split == "test":
        return query_chunk(setup.split.test, models, transform, request.start, request.stop)
    raise ValueError(f"request.split must be 'train' or 'test', got {request.split!r}")


def round_latents(cfg: RunConfig, setup: SiteSetup, request: RoundRequest) -> Arrays | None:
    """A UMN round's fresh training latents (None: a heartbeat only)."""
    if request.stop <= request.start:
        return None
    chunk = LatentRequest("train", request.start, request.stop)
    return latent_chunk(cfg, setup, chunk)


@dataclass
class ForwardReply:
    """What a split-training forward request is answered with (one field is set)."""

    latents: Arrays | None = None  # the requested batch's keyed image latents
    blinded: np.ndarray | None = None  # SHARE_STEP, blind: the masked shared weights
    weights: dict[str, torch.Tensor] | None = None  # SHARE_STEP, average: the shared weights
    done: bool = False  # FINAL_STEP: the fine-tuned models are the site's models now


def finetune_forward(
    cfg: RunConfig,
    setup: SiteSetup,
    request: FinetuneRequest,
    run_id: int,
    grad: Arrays | None = None,
    weights: dict[str, torch.Tensor] | None = None,
    blinded_sum: np.ndarray | None = None,
) -> ForwardReply:
    """Apply what the server sent (the encoder gradient owed, the shared model), then answer
    the step: a batch's latents, the shared weights (``SHARE_STEP``) or the end."""
    tuner, path = _finetuner(cfg, setup, start=request.start)
    if grad is not None:
        tuner.backward_encoder(
            _field(request.grad_epoch), _field(request.grad_step), request.epochs, grad
        )
    if weights is not None:  # the shared model (average)
        check_finetune_share(cfg, setup.split.name)
        tuner.adopt(weights)
    if blinded_sum is not None:  # the masked sum of the sites' weights
        label = mask_label(run_id, _field(request.blind_epoch))
        tuner.adopt_blinded(blinded_sum, label, request.blind_sites)
    if request.step == FINAL_STEP:
        _finish(cfg, setup, tuner, path)
        return ForwardReply(done=True)
    if request.step == SHARE_STEP:
        reply = _share(cfg, setup, tuner, request, run_id)
    else:
        reply = ForwardReply(latents=tuner.forward(request.epoch, request.step))
    _save(cfg, setup, tuner, path, urgent=request.step == SHARE_STEP)
    return reply


def finetune_backward(
    cfg: RunConfig,
    setup: SiteSetup,
    request: FinetuneRequest,
    mapped: Arrays,
    owed: Arrays | None = None,
) -> tuple[Arrays, float, Arrays | None]:
    """Decode the mapped latents against the batch's masks: (the gradient for the server, the
    loss, and with ``next_step`` the next batch's latents, after the encoder step ``owed``
    (``training.finetune_pipeline``))."""
    tuner, path = _finetuner(cfg, setup, start=False)
    grad, loss = tuner.decode_and_backward(request.epoch, request.step, request.epochs, mapped)
    if owed is not None:
        tuner.backward_encoder(
            _field(request.grad_epoch), _field(request.grad_step), request.epochs, owed
        )
    latents = None
    if request.next_step is not None:
        latents = tuner.forward(request.epoch, request.next_step)
    _save(cfg, setup, tuner, path)
    return grad, loss, latents


def segment(
    cfg: RunConfig, setup: SiteSetup, mapped: Arrays, encrypted: bool = False
) -> dict[str, Any]:
    """Decode the server's mapped test latents and score them here; only metrics leave.
    ``encrypted``: ``mapped`` holds CKKS ciphertexts of them (``privacy.query = "ckks"``),
    decrypted here with the key only this hospital holds."""
    started = time.perf_counter()
    if encrypted:
        keys = hospital_ckks(cfg, setup)
        mapped = keys.decrypt(mapped, _packing(cfg, keys))
        if mapped["mask0"].shape[0] != len(setup.split.test):
            raise ValueError(
                f"{mapped['mask0'].shape[0]} mapped images for {len(setup.split.test)} test images"
            )
    models = load_models(cfg, setup)
    transform = site_transform(cfg, setup.key_file)
    test = setup.split.test
    pred = segment_mapped(cfg, models, transform, mapped, test.images)
    # Predicted volumes, if written, stay on this site's disk with its models.
    metrics = score_test(cfg, test, pred, (setup.out_dir, setup.split.name, method_name(cfg)))
    pick = pick_examples(test, cfg.overlays_per_site)
    # Overlays show patient images: they are written locally, never sent.
    write_overlays(
        setup.out_dir,
        setup.split.name,
        Examples(test.shown(pick), test.masks[pick], pred[pick]),
        test.class_names,
        method=method_name(cfg),
    )
    metrics["decode_seconds"] = time.perf_counter() - started
    return metrics


def ckks_key_file(setup: SiteSetup) -> Path:
    """The hospital's CKKS secret context: beside its other secret (where the outgoing guard
    looks for it), else in its own models folder."""
    if setup.key_file is not None:
        return ckks_secret_file(setup.key_file, setup.split.name)
    return site_models_path(setup.out_dir, setup.split.name).with_name("ckks.key")


def hospital_ckks(cfg: RunConfig, setup: SiteSetup) -> HospitalCkks:
    """The hospital's CKKS keys (made on first use, 0600); the secret key never leaves."""
    return HospitalCkks.load_or_create(ckks_key_file(setup))


def _packing(cfg: RunConfig, keys: HospitalCkks) -> Packing:
    shapes = latent_shapes(cfg.model.image_size, cfg.model.latent_channels)
    return query_packing(shapes, keys.params)


def ckks_keys(cfg: RunConfig, setup: SiteSetup) -> Arrays:
    """The public bundle the server needs to map this hospital's encrypted queries (public,
    relinearisation and one Galois key; no secret key)."""
    keys = hospital_ckks(cfg, setup)
    return keys.public_bundle(_packing(cfg, keys))


def ckks_query(cfg: RunConfig, setup: SiteSetup, start: int, stop: int) -> Arrays:
    """CKKS ciphertexts of the keyed latents of test images [start, stop)."""
    if not 0 <= start < stop <= len(setup.split.test):
        raise ValueError(f"test images [{start}, {stop}) outside [0, {len(setup.split.test)})")
    arrays = latent_chunk(cfg, setup, LatentRequest("test", start, stop))
    keys = hospital_ckks(cfg, setup)
    return keys.encrypt(arrays, _packing(cfg, keys))


def check_finetune_share(cfg: RunConfig, site: str) -> None:
    """Fine-tuning weights are shared only if the site's own config says so."""
    if cfg.training.finetune_share == "none":
        raise PermissionError(
            f"site {site}: refusing to exchange encoder/decoder weights: this site's "
            "training.finetune_share is 'none'"
        )


def finetune_state_path(setup: SiteSetup) -> Path:
    return site_models_path(setup.out_dir, setup.split.name).with_name("finetune-state.pt")


def _field(value: int | None) -> int:
    if value is None:
        raise ValueError("a gradient or sum came without the step it belongs to")
    return value


def _share(
    cfg: RunConfig, setup: SiteSetup, tuner: SiteFinetuner, request: FinetuneRequest, run_id: int
) -> ForwardReply:
    check_finetune_share(cfg, setup.split.name)
    if cfg.training.finetune_share != "blind":
        return ForwardReply(weights=tuner.shared_state())
    if request.share_epoch is None:
        raise PermissionError(
            f"site {setup.split.name}: training.finetune_share is 'blind': its weights "
            "leave only masked, and the server asked for them in the clear"
        )
    return ForwardReply(blinded=tuner.blinded_state(mask_label(run_id, request.share_epoch)))


def _finish(cfg: RunConfig, setup: SiteSetup, tuner: SiteFinetuner, path: Path) -> None:
    """The end: the fine-tuned models become the site's models."""
    saved = site_models_path(setup.out_dir, setup.split.name)
    tuner.models.save(saved, setup.split.train.class_names)
    write_text_atomic(saved.with_suffix(".config"), fingerprint(cfg) + FINETUNED)
    if _pending is not None:
        _pending.discard(path)
    path.unlink(missing_ok=True)


def _context(cfg: RunConfig, setup: SiteSetup) -> tuple:
    return fingerprint(cfg), setup.key_file  # what a kept fine-tuner was built from


class PendingSaves:
    """Saves of split-training state that a long-lived caller runs later (fedseg/site_worker.py:
    after its reply, at an epoch's end or when idle); only each site's latest state is kept."""

    def __init__(self) -> None:
        self._saves: dict[Path, Callable[[], None]] = {}
        self.urgent = False  # an epoch ended: save right after the reply

    def add(self, path: Path, save: Callable[[], None], urgent: bool) -> None:
        if path not in self._saves:
            _stale_marker(path).touch(mode=0o600)
        self._saves[path] = save
        self.urgent = self.urgent or urgent

    def discard(self, path: Path) -> None:
        """The state is finished with (the run's last step): nothing left to save."""
        self._saves.pop(path, None)
        _stale_marker(path).unlink(missing_ok=True)

    def run(self) -> None:
        saves, self._saves, self.urgent = list(self._saves.values()), {}, False
        for save in saves:
            save()

    def __bool__(self) -> bool:
        return bool(self._saves)


_pending: PendingSaves | None = None


@contextmanager
def deferred_saves(pending: PendingSaves) -> Iterator[None]:
    """Inside the block the split-training state is not saved but left on ``pending``. A
    marker file says the state on disk is behind until the save has run: a process that finds
    it refuses the stale state instead of training on from an older step."""
    global _pending
    _pending = pending
    try:
        yield
    finally:
        _pending = None


def _stale_marker(path: Path) -> Path:
    return path.with_name(path.name + ".unsaved")


def _save(
    cfg: RunConfig, setup: SiteSetup, tuner: SiteFinetuner, path: Path, urgent: bool = False
) -> None:
    def save() -> None:
        save_private(tuner.state(), path)
        kept_finetuners().keep(path, tuner, _context(cfg, setup))
        _stale_marker(path).unlink(missing_ok=True)

    if _pending is None or not path.is_file():
        save()
    else:  # kept in memory now, on disk later; until then the marker says the file is behind
        kept_finetuners().keep(path, tuner, _context(cfg, setup))
        _pending.add(path, save, urgent)


def _finetuner(cfg: RunConfig, setup: SiteSetup, start: bool) -> tuple[SiteFinetuner, Path]:
    """The site's split-training state: from its trained models at the start, else from its
    disk (weights and optimizer moments; 0600, never sent) or this process's copy of it."""
    path = finetune_state_path(setup)
    tuner = kept_finetuners().take(path, _context(cfg, setup))
    if tuner is not None and not start:
        return tuner, path
    if start:
        _stale_marker(path).unlink(missing_ok=True)
        models = load_models(cfg, setup)
    elif _stale_marker(path).exists():
        raise RuntimeError(
            f"site {setup.split.name}: its split-training state was not saved after its last "
            "step (its worker stopped), so it cannot go on with this run"
        )
    elif path.is_file():  # its weights come from the state file: no need to load them twice
        models = SiteModels.build(cfg, setup.split.train.num_classes)
    else:
        raise RuntimeError(f"site {setup.split.name}: no fine-tuning in progress ({path})")
    transform = site_transform(cfg, setup.key_file)
    blinder = site_blinder(cfg, setup.key_file, setup.split.name)
    tuner = SiteFinetuner(cfg, setup.split.train, models, transform, blinder)
    if not start:
        tuner.load_state(torch.load(path, weights_only=True))
    return tuner, path
