"""Non-IID statistics of one hospital, computed on the site: only aggregates leave it.

Sample counts, the fraction of pixels in each class, and a coarse histogram of normalised
intensities (a shape summary of the whole set, no single image can be read back from it).
"""

from __future__ import annotations

import numpy as np

from fedseg.data.dataset import SiteData

HIST_RANGE = (-4.0, 4.0)  # intensities are normalised per image (plus the profile's shift)
HIST_BINS = 32


def site_statistics(train: SiteData, test: SiteData) -> dict:
    """Aggregate statistics of a site's training set (and its sizes)."""
    counts = np.bincount(train.masks.reshape(-1), minlength=train.num_classes)
    total = max(int(counts.sum()), 1)
    hist, _ = np.histogram(train.images, bins=HIST_BINS, range=HIST_RANGE)
    return {
        "n_train": len(train),
        "n_test": len(test),
        "patients": len(set(train.groups.tolist())),
        "class_names": list(train.class_names),
        "class_fraction": {
            name: float(counts[i]) / total for i, name in enumerate(train.class_names)
        },
        "intensity_mean": float(train.images.mean()) if len(train) else 0.0,
        "intensity_std": float(train.images.std()) if len(train) else 0.0,
        "intensity_hist": (hist / max(int(hist.sum()), 1)).round(5).tolist(),
        "hist_range": list(HIST_RANGE),
    }
