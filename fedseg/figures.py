"""A run's figures: per-site Dice bars, data statistics, and overlays of test images (drawn
by each site from its own images, which never travel). Best effort: a figure that fails is
logged and left out, never costing the run its numbers."""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import to_rgb
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from fedseg import report_sites
from fedseg.atomic import savefig_atomic
from fedseg.evaluation import dice_per_image
from fedseg.results import DEFAULT_METHOD, all_sites, baseline_label, baselines_of, mean_of

log = logging.getLogger(__name__)
CLASS_COLOURS = ["#e6194b", "#3cb44b", "#4363d8", "#ffe119", "#f58231", "#911eb4", "#42d4f4"]


@dataclass
class Examples:
    """A few test images of one site, with truth and prediction, for overlay figures."""

    images: np.ndarray  # (k, H, W) float, or (k, C, H, W) with C = 1 or 3 (colour)
    truth: np.ndarray  # (k, H, W) int
    pred: np.ndarray  # (k, H, W) int


def write_overlays(
    out_dir: Path,
    site: str,
    examples: Examples,
    class_names: list[str],
    baseline_examples: dict[str, Examples] | None = None,
    method: str = DEFAULT_METHOD,
) -> Path | None:
    """One site's overlay figure, drawn where the site runs (its images never travel)."""
    fig_dir = Path(out_dir) / "figures"
    fig_dir.mkdir(parents=True, exist_ok=True)
    path = fig_dir / f"overlays_{_safe_name(site)}.png"
    extra = _baseline_columns(
        site, examples, {k: {site: ex} for k, ex in (baseline_examples or {}).items()}
    )
    return path if _try(_overlay_figure, path, site, examples, extra, class_names, method) else None


def write_figures(
    fig_dir: Path,
    metrics: dict[str, Any],
    examples: dict[str, Examples],
    baseline_examples: dict[str, dict[str, Examples]],
) -> list[tuple[str, str]]:
    """Draw every figure, logging (not raising) failures; return the ones written."""
    fig_dir.mkdir(parents=True, exist_ok=True)
    method = metrics.get("method") or DEFAULT_METHOD
    done: list[tuple[str, str]] = []
    if metrics.get("sites"):
        path = fig_dir / "site_dice.png"
        if _try(_site_dice_figure, path, metrics, method):
            done.append(("Mean foreground Dice per site", f"figures/{path.name}"))
    if metrics.get("data_stats") and _try(report_sites.figure, fig_dir / "data_stats.png", metrics):
        done.append(("Data per site (class fractions, intensities)", "figures/data_stats.png"))
    for site, ex in examples.items():
        path = fig_dir / f"overlays_{_safe_name(site)}.png"
        extra = _baseline_columns(site, ex, baseline_examples)
        names = _legend_names(metrics, site)
        if _try(_overlay_figure, path, site, ex, extra, names, method):
            done.append((f"Example overlays: {site}", f"figures/{path.name}"))
    return done


def _try(draw: Any, path: Path, *args: Any) -> bool:
    try:
        draw(path, *args)
        return True
    except Exception:  # a figure must never cost the run its results
        log.warning("could not draw %s", path, exc_info=True)
        return False


def _safe_name(site: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", site) or "site"


def _baseline_columns(
    site: str, ex: Examples, baseline_examples: dict[str, dict[str, Examples]]
) -> list[tuple[str, np.ndarray]]:
    """(label, pred) for baselines with predictions of the same images."""
    columns = []
    for key, per_site in baseline_examples.items():
        other = (per_site or {}).get(site)
        if other is None:
            continue
        if np.shape(other.pred) != np.shape(ex.truth):
            log.warning("baseline %s examples of %s do not match; skipped", key, site)
            continue
        columns.append((baseline_label(key), np.asarray(other.pred)))
    return columns


def _legend_names(metrics: dict[str, Any], site: str) -> list[str]:
    """Class names, background first: from the site's metrics, else the config."""
    dice = ((metrics.get("sites") or {}).get(site) or {}).get("dice") or {}
    if dice:
        return ["background", *dice]
    return list(((metrics.get("config") or {}).get("data") or {}).get("class_names") or [])


def _new_figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)  # explicit Agg: no pyplot, no global backend, safe in workers
    return fig


def _overlay_figure(
    path: Path,
    site: str,
    ex: Examples,
    extra: list[tuple[str, np.ndarray]],
    names: list[str],
    method: str,
) -> None:
    images, truth, pred = _example_arrays(ex)
    num_classes = int(max(len(names), truth.max() + 1, pred.max() + 1, 2))
    columns = [("Image", None), ("Ground truth", truth), (method, pred), *extra]
    k, ncols = len(images), len(columns)
    fig = _new_figure(2.4 * ncols, 2.4 * k + 0.9)
    axes = fig.subplots(k, ncols, squeeze=False)
    for col, (title, labels) in enumerate(columns):
        scores = None if labels is None or col == 1 else dice_per_image(labels, truth, num_classes)
        for row in range(k):
            _draw_panel(axes[row][col], images[row], None if labels is None else labels[row])
            if scores is not None:
                _corner_text(axes[row][col], f"Dice {scores[row]:.2f}")
        axes[0][col].set_title(title, fontsize=9)
    fig.suptitle(f"{site}: example test images", fontsize=11)
    handles = _legend_handles(names, num_classes)
    fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 6), frameon=False)
    fig.tight_layout(rect=(0, 0.06, 1, 0.97))
    savefig_atomic(fig, path)


