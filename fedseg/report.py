"""A run's results folder: ``metrics.json``, ``report.md`` and ``figures/``.

``metrics.json`` is the record of a run and is written first (``fedseg.atomic``: whole or not
at all, fsynced), so a failing figure or a crash half-way never loses or corrupts the numbers.
Figures are best effort: a failure is logged and the report simply leaves that figure out.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedseg import report_sites
from fedseg.atomic import write_text_atomic
from fedseg.config import RunConfig, method_name
from fedseg.evaluation import mean_over_sites
from fedseg.figures import Examples, write_figures
from fedseg.results import (
    DEFAULT_METHOD,
    MethodResults,
    RunResults,
    all_sites,
    baseline_label,
    baselines_of,
    class_names_of,
    mean_of,
)

log = logging.getLogger(__name__)

_KNOWN_KEYS = {"config", "method", "sites", "mean", "baselines", "timing_s", "bytes_per_query"}
_KNOWN_KEYS |= report_sites.KEYS  # rendered by fedseg.report_sites


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
    figures = write_figures(out_dir / "figures", clean, examples or {}, baseline_examples or {})
    drawn = {link for _, link in figures}
    for path in sorted((out_dir / "figures").glob("overlays_*.png")):  # drawn by the sites
        if f"figures/{path.name}" not in drawn:
            figures.append(
                (f"Example overlays: {path.stem[len('overlays_') :]}", f"figures/{path.name}")
            )
    write_text_atomic(out_dir / "report.md", render_report(clean, figures, out_dir.name))
    return out_dir


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


# Wall-clock measurements in metrics.json: they differ between two runs of one seed by nature.
TIMING_KEYS = {"timing_s", "share_seconds", "seconds", "train_seconds", "seconds_per_image"}
TIMING_KEYS |= {"decode_seconds", "umn_seconds", "epoch_end_seconds"}
ROUND_TIMING_KEYS = {"umn", "participation"}  # seconds in each ``rounds`` entry


def without_timings(metrics: Any, key: str = "") -> Any:
    """``metrics`` without its wall-clock fields (:data:`TIMING_KEYS`): what two runs with one
    config and seed must agree on (docs/running.md, "Reproducibility")."""
    if isinstance(metrics, dict):
        drop = TIMING_KEYS | (ROUND_TIMING_KEYS if key == "rounds" else set())
        return {k: without_timings(v, k) for k, v in metrics.items() if k not in drop}
    if isinstance(metrics, list):
        return [without_timings(v, key) for v in metrics]
    return metrics


# --------------------------------------------------------------------------- report.md


def render_report(metrics: dict[str, Any], figures: list[tuple[str, str]], fallback: str) -> str:
    """The Markdown report of a (JSON-clean) metrics dict; figures are (title, relative path)."""
    method = metrics.get("method") or DEFAULT_METHOD
    name = (metrics.get("config") or {}).get("name") or fallback
    lines = [f"# Results: {name}", "", _summary(metrics, method), "", _UNITS_NOTE, ""]
    per_slice = " (per slice)" if mean_of(metrics).get("volume") else ""
    lines += _method_section(method + per_slice, metrics.get("sites") or {}, mean_of(metrics))
    for key, block in baselines_of(metrics):
        title = baseline_label(key) + per_slice
        lines += _method_section(title, block.get("sites") or {}, mean_of(block))
    lines += _comparison_section(metrics, method)
    lines += _volume_section(metrics, method)
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

    def dice(block: dict[str, Any]) -> str:
        mean = mean_of(block)
        volume = mean.get("volume")
        if not isinstance(volume, dict):
            return _fmt(mean.get("dice"))
        return f"{_fmt(mean.get('dice'))} per slice ({_fmt(volume.get('dice_mean'))} per volume)"

    text = f"{method} reached a mean foreground Dice of {dice(metrics)} over {len(sites)} site(s)"
    others = [
        f"{dice(block)} for the {baseline_label(key)}" for key, block in baselines_of(metrics)
    ]
    return text + (", versus " + " and ".join(others) if others else "") + "."


def _method_section(title: str, sites: dict[str, Any], mean: dict[str, Any]) -> list[str]:
    classes = class_names_of(sites)
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
    blocks = [(method, metrics)] + [(baseline_label(k), b) for k, b in baselines_of(metrics)]
    if len(blocks) < 2:
        return []
    sites = all_sites(blocks)
    rows = [_table_header(["Site", *[label for label, _ in blocks]])]
    for site in sites:
        values = [((b.get("sites") or {}).get(site) or {}).get("dice_mean") for _, b in blocks]
        rows.append(_row([site, *[_fmt(v) for v in values]]))
    rows.append(_row(["**mean**", *[_fmt(mean_of(b).get("dice")) for _, b in blocks]]))
    per_slice = " (per slice)" if mean_of(metrics).get("volume") else ""
    return [f"## Mean foreground Dice by site{per_slice}", "", *rows, ""]


def _volume_section(metrics: dict[str, Any], method: str) -> list[str]:
    """Per-volume (3D) means over every test volume, one row per method, beside the per-slice
    tables above."""
    blocks = [(method, metrics)] + [(baseline_label(k), b) for k, b in baselines_of(metrics)]
    found = [(label, mean_of(b).get("volume")) for label, b in blocks]
    rows: list[tuple[str, dict[str, Any]]] = [(k, v) for k, v in found if isinstance(v, dict)]
    if not rows:
        return []
    classes = list((rows[0][1].get("dice") or {}).keys())
    header = ["Method", "Volumes", *[f"Dice {c}" for c in classes], "Mean Dice"]
    header += [f"HD95 {c}" for c in classes] + [f"ASD {c}" for c in classes] + ["Units"]
    table = [_table_header(header)]
    for label, v in rows:
        cells = [label, str(v.get("n_volumes", "–"))]
        cells += [_fmt((v.get("dice") or {}).get(c)) for c in classes] + [_fmt(v.get("dice_mean"))]
        cells += [_fmt((v.get("hd95") or {}).get(c), 2) for c in classes]
        cells += [_fmt((v.get("asd") or {}).get(c), 2) for c in classes]
        table.append(_row(cells + [str(v.get("units", "–"))]))
    return ["## Per volume (3D, the Decathlon convention)", "", _VOLUME_NOTE, "", *table, ""]


_VOLUME_NOTE = (
    "Each test volume is scored whole: its slices' predictions put back in order on the "
    "volume's own grid, then 3D Dice, HD95 and ASD per class with the voxel spacing of its "
    "NIfTI header; figures are means over all test volumes of all sites. The per-site tables "
    "above are per slice (2D): a class counts on the slices where it is in the ground truth."
)


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


# --------------------------------------------------------------------------- a run's record


def federated_metrics(
    cfg: RunConfig,
    site_metrics: dict[str, dict],
    timing: dict[str, float],
    bytes_per_query: int | None,
    dropped: list[dict],
    rejected: list[dict] | None = None,
    **extra: Any,
) -> RunResults:
    """Record a federated run in ``cfg.out_dir``; baselines are added later
    (:func:`add_baselines`). Sites in name order, not in the order they answered, so two
    seeded runs give the same file and the same float sums in the mean."""
    site_metrics = dict(sorted(site_metrics.items()))
    results = RunResults.from_dict(
        {
            "config": cfg.to_dict(),
            "method": method_name(cfg),
            "sites": site_metrics,
            "mean": mean_over_sites(site_metrics),
            "timing_s": timing,
            "bytes_per_query": bytes_per_query,
            "dropped": dropped,
            "rejected": rejected or [],
            **extra,
        }
    )
    write_results(Path(cfg.out_dir), results.to_dict())
    return results


def add_baselines(
    out_dir: Path, baselines: dict[str, dict], timing: dict[str, float]
) -> RunResults:
    """Merge baseline results into an existing run folder and redraw its report."""
    results = RunResults.from_dict(load_metrics(out_dir))
    results.baselines.update({k: MethodResults.from_dict(v) for k, v in baselines.items()})
    results.timing_s.update(timing)
    write_results(out_dir, results.to_dict())
    return results
