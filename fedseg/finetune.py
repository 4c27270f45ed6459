"""Split-learning fine-tuning: a site's encoder and mask decoder and the server's UMN, trained
together on the segmentation loss.

PPCMI-SF trains the UMN on latent MSE through frozen autoencoders, so nothing in the pipeline is
ever trained on the task itself. This phase does that, as U-shaped split learning:

1. the site encodes an augmented batch and sends its keyed image latents (as at inference);
2. the server maps them, keeping the autograd graph, and returns keyed mask latents;
3. the site un-keys and decodes them, computes Dice + CE against its own masks, steps its
   decoder and returns the gradient of the loss with respect to the *keyed* mask latents;
4. the server back-propagates through the UMN, steps it, and returns the gradient with respect
   to the keyed image latents; the site back-propagates it through step 1's encoder pass, kept
   in memory, and steps its encoder. A fine-tuner rebuilt from disk recomputes that pass
   instead (the batch and its augmentation are seeded by epoch and step).

Images, masks, weights and keys stay at the site. What the server newly sees are gradients in
keyed space for latents it already holds (it keeps every site's keyed mask latents for the UMN
anyway); the site newly sees gradients of the server's network. docs/privacy.md.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Iterable
from pathlib import Path
from typing import cast

import numpy as np
import torch
from torch import nn
from torch.func import functional_call

from fedseg.config import RunConfig, TrainingConfig
from fedseg.data import SiteData
from fedseg.models.autoencoder import latent_shapes
from fedseg.privacy.blind import BlindSite
from fedseg.privacy.transforms import Keyed
from fedseg.site import SiteModels
from fedseg.training import adamw, augment, cosine_lr, nhwc, segmentation_loss, to_nhwc
from fedseg.wire import GRAD_DTYPE, pack, unpack

SHARED_PREFIXES = ("image.encoder.", "mask.decoder.")


def finetune_steps(n_train: int, batch_size: int) -> int:
    """Steps per epoch at a site: full batches only (a batch of 1 would upset batch norm)."""
    return max(1, n_train // batch_size)


def split_epochs(training: TrainingConfig, sizes: Iterable[int]) -> int:
    """The phase's epochs: ``training.finetune_epochs``, or with -1 as many as the site with the
    most steps an epoch needs for ``finetune_optimizer_steps`` (the schedule follows the data:
    what a model needs is optimiser steps, whatever the set's size)."""
    if training.finetune_epochs >= 0:
        return training.finetune_epochs
    most = max((finetune_steps(n, training.batch_size) for n in sizes), default=1)
    return max(1, math.ceil(training.finetune_optimizer_steps / most))


class SiteFinetuner:
    """A site's side of the phase. Between messages it keeps only weights and optimizer state,
    so a handler can rebuild it from disk for every message."""

    def __init__(
        self,
        cfg: RunConfig,
        data: SiteData,
        models: SiteModels,
        transform: Keyed,
        blinder: BlindSite | None = None,
    ) -> None:
        self.cfg, self.data, self.models, self.transform = cfg, data, models, transform
        self.blinder = blinder  # training.finetune_share = "blind": masks its shared weights
        self.shapes = latent_shapes(cfg.model.image_size, cfg.model.latent_channels)
        lr = cfg.training.finetune_lr
        self.encoder_opt = adamw(models.image_ae.encoder.parameters(), lr)
        self.decoder_opt = adamw(models.mask_ae.decoder.parameters(), lr)
        self.loss_fn = segmentation_loss()
        # model.local_skips: the decoder's loss reaches the encoder's first stages directly, at
        # step 3, as a gradient for the local-skip features; it waits here, by (epoch, step),
        # for step 4, where one backward pass through the encoder takes it with the server's
        # (pipelined, step 4 of a batch comes after step 3 of the next).
        self.local_grads: dict[tuple[int, int], list[torch.Tensor]] = {}
        # Step 1's encoder pass (keyed latents, local-skip features) by (epoch, step), graph
        # and all, until step 4: the batch is encoded once a step, not three times. Pipelined,
        # two are kept (the next batch's is encoded before this one's gradient comes). Not state.
        self._passes: dict[tuple[int, int], tuple[list[torch.Tensor], list[torch.Tensor]]] = {}
        to_nhwc(models.image_ae, models.mask_ae)

    @property
    def steps(self) -> int:
        return finetune_steps(len(self.data), self.cfg.training.batch_size)

    def _batch(self, epoch: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The same batch, augmented the same way, whenever (epoch, step) is asked for."""
        if not 0 <= step < self.steps:
            raise ValueError(f"fine-tuning step {step} is outside 0..{self.steps - 1}")
        seed = self.cfg.training.seed
        shuffle = torch.Generator().manual_seed(seed + epoch)
        order = torch.randperm(len(self.data), generator=shuffle)
        bs = self.cfg.training.batch_size
        idx = order[step * bs : (step + 1) * bs].numpy()
        gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch * 1009 + step)
        x = torch.from_numpy(self.data.images[idx])
        y = torch.from_numpy(self.data.masks[idx])
        return augment(x, y, gen)

    def _encode(self, epoch: int, step: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Keyed image latents and local-skip features of (epoch, step), with their graph.

        The pass runs on a copy of the encoder's weights that only its graph holds (weight
        stashing, as in PipeDream): pipelined, the encoder steps on the last batch's gradient
        after this batch was encoded, and this batch's gradient must go back through the
        weights that encoded it, without a second pass."""
        if (epoch, step) not in self._passes:
            x, _ = self._batch(epoch, step)
            encoder = self.models.image_ae.encoder
            encoder.train()
            weights = {name: p.clone() for name, p in encoder.named_parameters()}
            latents, local = functional_call(encoder, weights, (nhwc(x),), {"local": True})
            self._passes = dict(list(self._passes.items())[-1:])  # at most two
            self._passes[(epoch, step)] = (self.transform.forward(latents, "image"), local)
        return self._passes[(epoch, step)]

    def forward(self, epoch: int, step: int) -> dict[str, np.ndarray]:
        """Step 1: keyed image latents of this step's batch (fp16 wire arrays)."""
        return pack(self._encode(epoch, step)[0], "image")

    def backward_encoder(
        self, epoch: int, step: int, epochs: int, grads: dict[str, np.ndarray]
    ) -> None:
        """Step 4: the server's gradient for that step's keyed image latents, into the encoder."""
        grad = unpack(grads, "grad", self.shapes, dtype=GRAD_DTYPE)
        keyed, local = self._encode(epoch, step)
        del self._passes[(epoch, step)]  # its graph is spent below
        if keyed[0].shape[0] != grad[0].shape[0]:
            raise ValueError(f"gradient for {grad[0].shape[0]} items, batch has {len(keyed[0])}")
        cosine_lr(self.encoder_opt, self.cfg.training.finetune_lr, epoch / max(epochs, 1))
        self.encoder_opt.zero_grad(set_to_none=True)
        local_grads = self.local_grads.pop((epoch, step), None)
        # An older step's would never be used; pipelined, the next batch's is already here
        # (it was decoded first) and waits for its own encoder step.
        self.local_grads = {k: g for k, g in self.local_grads.items() if k > (epoch, step)}
        if local_grads is None:
            torch.autograd.backward(keyed, grad)
        else:  # one pass back through the encoder for both: its first stages are the costly
            torch.autograd.backward([*keyed, *local], [*grad, *local_grads])
        self.encoder_opt.step()
        self.models.image_ae.eval()

    def decode_and_backward(
        self, epoch: int, step: int, epochs: int, mapped: dict[str, np.ndarray]
    ) -> tuple[dict[str, np.ndarray], float]:
        """Step 3: loss on the site's own masks; returns d loss / d keyed mask latents."""
        _, y = self._batch(epoch, step)
        keyed = [z.requires_grad_() for z in unpack(mapped, "mask", self.shapes)]
        if keyed[0].shape[0] != y.shape[0]:
            raise ValueError(f"mapped latents for {keyed[0].shape[0]} items, batch has {len(y)}")
        decoder = self.models.mask_ae.decoder
        decoder.train()
        local = None
        if decoder.local_skips:  # cut from the encoder's graph: step 4 goes back through it
            local = [f.detach().requires_grad_() for f in self._encode(epoch, step)[1]]
            self.models.image_ae.encoder.eval()
        logits = decoder([nhwc(z) for z in self.transform.inverse(keyed, "mask")], local)
        loss = self.loss_fn(logits, y[:, None])
        cosine_lr(self.decoder_opt, self.cfg.training.finetune_lr, epoch / max(epochs, 1))
        self.decoder_opt.zero_grad(set_to_none=True)
        loss.backward()
        self.decoder_opt.step()
        decoder.eval()
        if local is not None:
            self.local_grads[(epoch, step)] = [cast(torch.Tensor, f.grad) for f in local]
        keyed_grads = [cast(torch.Tensor, z.grad) for z in keyed]  # leaves of this graph: set
        return pack(keyed_grads, "grad", GRAD_DTYPE), float(loss.item())

    def shared_state(self) -> dict[str, torch.Tensor]:
        """The weights that ``training.finetune_share`` makes one model across sites: the
        image encoder and the mask decoder, less their batch norms with
        ``training.local_batch_norm`` (FedBN)."""
        return shared_weights(self.models, self.cfg.training)

    def adopt(self, state: dict[str, torch.Tensor]) -> None:
        """Take the shared weights (another site's, or the average); optimizer moments stay."""
        expected = set(self.shared_state())
        if set(state) != expected:
            missing, extra = sorted(expected - set(state)), sorted(set(state) - expected)
            raise ValueError(
                f"shared weights do not fit this site's models: missing {missing[:3]}, "
                f"unexpected {extra[:3]}"
            )
        own = self.models.state()
        for name, value in state.items():
            if value.shape != own[name].shape:
                raise ValueError(
                    f"shared weight {name}: shape {tuple(value.shape)}, "
                    f"this site's model has {tuple(own[name].shape)}"
                )
            if value.is_floating_point() and not torch.isfinite(value).all():
                raise ValueError(f"shared weight {name} is not finite")
        self._passes.clear()  # new weights: a kept pass's graph no longer applies
        self.models.load_state({**own, **{k: v.to(own[k].dtype) for k, v in state.items()}})

    def _blinder(self) -> BlindSite:
        if self.blinder is None:
            raise PermissionError(
                "this site was not set up for blind aggregation (training.finetune_share)"
            )
        return self.blinder

    def blinded_state(self, label: str) -> np.ndarray:
        """The shared weights, weighted by the training-set size and masked (uint64): the
        only form in which they leave the site with ``finetune_share = "blind"``."""
        return self._blinder().blind(self._float_shared(), len(self.data), label)

    def adopt_blinded(self, masked_sum: np.ndarray, label: str, sites: list[str]) -> int:
        """Unmask the server's sum over ``sites`` and adopt the average (integer buffers stay
        the site's own); returns the total weight it averaged over."""
        own = self.shared_state()
        state, total = self._blinder().unblind(masked_sum, label, sites, self._float_shared())
        self.adopt({**own, **state})
        return total

    def _float_shared(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in self.shared_state().items() if v.is_floating_point()}

    def state(self) -> dict:
        return {
            "models": self.models.state(),
            "encoder_opt": self.encoder_opt.state_dict(),
            "decoder_opt": self.decoder_opt.state_dict(),
            "local_grads": [(e, k, g) for (e, k), g in self.local_grads.items()],
            "blind_labels": sorted(self.blinder.used) if self.blinder else [],
        }

    def load_state(self, state: dict) -> None:
        self._passes.clear()
        self.models.load_state(state["models"])
        self.encoder_opt.load_state_dict(state["encoder_opt"])
        self.decoder_opt.load_state_dict(state["decoder_opt"])
        # (a state saved before the local gradients were per feature held parameter gradients:
        # that one step's local part is dropped)
        saved = state.get("local_grads") or []
        self.local_grads = {(e, k): g for e, k, g in saved if isinstance(g, list)}
        if self.blinder is not None:
            self.blinder.used |= set(state.get("blind_labels", []))


class KeptFinetuners:
    """The fine-tuners a process saved last, by state file.

    A process serves a site's messages one after another (a simulation's Ray actor serves
    several sites), and rebuilding and reloading the fine-tuner for each was a sixth of a step.
    One is handed back only while its file is still the one it saved (another process may have
    served the site since) and ``context`` (config, key file) is the same; it is taken out while
    a handler uses it, so a handler that fails leaves the file on disk, not a half-stepped copy.
    """

    def __init__(self) -> None:
        self._kept: dict[Path, tuple[tuple, SiteFinetuner]] = {}

    @staticmethod
    def _stamp(path: Path, context: Hashable) -> tuple:
        st = path.stat()
        return st.st_ino, st.st_mtime_ns, st.st_size, context

    def keep(self, path: Path, tuner: SiteFinetuner, context: Hashable) -> None:
        """Call right after saving ``tuner`` to ``path``."""
        self._kept[path] = (self._stamp(path, context), tuner)

    def take(self, path: Path, context: Hashable) -> SiteFinetuner | None:
        kept = self._kept.pop(path, None)
        if kept is None or not path.is_file() or kept[0] != self._stamp(path, context):
            return None
        return kept[1]


_KEPT = KeptFinetuners()


def kept_finetuners() -> KeptFinetuners:
    """This process's one instance. Reached through a function because simulation unpickles
    the ClientApp for every message, and a module object captured by its handlers would be
    unpickled as a fresh, empty copy each time."""
    return _KEPT


def batch_norm_keys(models: SiteModels) -> set[str]:
    """State keys of every batch norm in a site's autoencoders (weights and statistics)."""
    keys: set[str] = set()
    for prefix, net in (("image.", models.image_ae), ("mask.", models.mask_ae)):
        for name, module in net.named_modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                keys.update(f"{prefix}{name}.{k}" for k in module.state_dict())
    return keys


def shared_weights(models: SiteModels, training: TrainingConfig) -> dict[str, torch.Tensor]:
    """A site's encoder and mask decoder, less their batch norms with
    ``training.local_batch_norm`` (FedBN): what split training makes one model."""
    local = batch_norm_keys(models) if training.local_batch_norm else set()
    state = models.state()
    return {k: v for k, v in state.items() if k.startswith(SHARED_PREFIXES) and k not in local}
