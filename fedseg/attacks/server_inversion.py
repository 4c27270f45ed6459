"""The curious server of split training with shared weights (``finetune_share = "average"``):
it holds the averaged encoder and mask decoder, so the key is all that stands between it and
the victim's images and masks.

(a) **Key estimate without the key.** The server encodes auxiliary images (another site's,
augmented as the protocol augments) with the encoder it holds and aligns their latent statistics
with the victim's keyed latents, per scale: an orthogonal map and a bias such that
``keyed ~ M plain + b``. Two alignments, and the one whose statistics fit better (the server
cannot see the truth) is used:
- *canonical*: principal axes of both, signs by skewness;
- *procrustes*: orthogonal Procrustes on the per-position mean latents (the modality's layout),
  refined by gradient descent on the fit of means, covariances and layouts together.
(b) **Its own segmentation** of the victim's test images: UMN, then the decoder it holds. It
needs the mask role's key too: it fits an affine un-keying of the UMN's output on labelled
auxiliary pairs (a public data set of the modality), and the decoder's local skips from its own
reconstruction of the image (c).
(c) **Inversion**: fedseg's image decoder trained from the encoder's latents to images on the
auxiliary images, applied to the victim's un-keyed test latents.

Scores: key-estimate error (relative un-keying error on the victim's test latents), SSIM/PSNR of
the reconstructions, the server's Dice on the victim's true masks; each beside the same attack
with the true key.
"""

from __future__ import annotations

from typing import Any

import torch
from monai.losses import DiceCELoss

from fedseg.attacks.context import RunContext
from fedseg.attacks.figures import reconstruction_grid
from fedseg.attacks.inversion import _apply, train_decoder
from fedseg.attacks.report import figure_dir, table
from fedseg.attacks.scores import image_quality
from fedseg.attacks.server_view import AUGMENTED_COPIES, ServerView, _augmented, gather, map_keyed
from fedseg.evaluation import segmentation_metrics
from fedseg.models.autoencoder import Latents
from fedseg.training import nhwc

UNKEY_STEPS = 300


def _pixels(z: torch.Tensor) -> torch.Tensor:
    return z.permute(0, 2, 3, 1).reshape(-1, z.shape[1]).double()


def statistics(z: torch.Tensor) -> dict[str, Any]:  # tensors, and a None placeholder
    """Mean, covariance and per-position mean (layout) of one latent scale (N, C, h, w)."""
    p = _pixels(z)
    mean = p.mean(0)
    centred = p - mean
    return {
        "mean": mean,
        "cov": centred.T @ centred / len(p),
        "layout": z.double().mean(0).permute(1, 2, 0).reshape(-1, z.shape[1]) - mean,
        "skew": None,  # filled per axis by canonical_alignment
    }


def _fit_error(m: torch.Tensor, plain: dict, keyed: dict) -> float:
    """How badly ``keyed ~ M plain + b`` fits covariance and layout (relative, summed)."""
    cov = m @ plain["cov"] @ m.T
    layout = plain["layout"] @ m.T
    return float(
        (cov - keyed["cov"]).norm() / keyed["cov"].norm()
        + (layout - keyed["layout"]).norm() / keyed["layout"].norm()
    )


def canonical_alignment(plain: torch.Tensor, keyed: torch.Tensor) -> torch.Tensor:
    """Principal axes matched in order, each axis's sign by its skewness."""
    axes = []
    for z in (plain, keyed):
        p = _pixels(z)
        p = p - p.mean(0)
        _, vecs = torch.linalg.eigh(p.T @ p / len(p))
        vecs = vecs.flip(1)  # largest first
        skew = ((p @ vecs) ** 3).mean(0)
        axes.append(vecs * torch.sign(skew + 1e-12))
    return axes[1] @ axes[0].T


def procrustes_alignment(plain: dict, keyed: dict, steps: int = 200) -> torch.Tensor:
    """Orthogonal Procrustes on the layouts, then refined on layouts and covariances."""
    u, _, vh = torch.linalg.svd(keyed["layout"].T @ plain["layout"])
    m0 = u @ vh
    skew = torch.zeros_like(m0, requires_grad=True)
    opt = torch.optim.Adam([skew], lr=1e-2)
    best, best_err = m0, _fit_error(m0, plain, keyed)
    for _ in range(steps):
        m = m0 @ torch.linalg.matrix_exp(skew - skew.T)
        cov = m @ plain["cov"] @ m.T
        loss = ((cov - keyed["cov"]).norm() / keyed["cov"].norm()) ** 2 + (
            (plain["layout"] @ m.T - keyed["layout"]).norm() / keyed["layout"].norm()
        ) ** 2
        opt.zero_grad()
        loss.backward()
        opt.step()
        err = _fit_error(m.detach(), plain, keyed)
        if err < best_err:
            best, best_err = m.detach().clone(), err
    return best


