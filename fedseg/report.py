"""A run's results folder: ``metrics.json``, ``report.md`` and ``figures/``.

``metrics.json`` is the record of a run and is written first (atomically), so a failing figure
or a crash half-way never loses or corrupts the numbers. Figures are best effort: a failure is
logged and the report simply leaves that figure out.
"""

from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import asdict, dataclass, is_dataclass
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import to_rgb
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from fedseg import report_sites
from fedseg.atomic import write_text_atomic
from fedseg.evaluation import dice_per_image, mean_over_sites

log = logging.getLogger(__name__)

DEFAULT_METHOD = "fedseg"  # a metrics.json without a method (config.method_name names it)
BASELINE_LABELS = {"centralized_unet": "centralized UNet", "local_unet": "local UNets"}
CLASS_COLOURS = ["#e6194b", "#3cb44b", "#4363d8", "#ffe119", "#f58231", "#911eb4", "#42d4f4"]
_KNOWN_KEYS = {"config", "method", "sites", "mean", "baselines", "timing_s", "bytes_per_query"}
_KNOWN_KEYS |= report_sites.KEYS  # rendered by fedseg.report_sites


@dataclass
class Examples:
    """A few test images of one site, with truth and prediction, for overlay figures."""

    images: np.ndarray  # (k, H, W) float
    truth: np.ndarray  # (k, H, W) int
    pred: np.ndarray  # (k, H, W) int


def write_results(
    out_dir: Path,
    metrics: dict[str, Any],
    examples: dict[str, Examples] | None = None,
    baseline_examples: dict[str, dict[str, Examples]] | None = None,
) -> Path:
    """Write metrics.json, then figures/, then report.md; return ``out_dir``.

    ``examples`` maps site -> PPCMI-SF examples; ``baseline_examples`` maps baseline name
    (as in ``metrics["baselines"]``) -> site -> examples of the same images, whose ``pred``
    becomes an extra overlay column.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    clean = to_jsonable(metrics)
    write_text_atomic(out_dir / "metrics.json", json.dumps(clean, indent=2, allow_nan=False) + "\n")
    figures = _write_figures(out_dir / "figures", clean, examples or {}, baseline_examples or {})
    drawn = {link for _, link in figures}
    for path in sorted((out_dir / "figures").glob("overlays_*.png")):  # drawn by the sites
        if f"figures/{path.name}" not in drawn:
            figures.append(
                (f"Example overlays: {path.stem[len('overlays_') :]}", f"figures/{path.name}")
            )
    write_text_atomic(out_dir / "report.md", render_report(clean, figures, out_dir.name))
    return out_dir


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


def load_metrics(run_dir: Path) -> dict[str, Any]:
    """Read a run's metrics.json (``run_dir`` may also be the file itself)."""
    path = Path(run_dir)
    if not path.is_file():
        path = path / "metrics.json"
    if not path.is_file():
        raise FileNotFoundError(f"no metrics.json in {run_dir}: has this run finished?")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from err


# --------------------------------------------------------------------------- JSON


def to_jsonable(obj: Any) -> Any:
    """Plain JSON types; NaN/inf become null so strict JSON readers accept the file."""
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set)):
        return [to_jsonable(v) for v in obj]
    if is_dataclass(obj) and not isinstance(obj, type):
        return to_jsonable(asdict(obj))
    if isinstance(obj, np.generic):
        return to_jsonable(obj.item())
    if isinstance(obj, np.ndarray) or hasattr(obj, "tolist"):
        return to_jsonable(obj.tolist())
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if obj is None or isinstance(obj, (bool, int, str)):
        return obj
    if isinstance(obj, Path):
        return str(obj)
    return str(obj)


# --------------------------------------------------------------------------- report.md


def render_report(metrics: dict[str, Any], figures: list[tuple[str, str]], fallback: str) -> str:
    """The Markdown report of a (JSON-clean) metrics dict; figures are (title, relative path)."""
    method = metrics.get("method") or DEFAULT_METHOD
    name = (metrics.get("config") or {}).get("name") or fallback
    lines = [f"# Results: {name}", "", _summary(metrics, method), "", _UNITS_NOTE, ""]
    lines += _method_section(method, metrics.get("sites") or {}, _mean_of(metrics))
    for key, block in _baselines(metrics):
        lines += _method_section(_baseline_label(key), block.get("sites") or {}, _mean_of(block))
    lines += _comparison_section(metrics, method)
    lines += _timing_section(metrics.get("timing_s") or {})
    lines += _bytes_section(metrics.get("bytes_per_query"))
    lines += _config_section(metrics.get("config") or {}, list(metrics.get("sites") or {}))
    lines += report_sites.sections(metrics)
    lines += _extra_section(metrics)
    lines += _figure_section(figures)
    return "\n".join(lines).rstrip() + "\n"


