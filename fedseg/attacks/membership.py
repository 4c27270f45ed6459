"""Membership inference on the UMN: was this image in some site's training data?

Attacker: the server (it holds the UMN). For a candidate record it has the shared (keyed, fp16)
image and mask latents a site would send for it. Members: each site's training images (the
un-augmented originals of the stream the UMN was trained on). Non-members: each site's test
images, which no model ever trained on (the autoencoders train on the training split only, the
UMN on its latents). Two attacks:

- loss threshold: lower mapping loss (the UMN's own training loss, summed over scales) means
  member;
- trained attack model: logistic regression on per-scale log losses and relative errors, trained
  on the other sites' members/non-members (shadow data) and scored on the held-out site, so no
  record is scored by a model that saw its label.

AUC over all sites' records pooled, with a percentile bootstrap interval.
"""

from __future__ import annotations

import numpy as np
import torch

from fedseg.attacks.context import RunContext
from fedseg.attacks.figures import roc
from fedseg.attacks.report import figure_dir, table
from fedseg.attacks.scores import auc_with_ci
from fedseg.models.autoencoder import Latents
from fedseg.training import one_hot


@torch.no_grad()
def features(ctx: RunContext, umn, site: str, images: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """(N, 6): per-scale log MSE and log relative error of the UMN's mapping, as the server
    computes them on what it receives."""
    if len(images) == 0:
        return np.zeros((0, 6))
    num_classes = ctx.sites[0].train.num_classes
    image = ctx.shared(site, ctx.plain(site, images), role="image")
    mask = ctx.shared(
        site, ctx.plain(site, one_hot(torch.from_numpy(masks), num_classes), "mask"), role="mask"
    )
    if ctx.cfg.privacy.custody == "server" and ctx.mode != "none":
        image = ctx.transform(site).inverse(image, "image")
        mask = ctx.transform(site).inverse(mask, "mask")
    pred = _map(umn, site, image)
    cols = []
    for p, t in zip(pred, mask, strict=True):
        mse = ((p - t) ** 2).mean(dim=(1, 2, 3))
        energy = ((t - t.mean(dim=(2, 3), keepdim=True)) ** 2).mean(dim=(1, 2, 3))
        cols += [torch.log(mse + 1e-12), torch.log(mse / (energy + 1e-12) + 1e-12)]
    return torch.stack(cols, 1).numpy()


def _map(umn, site: str, latents: Latents) -> Latents:
    index = umn.site_index(site)
    n = len(latents[0])
    parts = [umn([z[i : i + 64] for z in latents], index) for i in range(0, n, 64)]
    return [torch.cat(s) for s in zip(*parts, strict=True)]


def logistic(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray) -> np.ndarray:
    """L2-regularised logistic regression (LBFGS), standardised on the training fold."""
    mu, sd = train_x.mean(0), train_x.std(0) + 1e-9
    x = torch.tensor((train_x - mu) / sd, dtype=torch.float64)
    y = torch.tensor(train_y, dtype=torch.float64)
    w = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros((), dtype=torch.float64, requires_grad=True)
    pos = y.mean().clamp(1e-3, 1 - 1e-3)
    weight = torch.where(y > 0, 0.5 / pos, 0.5 / (1 - pos))  # balance members/non-members
    opt = torch.optim.LBFGS([w, b], max_iter=200)

    def closure():
        opt.zero_grad()
        logits = x @ w + b
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, y, weight=weight)
        loss = loss + 1e-2 * (w**2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        return (torch.tensor((test_x - mu) / sd, dtype=torch.float64) @ w + b).numpy()


def run(ctx: RunContext) -> tuple[dict, str]:
    umn = ctx.umn()
    feats, labels, site_ids, patients = [], [], [], []
    for i, split in enumerate(ctx.sites):
        for data, label in ((split.train, 1), (split.test, 0)):
            f = features(ctx, umn, split.name, data.images, data.masks)
            feats.append(f)
            labels.append(np.full(len(f), label))
            site_ids.append(np.full(len(f), i))
            patients.append(np.array([f"{split.name}/{g}" for g in data.groups]))
    x, y, sid = np.concatenate(feats), np.concatenate(labels), np.concatenate(site_ids)
    groups = np.concatenate(patients)
    total_loss = np.log(np.exp(x[:, 0::2]).sum(1))
    n_boot = ctx.cfg.attack.bootstrap
    threshold = auc_with_ci(-total_loss, y, n_boot, ctx.cfg.attack.seed, groups=groups)
    model_scores = np.zeros(len(y))
    for i in range(len(ctx.sites)):
        held = sid == i
        others = ~held
        if len(set(y[others])) < 2:
            model_scores[held] = -total_loss[held]
            continue
        model_scores[held] = logistic(x[others], y[others], x[held])
    trained = auc_with_ci(model_scores, y, n_boot, ctx.cfg.attack.seed, groups=groups)
    result = {
        "mode": ctx.mode,
        "custody": ctx.cfg.privacy.custody,
        "loss_threshold": threshold,
        "trained_model": trained,
    }
    fig = roc(
        figure_dir(ctx.run) / "membership_roc.png",
        {"loss threshold": (-total_loss, y), "trained attack model": (model_scores, y)},
        f"membership inference on the UMN ({ctx.mode}, {ctx.cfg.privacy.custody} custody)",
    )
    rows = [
        [name, r["auc"], f"[{r['ci_low']:.3f}, {r['ci_high']:.3f}]", r["n_pos"], r["n_neg"]]
        for name, r in (("loss threshold", threshold), ("trained attack model", trained))
    ]
    md = (
        "## Membership inference on the UMN\n\n"
        f"Mode {ctx.mode}, {ctx.cfg.privacy.custody} custody. Members: every site's training "
        "images; non-members: every site's test images (never in any training). The trained "
        "attack model is fit on the other sites and scored on the held-out site. AUC 0.5 = "
        f"chance; 95% bootstrap interval ({n_boot} resamples of whole patients: "
        f"{threshold['n_groups']} patients).\n\n"
        + table(["attack", "AUC", "95% CI", "members", "non-members"], rows)
        + f"\n\n![membership ROC]({fig.relative_to(ctx.run)})\n"
    )
    return result, md
