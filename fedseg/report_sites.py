"""The heterogeneous-federation part of a report: data per site (non-IID), rounds and drops.

Built only from aggregates the sites sent (sizes, class fractions, intensity histograms) and
from the server's round log; no image is needed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from fedseg.atomic import savefig_atomic

KEYS = {"data_stats", "rounds", "dropped", "rejected", "site_profiles"}
MAX_ROWS = 60  # longer tables are cut (the full data is in metrics.json)


def sections(metrics: dict[str, Any]) -> list[str]:
    return _profile_lines(metrics) + _data_lines(metrics) + _round_lines(metrics)


def _profile_lines(metrics: dict[str, Any]) -> list[str]:
    rows = metrics.get("site_profiles") or []
    if not rows:
        return []
    cols = list(rows[0])
    lines = ["## Hospital profiles", "", _row(cols), _row(["---"] * len(cols))]
    lines += [_row([_fmt(r.get(c)) for c in cols]) for r in rows[:MAX_ROWS]]
    return lines + _cut(len(rows)) + [""]


def _data_lines(metrics: dict[str, Any]) -> list[str]:
    stats = metrics.get("data_stats") or {}
    if not stats:
        return []
    classes: list[str] = []
    for s in stats.values():
        classes += [c for c in s.get("class_names", []) if c not in classes]
    cols = ["Site", "n_train", "n_test", "patients", *[f"% {c}" for c in classes]]
    cols += ["intensity mean", "intensity std"]
    lines = [
        "## Data per site",
        "",
        "Computed by each site on its own training set; only these aggregates left it. "
        "Class fractions are of pixels; '-' marks a class the site does not have.",
        "",
        _row(cols),
        _row(["---"] * len(cols)),
    ]
    for site, s in list(stats.items())[:MAX_ROWS]:
        frac = s.get("class_fraction") or {}
        cells = [site, s.get("n_train"), s.get("n_test"), s.get("patients")]
        cells += [None if c not in frac else 100 * frac[c] for c in classes]
        cells += [s.get("intensity_mean"), s.get("intensity_std")]
        lines.append(_row([_fmt(c) for c in cells]))
    return lines + _cut(len(stats)) + [""]


def _round_lines(metrics: dict[str, Any]) -> list[str]:
    rounds = metrics.get("rounds") or []
    dropped = metrics.get("dropped") or []
    lines: list[str] = []
    if rounds:
        lines += [
            "## UMN rounds",
            "",
            _row(
                [
                    "Round",
                    "Sites in",
                    "Dropped",
                    "Rejoined",
                    "Participation s",
                    "UMN s",
                    "Latent MSE",
                ]
            ),
        ]
        lines.append(_row(["---"] * 7))
        for r in rounds:
            present = r.get("present")
            cells = [
                r.get("round"),
                "all" if present is None else len(present),
                ", ".join(r.get("dropped") or []) or "-",
                ", ".join(r.get("rejoined") or []) or "-",
                r.get("participation"),
                r.get("umn"),
                r.get("loss"),
            ]
            lines.append(_row([_fmt(c) for c in cells]))
        lines.append("")
    if dropped:
        lines += [
            "## Dropped",
            "",
            "A site dropped from a UMN round sends nothing new that "
            "round and is asked again the next; one dropped from another phase is out "
            "for the rest of the run.",
            "",
        ]
        lines += [_row(["Round", "Site", "Phase", "Reason"]), _row(["---"] * 4)]
        for d in dropped[: MAX_ROWS * 4]:
            cells = [d.get("round", "-"), d.get("site"), d.get("phase"), d.get("reason")]
            lines.append(_row([_fmt(c) for c in cells]))
        lines += _cut(len(dropped), MAX_ROWS * 4) + [""]
    rejected = metrics.get("rejected") or []
    if rejected:
        lines += [
            "## Refused replies",
            "",
            "Each was refused for its own step only (malformed, oversized or extreme values); "
            "the site went on with the next.",
            "",
            _row(["Epoch", "Step", "Site", "Phase", "Reason"]),
            _row(["---"] * 5),
        ]
        for r in rejected[: MAX_ROWS * 4]:
            cells = [r.get("epoch", "-"), r.get("step", "-"), r.get("site"), r.get("phase")]
            lines.append(_row([_fmt(c) for c in [*cells, r.get("reason")]]))
        lines += _cut(len(rejected), MAX_ROWS * 4) + [""]
    return lines


def figure(path: Path, metrics: dict[str, Any]) -> bool:
    """Class fractions (stacked bars) and intensity histograms per site; False if no data."""
    stats = metrics.get("data_stats") or {}
    if not stats:
        return False
    sites = list(stats)
    classes: list[str] = []
    for s in stats.values():
        classes += [c for c in s.get("class_names", [])[1:] if c not in classes]
    fig = Figure(figsize=(max(8.0, 0.22 * len(sites) + 6), 4.0), dpi=100)
    FigureCanvasAgg(fig)
    ax_cls, ax_hist = fig.subplots(1, 2, gridspec_kw={"width_ratios": [max(len(sites), 6), 6]})
    bottom = np.zeros(len(sites))
    for k, c in enumerate(classes):
        values = np.array([100 * (stats[s].get("class_fraction") or {}).get(c, 0.0) for s in sites])
        ax_cls.bar(np.arange(len(sites)), values, bottom=bottom, label=c, color=f"C{k}")
        bottom += values
    ax_cls.set_xticks(np.arange(len(sites)), sites, rotation=90, fontsize=6)
    ax_cls.set_ylabel("% of training pixels")
    ax_cls.set_title("Foreground class fractions per site")
    ax_cls.legend(fontsize=7, frameon=False)
    lo, hi = (stats[sites[0]].get("hist_range") or [-4.0, 4.0])[:2]
    for i, s in enumerate(sites):
        hist = np.asarray(stats[s].get("intensity_hist") or [], dtype=float)
        if len(hist):
            centres = lo + (np.arange(len(hist)) + 0.5) * (hi - lo) / len(hist)
            label = s if len(sites) <= 10 else None
            ax_hist.plot(centres, hist, lw=1, alpha=0.8, color=f"C{i % 10}", label=label)
    ax_hist.set_xlabel("normalised intensity")
    ax_hist.set_ylabel("fraction of pixels")
    ax_hist.set_title("Intensity histograms")
    if len(sites) <= 10:
        ax_hist.legend(fontsize=6, frameon=False)
    fig.tight_layout()
    savefig_atomic(fig, path)
    return True


def _cut(n: int, limit: int = MAX_ROWS) -> list[str]:
    return ["", f"_{n - limit} more rows in metrics.json._"] if n > limit else []


def _row(cells: list[Any]) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if abs(value) < 5e-4:
            return "0" if value == 0 else f"{value:.1e}" if abs(value) > 1e-6 else "0.000"
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"
    return str(value)
