"""Patient re-identification from what is shared: can an attacker link two records to one patient?

Data: a volume data set (hippocampus), where all slices of one volume are one patient. Patients
(all sites, training and test splits) are split in half, per site: the attacker trains a small
contrastive embedding network on one half's records with their patient labels and is scored on
the other half's patients, which it never saw. Records, per representation:

- raw images; plain latents (the site's encoder, no transform); KLT latents; KNT latents (each
  site's key; fp16 as on the wire). All four come from the same run's autoencoders, so only the
  representation differs.

A second attacker standardises each site's records per channel (mean and spread over that
site's records and pixels; the server knows which site sent what) before training: this
removes any per-site affine offset and scale, so whatever reduction survives it does not come
from each site merely sitting somewhere else in latent space. Its representations are named
``<rep>+std`` (``none+std``, ``klt+std``, ``knt+std``) and their reductions are relative to
``none+std``.

Scoring (within one site, since different keys would otherwise make "different site" an easy
tell): verification AUC of the cosine similarity over slice pairs, positives being two slices of
one patient at least ``GAP`` slices apart (adjacent slices are near-duplicates, not a re-
identification); top-1/top-5: whether a slice's nearest neighbours (same exclusion) include its
patient. The reduction of above-chance AUC, ``1 - (AUC_x - 0.5) / (AUC_ref - 0.5)``, is the
measure the KNT paper reports.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from fedseg.attacks.context import MODES, RunContext
from fedseg.attacks.figures import roc
from fedseg.attacks.report import figure_dir, table
from fedseg.attacks.scores import auc

GAP = 3  # slices of one patient closer than this are not scored as a re-identification
STANDARDISED = "+std"  # suffix: the attacker standardises each site's records per channel
REPRESENTATIONS = ("raw", *MODES, *(m + STANDARDISED for m in MODES))  # "none" = plain latents


def _slice_index(name: str) -> int:
    return int(name.rsplit("#", 1)[1]) if "#" in name else 0


def _as_grid(latents: list[torch.Tensor]) -> torch.Tensor:
    """Three scales on the finest grid: (N, 3C, h, w)."""
    size = latents[0].shape[-2:]
    return torch.cat([F.interpolate(z, size=size, mode="nearest") for z in latents], 1)


class Embedder(nn.Module):
    def __init__(self, in_channels: int, image: bool, dim: int = 64) -> None:
        super().__init__()
        stem: list[nn.Module] = []
        if image:  # 8x down to the latent grid
            for c_in, c_out in ((in_channels, 16), (16, 32), (32, 64)):
                stem += [nn.Conv2d(c_in, c_out, 3, 2, 1), nn.GroupNorm(8, c_out), nn.ReLU()]
            in_channels = 64
        self.body = nn.Sequential(
            *stem,
            nn.Conv2d(in_channels, 64, 3, padding=1),
            nn.GroupNorm(8, 64),
            nn.ReLU(),
            nn.Conv2d(64, 64, 3, 2, 1),
            nn.GroupNorm(8, 64),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(4),
            nn.Flatten(),
            nn.Linear(1024, 128),
            nn.ReLU(),
            nn.Linear(128, dim),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.body(x), dim=1)


def supcon(emb: torch.Tensor, labels: torch.Tensor, temperature: float = 0.1) -> torch.Tensor:
    """Supervised contrastive loss (Khosla et al. 2020)."""
    sim = emb @ emb.T / temperature
    eye = torch.eye(len(emb), dtype=torch.bool)
    sim = sim.masked_fill(eye, -1e9)
    pos = (labels[:, None] == labels[None, :]) & ~eye
    log_prob = sim - torch.logsumexp(sim, 1, keepdim=True)
    return -(log_prob * pos).sum(1).div(pos.sum(1).clamp_min(1)).mean()


def train_embedder(
    x: torch.Tensor, patients: np.ndarray, image: bool, epochs: int, seed: int
) -> Embedder:
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    net = Embedder(x.shape[1], image)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3, weight_decay=1e-4)
    ids = np.unique(patients)
    by_patient = {p: np.flatnonzero(patients == p) for p in ids}
    steps_per_epoch = max(1, len(x) // 64)
    net.train()
    for _ in range(epochs):
        for _ in range(steps_per_epoch):
            chosen = rng.choice(ids, min(16, len(ids)), replace=False)
            idx = np.concatenate([rng.choice(by_patient[p], 4) for p in chosen])
            labels = torch.from_numpy(np.repeat(np.arange(len(chosen)), 4))
            loss = supcon(net(x[idx]), labels)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return net.eval()


def score(emb: np.ndarray, patients: np.ndarray, slices: np.ndarray, sites: np.ndarray) -> dict:
    """Verification AUC and top-1/top-5 within sites (see the module docstring)."""
    all_scores, all_labels, top1, top5 = [], [], [], []
    for site in np.unique(sites):
        sel = np.flatnonzero(sites == site)
        e, p, s = emb[sel], patients[sel], slices[sel]
        sim = e @ e.T
        same = p[:, None] == p[None, :]
        near = same & (np.abs(s[:, None] - s[None, :]) < GAP)  # includes the diagonal
        iu = np.triu_indices(len(sel), 1)
        keep = ~near[iu]
        all_scores.append(sim[iu][keep])
        all_labels.append(same[iu][keep].astype(int))
        ranked = np.where(near, -np.inf, sim)
        order = np.argsort(-ranked, 1)[:, :5]
        hits = same[np.arange(len(sel))[:, None], order]
        has_pos = (same & ~near).any(1)
        top1 += list(hits[has_pos, 0])
        top5 += list(hits[has_pos].any(1))
    scores, labels = np.concatenate(all_scores), np.concatenate(all_labels)
    return {
        "auc": auc(scores, labels),
        "top1": float(np.mean(top1)),
        "top5": float(np.mean(top5)),
        "n_pairs": int(len(labels)),
        "_curve": (scores, labels),
    }


def _records(ctx: RunContext, rep: str) -> torch.Tensor:
    if rep.endswith(STANDARDISED):
        return _standardise_per_site(ctx, _records(ctx, rep.removesuffix(STANDARDISED)))
    parts = []
    for split in ctx.sites:
        for data in (split.train, split.test):
            images = torch.from_numpy(data.images)
            if rep == "raw":
                parts.append(images)
                continue
            latents = ctx.plain(split.name, images)
            if rep != "none":
                latents = ctx.shared(split.name, latents, rep)
            parts.append(_as_grid(latents))
    return torch.cat(parts)


def _standardise_per_site(ctx: RunContext, x: torch.Tensor) -> torch.Tensor:
    """Each site's records (in ``_records`` order) to zero mean, unit spread per channel."""
    out, start = x.clone(), 0
    for split in ctx.sites:
        n = len(split.train) + len(split.test)
        part = x[start : start + n]
        mean = part.mean((0, 2, 3), keepdim=True)
        spread = part.std((0, 2, 3), keepdim=True).clamp_min(1e-6)
        out[start : start + n] = (part - mean) / spread
        start += n
    return out