_UNITS_NOTE = (
    "Dice is in [0, 1], higher is better. HD95 (95th-percentile Hausdorff distance) and ASD "
    "(average symmetric surface distance) are lower-is-better; they are in **mm** where the "
    "pixel spacing of a site's test images is known, else in **px** (see the Units column). "
    "All metrics are over foreground classes only; a class counts on the images where it is in "
    "the ground truth, and a class that is there but not predicted at all counts with the image "
    "diagonal as its distance. Means over sites are unweighted; units 'mixed' means sites "
    "differ, so the distance mean is only indicative."
)


def _summary(metrics: dict[str, Any], method: str) -> str:
    sites = metrics.get("sites") or {}
    ours = _mean_of(metrics).get("dice")
    text = f"{method} reached a mean foreground Dice of {_fmt(ours)} over {len(sites)} site(s)"
    others = [
        f"{_fmt(_mean_of(block).get('dice'))} for the {_baseline_label(key)}"
        for key, block in _baselines(metrics)
    ]
    return text + (", versus " + " and ".join(others) if others else "") + "."


def _method_section(title: str, sites: dict[str, Any], mean: dict[str, Any]) -> list[str]:
    classes = _class_names(sites)
    header = ["Site", "n_test", *[f"Dice {c}" for c in classes], "Mean Dice", "HD95", "ASD"]
    rows = [_table_header(header + ["Units"])]
    for site, m in sites.items():
        dice = m.get("dice") or {}
        cells = [site, str(m.get("n_test", "–")), *[_fmt(dice.get(c)) for c in classes]]
        cells += [_fmt(m.get("dice_mean")), _fmt(m.get("hd95_mean"), 2)]
        cells += [_fmt(m.get("asd_mean"), 2), str(m.get("units", "–"))]
        rows.append(_row(cells))
    if sites:
        blanks = ["" for _ in classes]
        cells = ["**mean over sites**", "", *blanks, _fmt(mean.get("dice"))]
        cells += [_fmt(mean.get("hd95"), 2), _fmt(mean.get("asd"), 2), str(mean.get("units", "–"))]
        rows.append(_row(cells))
    body = rows if sites else ["_No per-site results._"]
    return [f"## {title[:1].upper() + title[1:]}: per site", "", *body, ""]


def _comparison_section(metrics: dict[str, Any], method: str) -> list[str]:
    blocks = [(method, metrics)] + [(_baseline_label(k), b) for k, b in _baselines(metrics)]
    if len(blocks) < 2:
        return []
    sites = _all_sites(blocks)
    rows = [_table_header(["Site", *[label for label, _ in blocks]])]
    for site in sites:
        values = [((b.get("sites") or {}).get(site) or {}).get("dice_mean") for _, b in blocks]
        rows.append(_row([site, *[_fmt(v) for v in values]]))
    rows.append(_row(["**mean**", *[_fmt(_mean_of(b).get("dice")) for _, b in blocks]]))
    return ["## Mean foreground Dice by site", "", *rows, ""]


def _timing_section(timing: dict[str, Any]) -> list[str]:
    if not timing:
        return []
    rows = [_table_header(["Stage", "Seconds", "Minutes"])]
    for stage, seconds in timing.items():
        minutes = None if seconds is None else float(seconds) / 60
        rows.append(_row([stage, _fmt(seconds, 1), _fmt(minutes, 2)]))
    return ["## Timing", "", *rows, ""]


def _bytes_section(n_bytes: Any) -> list[str]:
    if n_bytes is None:
        return []
    return ["## Communication", "", f"Bytes per query: {_human_bytes(n_bytes)}.", ""]


def _config_section(config: dict[str, Any], sites: list[str]) -> list[str]:
    privacy = config.get("privacy") or {}
    data = config.get("data") or {}
    items = [
        ("Run name", config.get("name")),
        ("Data", data.get("kind")),
        ("Image size", (config.get("model") or {}).get("image_size")),
        ("Sites", ", ".join(sites) or (config.get("federation") or {}).get("num_sites")),
        ("Privacy transform", privacy.get("transform")),
        ("Key custody", privacy.get("custody")),
        ("Classes", ", ".join(data.get("class_names") or []) or None),
    ]
    lines = [f"- {label}: {value}" for label, value in items if value not in (None, "")]
    return ["## Configuration", "", *lines, ""] if lines else []


def _extra_section(metrics: dict[str, Any]) -> list[str]:
    extra = {k: v for k, v in metrics.items() if k not in _KNOWN_KEYS}
    if not extra:
        return []
    lines = ["## Other results", ""]
    for key, value in extra.items():
        if isinstance(value, (dict, list)):
            lines += [f"- {key}:", "", "```json", json.dumps(value, indent=2), "```", ""]
        else:
            lines.append(f"- {key}: {_fmt(value) if isinstance(value, float) else value}")
    return lines + [""]


