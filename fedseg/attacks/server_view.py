"""What a curious server holds after split training, recomputed from a finished run folder.

The server of split training receives, from the victim site, the keyed image latents of every
training batch (augmented as the protocol augments them), the keyed latents of its test queries
at evaluation, and the gradient of the site's loss with respect to the keyed mask latents the
server returned. It holds its UMN. With ``finetune_share = "average"`` it also holds the
averaged encoder and mask decoder (which every site ends with; with ``local_batch_norm`` their
batch norms stay at the sites, and the attacks give the server the victim's own: a stronger
server than the protocol makes); with ``"blind"`` it holds neither.
It has auxiliary images of the same modality that are never the victim's: another site's
training set (with masks, for the attacks that need labelled auxiliary data).

Batches are recomputed with the run's final weights (what the server saw in the last epochs).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import cast

import torch

from fedseg.attacks.context import RunContext
from fedseg.models.autoencoder import Latents
from fedseg.models.umn import UnifiedMappingNetwork
from fedseg.training import augment, nhwc, segmentation_loss

AUGMENTED_COPIES = 3  # passes over the victim's training set (the server saw hundreds)


@dataclass
class ServerView:
    victim: str
    aux_site: str
    share: str  # training.finetune_share of the run: does the server hold the weights?
    umn: UnifiedMappingNetwork
    train_keyed: Latents  # victim's keyed training-batch latents (augmented), fp16 as on the wire
    train_masks: torch.Tensor  # their true masks (the evaluator's, for scoring leaks)
    train_grads: Latents  # victim's returned gradients w.r.t. the keyed mask latents
    test_keyed: Latents  # victim's keyed test queries
    test_images: torch.Tensor  # the evaluator's ground truth
    test_masks: torch.Tensor
    aux_images: torch.Tensor
    aux_masks: torch.Tensor
    class_names: list[str]

    @property
    def holds_weights(self) -> bool:
        return self.share == "average"


def _augmented(images: torch.Tensor, masks: torch.Tensor, copies: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    pairs = [augment(images, masks, gen) for _ in range(copies)]
    return torch.cat([p[0] for p in pairs]), torch.cat([p[1] for p in pairs])


def _half(latents: Latents) -> Latents:
    return [z.detach().half().float() for z in latents]


def gather(ctx: RunContext) -> ServerView:
    """Recompute everything the server received from ``ctx.cfg.attack.victim``."""
    a = ctx.cfg.attack
    vi = a.victim % len(ctx.sites)
    ai = (vi + 1) % len(ctx.sites)
    victim, split = ctx.names[vi], ctx.sites[vi]
    models, transform = ctx.models[victim], ctx.transform(victim)
    umn = ctx.umn()
    x, y = _augmented(
        torch.from_numpy(split.train.images),
        torch.from_numpy(split.train.masks).long(),
        AUGMENTED_COPIES,
        a.seed,
    )
    encoder, decoder = models.image_ae.encoder.eval(), models.mask_ae.decoder.eval()
    loss_fn = segmentation_loss()  # the loss the victim trains with: its gradients are these
    keyed_parts, grad_parts = [], []
    index = umn.site_index(victim)
    for i in range(0, len(x), 32):
        xb, yb = x[i : i + 32], y[i : i + 32]
        with torch.no_grad():
            latents, local = encoder.encode(nhwc(xb))
            keyed = _half(transform.forward(latents, "image"))
            mapped = _half(umn([nhwc(z) for z in keyed], index))
        mapped = [z.requires_grad_() for z in mapped]
        logits = decoder([nhwc(z) for z in transform.inverse(mapped, "mask")], local)
        loss_fn(logits, yb[:, None]).backward()
        keyed_parts.append(keyed)
        # set by backward(): every scale feeds the decoder, so the loss
        grad_parts.append([cast(torch.Tensor, z.grad).half().float() for z in mapped])
    test_images = torch.from_numpy(split.test.images)
    with torch.no_grad():
        test_latents = [torch.cat(s) for s in zip(*_batched(encoder, test_images), strict=True)]
        test_keyed = _half(transform.forward(test_latents, "image"))
    aux = ctx.sites[ai].train
    return ServerView(
        victim=victim,
        aux_site=ctx.names[ai],
        share=ctx.cfg.training.finetune_share,
        umn=umn,
        train_keyed=[torch.cat(s) for s in zip(*keyed_parts, strict=True)],
        train_masks=y,
        train_grads=[torch.cat(s) for s in zip(*grad_parts, strict=True)],
        test_keyed=test_keyed,
        test_images=test_images,
        test_masks=torch.from_numpy(split.test.masks).long(),
        aux_images=torch.from_numpy(aux.images),
        aux_masks=torch.from_numpy(aux.masks).long(),
        class_names=list(split.test.class_names),
    )


def _batched(encoder, images: torch.Tensor, batch: int = 32) -> list[Latents]:
    return [encoder(nhwc(images[i : i + batch])) for i in range(0, len(images), batch)]


@torch.no_grad()
def map_keyed(umn: UnifiedMappingNetwork, site: str, keyed: Latents) -> Latents:
    """The server's own forward pass: keyed image latents -> keyed mask latents."""
    umn.eval()
    index = umn.site_index(site)
    parts = [umn([nhwc(z[i : i + 32]) for z in keyed], index) for i in range(0, len(keyed[0]), 32)]
    return [torch.cat(s) for s in zip(*parts, strict=True)]