def _example_arrays(ex: Examples) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    images = np.asarray(ex.images, dtype=np.float64)
    if images.ndim == 4 and images.shape[1] == 1:  # (k, 1, H, W) straight from a loader
        images = images[:, 0]
    if images.ndim == 4 and images.shape[1] == 3:  # colour: (k, H, W, 3) for imshow
        images = np.moveaxis(images, 1, -1)
    truth, pred = np.asarray(ex.truth), np.asarray(ex.pred)
    if images.ndim not in (3, 4) or truth.shape != images.shape[:3] or pred.shape != truth.shape:
        raise ValueError(
            f"examples: images {images.shape}, truth {truth.shape}, pred {pred.shape} differ"
        )
    if len(images) == 0:
        raise ValueError("examples: no images")
    return images, truth.astype(np.int64), pred.astype(np.int64)


def _draw_panel(ax: Any, image: np.ndarray, labels: np.ndarray | None) -> None:
    """A grey (H, W) or colour (H, W, 3) image, contrast-stretched to its 1-99th percentiles
    (over all channels, so colours keep their balance), under the labels."""
    lo, hi = np.nanpercentile(image, [1, 99]) if np.isfinite(image).any() else (0.0, 1.0)
    hi = hi if hi > lo else lo + 1
    if image.ndim == 3:
        ax.imshow(np.clip((np.nan_to_num(image, nan=lo) - lo) / (hi - lo), 0, 1))
    else:
        ax.imshow(image, cmap="gray", vmin=lo, vmax=hi)
    if labels is not None:
        ax.imshow(_rgba(labels), interpolation="nearest")
    ax.set_axis_off()


def _rgba(labels: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    out = np.zeros((*labels.shape, 4))
    for c in np.unique(labels):
        if c > 0:
            out[labels == c] = (*to_rgb(_colour(int(c))), alpha)
    return out


def _colour(class_index: int) -> str:
    return CLASS_COLOURS[(class_index - 1) % len(CLASS_COLOURS)]


def _legend_handles(names: list[str], num_classes: int) -> list[Patch]:
    labels = [names[c] if c < len(names) else f"class {c}" for c in range(num_classes)]
    return [Patch(color=_colour(c), label=labels[c]) for c in range(1, num_classes)]


def _corner_text(ax: Any, text: str) -> None:
    box = {"facecolor": "black", "alpha": 0.5, "pad": 1}
    ax.text(0.02, 0.02, text, transform=ax.transAxes, fontsize=7, color="white", bbox=box)


def _site_dice_figure(path: Path, metrics: dict[str, Any], method: str) -> None:
    blocks = [(method, metrics)] + [(baseline_label(k), b) for k, b in baselines_of(metrics)]
    sites = all_sites(blocks)
    groups = [*sites, "mean"]
    fig = _new_figure(max(5.0, 1.0 + len(groups) * (0.5 + 0.45 * len(blocks))), 4.0)
    ax = fig.subplots()
    width = 0.8 / len(blocks)
    for i, (label, block) in enumerate(blocks):
        values = [((block.get("sites") or {}).get(s) or {}).get("dice_mean") for s in sites]
        values.append(mean_of(block).get("dice"))
        x = np.arange(len(groups)) + (i - (len(blocks) - 1) / 2) * width
        _annotated_bars(ax, x, values, width, label, f"C{i}")
    ax.set_xticks(np.arange(len(groups)), groups, rotation=20 if len(groups) > 6 else 0)
    ax.set_ylim(0, 1.2)  # headroom for the legend above Dice ~1 bars
    ax.set_ylabel("mean foreground Dice")
    ax.set_title("Mean foreground Dice per site")
    ax.legend(fontsize=8, loc="upper center", ncol=len(blocks), frameon=False)
    fig.tight_layout()
    savefig_atomic(fig, path)


def _annotated_bars(
    ax: Any, x: np.ndarray, values: list[Any], width: float, label: str, colour: str
) -> None:
    heights = [np.nan if v is None else float(v) for v in values]
    ax.bar(x, np.nan_to_num(heights), width, label=label, color=colour)
    for xi, h in zip(x, heights, strict=True):
        text = "n/a" if np.isnan(h) else f"{h:.2f}"
        ax.text(xi, (0 if np.isnan(h) else h) + 0.01, text, ha="center", va="bottom", fontsize=7)