def _figure_section(figures: list[tuple[str, str]]) -> list[str]:
    if not figures:
        return []
    lines = ["## Figures", ""]
    for title, rel in figures:
        lines += [f"### {title}", "", f"![{title}]({rel})", ""]
    return lines


def _table_header(cells: list[str]) -> str:
    return _row(cells) + "\n" + _row(["---"] * len(cells))


def _row(cells: list[str]) -> str:
    return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    try:
        return f"{float(value):.{digits}f}"
    except (TypeError, ValueError):
        return str(value)


def _human_bytes(n_bytes: Any) -> str:
    try:
        n = float(n_bytes)
    except (TypeError, ValueError):
        return str(n_bytes)
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n:,.0f} bytes ({n / size:.1f} {unit})"
    return f"{n:,.0f} bytes"


# --------------------------------------------------------------------------- metrics helpers


def _baselines(metrics: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """Baselines that have results, in their stored order."""
    found = metrics.get("baselines") or {}
    return [(k, b) for k, b in found.items() if isinstance(b, dict) and b.get("sites")]


def _baseline_label(key: str) -> str:
    return BASELINE_LABELS.get(key, key.replace("_", " "))


def _mean_of(block: dict[str, Any]) -> dict[str, Any]:
    """The stored mean, or one computed from the sites when it is missing."""
    return block.get("mean") or mean_over_sites(block.get("sites") or {})


def _class_names(sites: dict[str, Any]) -> list[str]:
    """Foreground class names in first-seen order across sites."""
    names: list[str] = []
    for m in sites.values():
        names += [c for c in (m.get("dice") or {}) if c not in names]
    return names


def _all_sites(blocks: list[tuple[str, dict[str, Any]]]) -> list[str]:
    sites: list[str] = []
    for _, block in blocks:
        sites += [s for s in (block.get("sites") or {}) if s not in sites]
    return sites


# --------------------------------------------------------------------------- figures


def _write_figures(
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
        columns.append((_baseline_label(key), np.asarray(other.pred)))
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
    fig.savefig(path)


def _example_arrays(ex: Examples) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    images = np.asarray(ex.images, dtype=np.float64)
    if images.ndim == 4 and images.shape[1] == 1:  # (k, 1, H, W) straight from a loader
        images = images[:, 0]
    truth, pred = np.asarray(ex.truth), np.asarray(ex.pred)
    if images.ndim != 3 or truth.shape != images.shape or pred.shape != images.shape:
        raise ValueError(
            f"examples: images {images.shape}, truth {truth.shape}, pred {pred.shape} differ"
        )
    if len(images) == 0:
        raise ValueError("examples: no images")
    return images, truth.astype(np.int64), pred.astype(np.int64)


def _draw_panel(ax: Any, image: np.ndarray, labels: np.ndarray | None) -> None:
    lo, hi = np.nanpercentile(image, [1, 99]) if np.isfinite(image).any() else (0.0, 1.0)
    ax.imshow(image, cmap="gray", vmin=lo, vmax=hi if hi > lo else lo + 1)
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
    blocks = [(method, metrics)] + [(_baseline_label(k), b) for k, b in _baselines(metrics)]
    sites = _all_sites(blocks)
    groups = [*sites, "mean"]
    fig = _new_figure(max(5.0, 1.0 + len(groups) * (0.5 + 0.45 * len(blocks))), 4.0)
    ax = fig.subplots()
    width = 0.8 / len(blocks)
    for i, (label, block) in enumerate(blocks):
        values = [((block.get("sites") or {}).get(s) or {}).get("dice_mean") for s in sites]
        values.append(_mean_of(block).get("dice"))
        x = np.arange(len(groups)) + (i - (len(blocks) - 1) / 2) * width
        _annotated_bars(ax, x, values, width, label, f"C{i}")
    ax.set_xticks(np.arange(len(groups)), groups, rotation=20 if len(groups) > 6 else 0)
    ax.set_ylim(0, 1.2)  # headroom for the legend above Dice ~1 bars
    ax.set_ylabel("mean foreground Dice")
    ax.set_title("Mean foreground Dice per site")
    ax.legend(fontsize=8, loc="upper center", ncol=len(blocks), frameon=False)
    fig.tight_layout()
    fig.savefig(path)


def _annotated_bars(
    ax: Any, x: np.ndarray, values: list[Any], width: float, label: str, colour: str
) -> None:
    heights = [np.nan if v is None else float(v) for v in values]
    ax.bar(x, np.nan_to_num(heights), width, label=label, color=colour)
    for xi, h in zip(x, heights, strict=True):
        text = "n/a" if np.isnan(h) else f"{h:.2f}"
        ax.text(xi, (0 if np.isnan(h) else h) + 0.01, text, ha="center", va="bottom", fontsize=7)
