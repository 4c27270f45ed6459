"""Scores shared by the attacks: image similarity (MONAI), ROC AUC with a bootstrap interval."""

from __future__ import annotations

from typing import SupportsFloat, cast

import numpy as np
import torch
from monai.metrics import PSNRMetric, SSIMMetric, compute_roc_auc


def to_unit(x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Scale ``x`` to [0, 1] with ``ref``'s per-image min and max (clipped): images are stored
    z-scored per image, and SSIM/PSNR need a fixed data range."""
    lo = ref.amin(dim=(1, 2, 3), keepdim=True)
    hi = ref.amax(dim=(1, 2, 3), keepdim=True)
    return ((x - lo) / (hi - lo).clamp_min(1e-6)).clamp(0, 1)


def image_quality(recon: torch.Tensor, truth: torch.Tensor) -> dict[str, float]:
    """Mean SSIM and PSNR (dB) of reconstructions against the true images, both in [0, 1]."""
    r, t = to_unit(recon.float(), truth.float()), to_unit(truth.float(), truth.float())
    # MONAI's metrics return a tensor for tensor inputs (typed as tensor or sequence)
    ssim = cast(torch.Tensor, SSIMMetric(spatial_dims=2, data_range=1.0)(r, t))
    psnr = cast(torch.Tensor, PSNRMetric(max_val=1.0)(r, t))
    return {"ssim": float(ssim.mean()), "psnr": float(psnr.mean())}


def auc(scores: np.ndarray, labels: np.ndarray) -> float:
    # a scalar (default macro average), though typed as any array-like
    return float(
        cast(
            SupportsFloat,
            compute_roc_auc(torch.as_tensor(scores, dtype=torch.float64), torch.as_tensor(labels)),
        )
    )


def auc_with_ci(
    scores: np.ndarray,
    labels: np.ndarray,
    n_boot: int = 1000,
    seed: int = 0,
    level: float = 0.95,
    groups: np.ndarray | None = None,
) -> dict[str, float]:
    """AUC and a percentile bootstrap interval. Positives and negatives are resampled
    separately (every resample has both); with ``groups`` (patients) whole groups are resampled,
    since records of one patient are not independent."""
    scores, labels = np.asarray(scores, float), np.asarray(labels, int)
    groups = np.arange(len(scores)) if groups is None else np.asarray(groups)
    pos, neg = labels == 1, labels == 0
    if not pos.any() or not neg.any():
        raise ValueError("AUC needs both positives and negatives")
    rng = np.random.default_rng(seed)
    members = {}
    for side in (pos, neg):
        ids, inverse = np.unique(groups[side], return_inverse=True)
        members[side.tobytes()] = (scores[side], inverse, len(ids))

    def resample(side: np.ndarray) -> np.ndarray:
        values, inverse, n = members[side.tobytes()]
        if n == len(values):  # one record per group: plain bootstrap
            return rng.choice(values, len(values))
        chosen = np.bincount(rng.integers(0, n, n), minlength=n)
        return np.repeat(values, chosen[inverse])

    boots = [_auc_fast(resample(pos), resample(neg)) for _ in range(n_boot)]
    lo, hi = np.quantile(boots, [(1 - level) / 2, (1 + level) / 2])
    return {
        "auc": auc(scores, labels),
        "ci_low": float(lo),
        "ci_high": float(hi),
        "n_pos": int(pos.sum()),
        "n_neg": int(neg.sum()),
        "n_groups": int(len(np.unique(groups))),
    }


def _auc_fast(pos: np.ndarray, neg: np.ndarray) -> float:
    """Mann-Whitney AUC (ties count half), for the bootstrap loop."""
    allv = np.concatenate([pos, neg])
    order = allv.argsort(kind="mergesort")
    ranks = np.empty(len(allv))
    ranks[order] = np.arange(1, len(allv) + 1)
    # average ranks over ties
    _, inv, counts = np.unique(allv, return_inverse=True, return_counts=True)
    sums = np.bincount(inv, ranks)
    ranks = sums[inv] / counts[inv]
    return float((ranks[: len(pos)].sum() - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg)))