def _split(patients: np.ndarray, sites: np.ndarray, seed: int) -> np.ndarray:
    """True for records of the attacker's (training) patients: half of each site's patients."""
    rng = np.random.default_rng(seed)
    attacker = np.zeros(len(patients), bool)
    for i in np.unique(sites):
        ids = np.unique(patients[sites == i])
        attacker |= np.isin(patients, rng.permutation(ids)[: len(ids) // 2])
    return attacker


def run(ctx: RunContext, representations: tuple[str, ...] = REPRESENTATIONS) -> tuple[dict, str]:
    """``attack.reid_repeats`` repeats, each with its own patient split and seed; reported as
    mean and standard deviation over repeats (the spread a single split hides)."""
    a = ctx.cfg.attack
    patient_ids: list[str] = []
    slice_ids: list[int] = []
    site_ids: list[int] = []
    for i, split in enumerate(ctx.sites):
        for data in (split.train, split.test):
            patient_ids += [f"{split.name}/{g}" for g in data.groups]
            slice_ids += [_slice_index(n) for n in data.names]
            site_ids += [i] * len(data)
    patients, slices, sites = np.array(patient_ids), np.array(slice_ids), np.array(site_ids)
    _, per_patient = np.unique(patients, return_counts=True)
    n_patients = len(per_patient)
    if n_patients < 8 or np.median(per_patient) < 3:
        raise ValueError(
            f"re-identification needs patients with several records each; {ctx.cfg.name} has "
            f"{n_patients} patients with a median of {np.median(per_patient):.0f} record(s) "
            "(use a volume data set such as hippocampus)"
        )
    runs: dict[str, list[dict]] = {rep: [] for rep in representations}
    curves = {}
    records = {rep: _records(ctx, rep) for rep in representations}
    repeats = max(1, a.reid_repeats)
    for r in range(repeats):
        attacker = _split(patients, sites, a.seed + r)
        for rep in representations:
            x = records[rep]
            net = train_embedder(
                x[attacker], patients[attacker], rep == "raw", a.reid_epochs, a.seed + r
            )
            with torch.no_grad():
                emb = net(x[~attacker]).numpy()
            one = score(emb, patients[~attacker], slices[~attacker], sites[~attacker])
            curve = one.pop("_curve")
            if r == 0:
                curves[_label(rep)] = curve
            runs[rep].append(one)
    result: dict = {}
    for rep in representations:
        result[rep] = {
            key: float(np.mean([one[key] for one in runs[rep]])) for key in ("auc", "top1", "top5")
        }
        result[rep]["auc_std"] = float(np.std([one["auc"] for one in runs[rep]]))
        result[rep]["auc_per_repeat"] = [one["auc"] for one in runs[rep]]
    rows = []
    for rep in representations:
        r = result[rep]
        row = [_label(rep), f"{r['auc']:.3f} ± {r['auc_std']:.3f}", r["top1"], r["top5"]]
        plain = "none" + STANDARDISED if rep.endswith(STANDARDISED) else "none"
        for ref in ("raw", plain):
            if ref in result and rep != ref and result[ref]["auc"] > 0.5:
                red = 1 - (r["auc"] - 0.5) / (result[ref]["auc"] - 0.5)
                per = [
                    1 - (x - 0.5) / (y - 0.5)
                    for x, y in zip(r["auc_per_repeat"], result[ref]["auc_per_repeat"], strict=True)
                ]
                key = "raw" if ref == "raw" else "none"  # "vs plain" for both attackers
                r[f"reduction_vs_{key}"] = red
                r[f"reduction_vs_{key}_per_repeat"] = per
                row.append(f"{100 * red:.0f}% ({', '.join(f'{100 * p:.0f}' for p in per)})")
            else:
                row.append("-")
        rows.append(row)
    attacker = _split(patients, sites, a.seed)
    result["n_train_patients"] = int(len(np.unique(patients[attacker])))
    result["n_test_patients"] = int(len(np.unique(patients[~attacker])))
    result["repeats"] = repeats
    fig = roc(figure_dir(ctx.run) / "reid_roc.png", curves, "patient verification (repeat 1)")
    md = (
        "## Patient re-identification\n\n"
        f"Contrastive embedding network ({a.reid_epochs} epochs) trained on "
        f"{result['n_train_patients']} patients' records, scored on {result['n_test_patients']} "
        f"unseen patients within each site; positives are slices of one patient at least {GAP} "
        f"apart. Mean ± s.d. over {repeats} repeats (patient split and seed each). Reduction = "
        "share of above-chance AUC removed (of the mean AUCs; per repeat in brackets), relative "
        "to raw images and to plain latents (for the attacker who standardises each site's "
        "records, relative to plain latents standardised the same way).\n\n"
        + table(
            ["shared", "verification AUC", "top-1", "top-5", "reduction vs raw", "vs plain"], rows
        )
        + f"\n\n![re-identification ROC]({fig.relative_to(ctx.run)})\n"
    )
    return result, md


def _label(rep: str) -> str:
    base = rep.removesuffix(STANDARDISED)
    name = {"raw": "raw images", "none": "plain latents", "klt": "KLT latents"}.get(
        base, "KNT latents"
    )
    return name + (", standardised per site" if rep != base else "")
