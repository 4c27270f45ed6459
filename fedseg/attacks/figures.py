"""Figures of the attack suite (matplotlib, Agg): reconstructions, curves, trade-off."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from fedseg.atomic import savefig_atomic  # noqa: E402


def reconstruction_grid(
    path: Path, truth: torch.Tensor, rows: dict[str, torch.Tensor], title: str
) -> Path:
    """First row: true images; then one row per reconstruction method."""
    labels = ["truth", *rows]
    images = [truth, *rows.values()]
    k = truth.shape[0]
    fig, axes = plt.subplots(len(images), k, figsize=(1.6 * k, 1.6 * len(images)), squeeze=False)
    for r, (label, imgs) in enumerate(zip(labels, images, strict=True)):
        for c in range(k):
            ax = axes[r][c]
            ref = truth[c, 0].numpy()
            ax.imshow(imgs[c, 0].numpy(), cmap="gray", vmin=ref.min(), vmax=ref.max())
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(label, fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return _save(fig, path)


def curves(
    path: Path,
    x: list,
    series: dict[str, list],
    xlabel: str,
    ylabel: str,
    title: str,
    logy: bool = False,
) -> Path:
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for label, ys in series.items():
        ax.plot(x, ys, marker="o", label=label)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if logy:
        ax.set_yscale("log")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return _save(fig, path)


def roc(path: Path, items: dict[str, tuple[np.ndarray, np.ndarray]], title: str) -> Path:
    fig, ax = plt.subplots(figsize=(4, 4))
    for label, (scores, labels) in items.items():
        order = np.argsort(-scores)
        lab = labels[order]
        tpr = np.concatenate([[0], np.cumsum(lab) / max(lab.sum(), 1)])
        fpr = np.concatenate([[0], np.cumsum(1 - lab) / max((1 - lab).sum(), 1)])
        ax.plot(fpr, tpr, label=label)
    ax.plot([0, 1], [0, 1], "k--", lw=0.8)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return _save(fig, path)


def tradeoff(path: Path, points: dict[str, dict[str, tuple[float, float]]], title: str) -> Path:
    """One panel per attack: x = attack success, y = Dice, one labelled point per mode."""
    attacks = list(points)
    fig, axes = plt.subplots(1, len(attacks), figsize=(3.2 * len(attacks), 3.2), squeeze=False)
    for ax, attack in zip(axes[0], attacks, strict=True):
        for mode, (success, dice) in points[attack].items():
            ax.scatter([success], [dice])
            ax.annotate(
                mode, (success, dice), fontsize=8, xytext=(4, 4), textcoords="offset points"
            )
        ax.set_xlabel(attack, fontsize=8)
        ax.set_ylabel("mean foreground Dice")
        ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return _save(fig, path)


def _save(fig, path: Path) -> Path:
    try:
        return savefig_atomic(fig, path, dpi=110)  # 0644, whole or not at all
    finally:
        plt.close(fig)
