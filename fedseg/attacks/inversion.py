"""Learned inversion: an attacker trains a decoder from shared latents back to images.

Attacker (server, eavesdropper, or an insider): knows the architecture (the decoder it trains is
fedseg's own image decoder, freshly initialised) and holds auxiliary images of the same modality
that are not the victim's (another site's training images). Victim: one site's test images.
Three variants per mode, by what else the attacker holds:

- ``pairs, no key``: the victim's *shared* latents of the auxiliary images (an encoding oracle,
  or pairs leaked from storage). It learns keyed latents -> image directly; no key needed.
- ``encoder, no key``: the victim's image encoder (e.g. a leaked model file) but not the key.
  It learns plain latents -> image and applies that to the keyed latents it intercepts.
- ``key``: encoder and key compromised: it un-keys what it intercepts, then decodes.

With ``none`` all three are the same attack. SSIM/PSNR on the victim's test images.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

from fedseg.attacks.context import MODES, RunContext
from fedseg.attacks.figures import reconstruction_grid
from fedseg.attacks.report import figure_dir, table
from fedseg.attacks.scores import image_quality
from fedseg.models.autoencoder import Decoder, Latents


def train_decoder(
    cfg, latents: Latents, images: torch.Tensor, epochs: int, seed: int, batch: int = 16
) -> Decoder:
    """Fit a fresh image decoder (fedseg's architecture) from latents to images (MSE)."""
    torch.manual_seed(seed)
    dec = Decoder(1, cfg.model.ae_widths, cfg.model.latent_channels)
    opt = torch.optim.AdamW(dec.parameters(), lr=2e-3, weight_decay=1e-4)
    steps = max(1, epochs * ((len(images) + batch - 1) // batch))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps)
    gen = torch.Generator().manual_seed(seed)
    dec.train()
    for _ in range(epochs):
        order = torch.randperm(len(images), generator=gen)
        for i in range(0, len(images), batch):
            idx = order[i : i + batch]
            loss = F.mse_loss(dec([z[idx] for z in latents]), images[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    return dec.eval()


@torch.no_grad()
def _apply(dec: Decoder, latents: Latents) -> torch.Tensor:
    n = len(latents[0])
    return torch.cat([dec([z[i : i + 32] for z in latents]) for i in range(0, n, 32)])


def run(ctx: RunContext, modes: tuple[str, ...] = MODES) -> tuple[dict, str]:
    a = ctx.cfg.attack
    victim_index = a.victim % len(ctx.sites)
    aux_index = (victim_index + 1) % len(ctx.sites)
    victim = ctx.names[victim_index]
    aux = torch.from_numpy(ctx.sites[aux_index].train.images)
    test = torch.from_numpy(ctx.sites[victim_index].test.images)
    aux_plain = ctx.plain(victim, aux)
    test_plain = ctx.plain(victim, test)
    dec_plain = train_decoder(ctx.cfg, aux_plain, aux, a.inversion_epochs, a.seed)
    rows, examples = [], {}
    result: dict = {}  # per mode: variant -> scores; then who and how many
    for mode in modes:
        shared_test = ctx.shared(victim, test_plain, mode)
        if mode == "none":
            recon = {"no key": _apply(dec_plain, shared_test)}
        else:
            dec_shared = train_decoder(
                ctx.cfg, ctx.shared(victim, aux_plain, mode), aux, a.inversion_epochs, a.seed
            )
            with torch.no_grad():
                unkeyed = ctx.transform(victim, mode).inverse(shared_test, "image")
            recon = {
                "pairs, no key": _apply(dec_shared, shared_test),
                "encoder, no key": _apply(dec_plain, shared_test),
                "key": _apply(dec_plain, unkeyed),
            }
        result[mode] = {variant: image_quality(r, test) for variant, r in recon.items()}
        for variant, q in result[mode].items():
            rows.append([mode, variant, q["ssim"], q["psnr"]])
            examples[f"{mode}: {variant}"] = recon[variant][:6]
    result["victim"], result["auxiliary"] = victim, ctx.names[aux_index]
    result["n_aux"], result["n_test"] = len(aux), len(test)
    fig = reconstruction_grid(
        figure_dir(ctx.run) / "inversion.png", test[:6], examples, f"learned inversion ({victim})"
    )
    md = (
        "## Learned inversion\n\n"
        f"Victim {victim} ({len(test)} test images); the attacker trains fedseg's image decoder "
        f"({a.inversion_epochs} epochs) on {len(aux)} auxiliary images of another site "
        f"({ctx.names[aux_index]}). *pairs, no key*: it holds the victim's shared latents of the "
        "auxiliary images; *encoder, no key*: it holds the victim's encoder but not the key; "
        "*key*: both. SSIM/PSNR against the victim's test images.\n\n"
        + table(["mode", "attacker holds", "SSIM", "PSNR (dB)"], rows)
        + f"\n\n![inversion]({fig.relative_to(ctx.run)})\n"
    )
    return result, md