def estimate_key(plain: Latents, keyed: Latents) -> tuple[list[tuple], dict[str, list[float]]]:
    """Per scale (M, b) with ``keyed ~ M plain + b``; and each method's statistics fit."""
    estimate = []
    fits: dict[str, list[float]] = {"canonical": [], "procrustes": []}
    for zp, zk in zip(plain, keyed, strict=True):
        sp, sk = statistics(zp), statistics(zk)
        candidates = {
            "canonical": canonical_alignment(zp, zk),
            "procrustes": procrustes_alignment(sp, sk),
        }
        for name, m in candidates.items():
            fits[name].append(_fit_error(m, sp, sk))
        name = min(candidates, key=lambda n: fits[n][-1])
        m = candidates[name]
        estimate.append((m, sk["mean"] - m @ sp["mean"], name))
    return estimate, fits


def unkey(keyed: Latents, estimate: list[tuple]) -> Latents:
    out = []
    for z, (m, b, _) in zip(keyed, estimate, strict=True):
        p = (_pixels(z) - b) @ m  # M^T (z - b) for each pixel
        out.append(p.float().reshape(z.shape[0], z.shape[2], z.shape[3], -1).permute(0, 3, 1, 2))
    return out


def unkeying_error(estimate_plain: Latents, true_plain: Latents) -> list[float]:
    """Per scale: ||estimate - truth|| / ||truth - its mean|| on the victim's test latents."""
    return [
        float((e - t).norm() / (t - t.mean(dim=(0, 2, 3), keepdim=True)).norm())
        for e, t in zip(estimate_plain, true_plain, strict=True)
    ]


def fit_mask_unkeying(
    mapped: Latents, local: list[torch.Tensor] | None, masks: torch.Tensor, decoder, seed: int
) -> list[torch.nn.Conv2d]:
    """Affine maps (1x1 convolutions) from keyed mask latents to what ``decoder`` expects,
    fitted on labelled auxiliary pairs through the frozen decoder."""
    torch.manual_seed(seed)
    maps = [torch.nn.Conv2d(z.shape[1], z.shape[1], 1) for z in mapped]
    params = [p for m in maps for p in m.parameters()]
    opt = torch.optim.Adam(params, lr=1e-2)
    loss_fn = DiceCELoss(softmax=True, to_onehot_y=True)
    decoder.eval()
    for p in decoder.parameters():
        p.requires_grad_(False)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(UNKEY_STEPS):
        idx = torch.randint(0, len(masks), (16,), generator=gen)
        z = [nhwc(m(s[idx])) for m, s in zip(maps, mapped, strict=True)]
        skips = [f[idx] for f in local] if local is not None else None
        loss = loss_fn(decoder(z, skips), masks[idx][:, None])
        opt.zero_grad()
        loss.backward()
        opt.step()
    for p in decoder.parameters():
        p.requires_grad_(True)
    return maps


@torch.no_grad()
def segment(decoder, maps, mapped: Latents, local: list[torch.Tensor] | None) -> torch.Tensor:
    z = [nhwc(m(s)) for m, s in zip(maps, mapped, strict=True)]
    return decoder(z, local).argmax(1)


def dice(pred: torch.Tensor, view: ServerView) -> float:
    return float(
        segmentation_metrics(pred.numpy(), view.test_masks.numpy(), view.class_names, None)[
            "dice_mean"
        ]
    )


def _local(decoder, encoder, images: torch.Tensor) -> list[torch.Tensor] | None:
    return encoder.local_features(nhwc(images)) if decoder.local_skips else None


def run(ctx: RunContext) -> tuple[dict, str]:
    a = ctx.cfg.attack
    view = gather(ctx)
    models = ctx.models[view.victim]  # = the averaged weights the server holds
    encoder, decoder = models.image_ae.encoder.eval(), models.mask_ae.decoder
    transform = ctx.transform(view.victim)
    aux_x, aux_y = _augmented(view.aux_images, view.aux_masks, AUGMENTED_COPIES, a.seed)
    with torch.no_grad():
        aux_plain = ctx.plain(view.victim, aux_x)
        test_plain = ctx.plain(view.victim, view.test_images)
    # (a) the key, from the victim's training-batch latents against the auxiliary images'
    estimate, fits = estimate_key(aux_plain, view.train_keyed)
    with torch.no_grad():
        test_est = unkey(view.test_keyed, estimate)
        test_true = transform.inverse(view.test_keyed, "image")
    key_error = unkeying_error(test_est, test_plain)
    key_error_true = unkeying_error(test_true, test_plain)  # the fp16 wire's floor
    # (c) inversion: a decoder from plain latents to images, trained on the auxiliary images
    inverter = train_decoder(ctx.cfg, aux_plain, aux_x, a.inversion_epochs, a.seed)
    recon = {"estimated key": _apply(inverter, test_est), "true key": _apply(inverter, test_true)}
    quality = {k: image_quality(v, view.test_images) for k, v in recon.items()}
    # (b) its own segmentation: UMN, an affine mask un-keying fitted on auxiliary pairs, the
    # decoder; local skips from its reconstruction (it never has the victim's image)
    aux_keyed_est = [
        (_pixels(z) @ m.T + b)
        .float()
        .reshape(z.shape[0], z.shape[2], z.shape[3], -1)
        .permute(0, 3, 1, 2)
        for z, (m, b, _) in zip(aux_plain, estimate, strict=True)
    ]
    with torch.no_grad():
        aux_local = _local(decoder, encoder, aux_x)
        aux_mapped = map_keyed(view.umn, view.victim, aux_keyed_est)
    maps = fit_mask_unkeying(aux_mapped, aux_local, aux_y, decoder, a.seed)
    with torch.no_grad():
        test_mapped = map_keyed(view.umn, view.victim, view.test_keyed)
        local_recon = _local(decoder, encoder, recon["estimated key"])
        local_true = _local(decoder, encoder, view.test_images)
        own = segment(decoder, maps, test_mapped, local_recon)
        own_true_local = segment(decoder, maps, test_mapped, local_true)
        site = decoder(
            [nhwc(z) for z in transform.inverse(test_mapped, "mask")], local_true
        ).argmax(1)
    dices = {
        "server (estimated keys, local skips from its reconstruction)": dice(own, view),
        "server, if it also had the victim's local skips": dice(own_true_local, view),
        "the victim itself (true key, its own image)": dice(site, view),
    }
    methods = [name for _, _, name in estimate]
    result = {
        "victim": view.victim,
        "auxiliary": view.aux_site,
        "server_holds_weights": view.holds_weights,
        "key_error": key_error,
        "key_error_true_key": key_error_true,
        "alignment": methods,
        "alignment_fit": fits,
        "reconstruction": quality,
        "dice": dices,
        "n_aux": len(view.aux_images),
        "n_test": len(view.test_images),
    }
    fig = reconstruction_grid(
        figure_dir(ctx.run) / "server-inversion.png",
        view.test_images[:6],
        {f"server, {k}": v[:6] for k, v in recon.items()},
        f"server-side inversion ({view.victim})",
    )
    held = (
        "holds the averaged encoder and mask decoder (finetune_share = 'average')"
        if view.holds_weights
        else f"does NOT hold them in this run (finetune_share = {view.share!r}): these figures "
        "are what it would get if it did"
    )
    rows = [
        ["key estimate: un-keying error per scale (estimate)", _fmt(key_error)],
        ["key estimate: the same with the true key (fp16 floor)", _fmt(key_error_true)],
        ["alignment used per scale", ", ".join(methods)],
        *[
            [f"reconstruction SSIM / PSNR, {k}", f"{q['ssim']:.3f} / {q['psnr']:.1f} dB"]
            for k, q in quality.items()
        ],
        *[[f"Dice: {k}", f"{v:.3f}"] for k, v in dices.items()],
    ]
    md = (
        "## Server-side inversion of split training\n\n"
        f"Victim {view.victim} ({len(view.test_images)} test images). The server {held}, its "
        f"UMN, the victim's keyed latents ({len(view.train_keyed[0])} augmented training "
        f"batches' items and its test queries), and {len(view.aux_images)} auxiliary images of "
        f"another site ({view.aux_site}, never the victim's; with masks for the mask "
        "un-keying only). It estimates the key by aligning latent statistics, segments the "
        "victim's test images itself, and inverts its un-keyed latents with a decoder "
        f"trained on the auxiliary images ({a.inversion_epochs} epochs).\n\n"
        + table(["", "value"], rows)
        + f"\n\n![server inversion]({fig.relative_to(ctx.run)})\n"
    )
    return result, md


def _fmt(values: list[float]) -> str:
    return " / ".join(f"{v:.3f}" for v in values)
