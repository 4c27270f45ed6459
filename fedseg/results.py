"""Assemble a run's metrics dict (the metrics.json contract) and write the results folder."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fedseg.config import RunConfig, method_name
from fedseg.evaluation import mean_over_sites
from fedseg.report import load_metrics, write_results


def federated_metrics(
    cfg: RunConfig,
    site_metrics: dict[str, dict],
    timing: dict[str, float],
    bytes_per_query: int,
    dropped: list[dict],
    **extra: Any,
) -> dict[str, Any]:
    """metrics.json of a federated run; baselines are added later by :func:`add_baselines`."""
    metrics = {
        "config": cfg.to_dict(),
        "method": method_name(cfg),
        "sites": site_metrics,
        "mean": mean_over_sites(site_metrics),
        "baselines": {},
        "timing_s": timing,
        "bytes_per_query": bytes_per_query,
        "dropped": dropped,
        **extra,
    }
    write_results(Path(cfg.out_dir), metrics)
    return metrics


def add_baselines(out_dir: Path, baselines: dict[str, dict], timing: dict[str, float]) -> dict:
    """Merge baseline results into an existing run folder and redraw its report."""
    metrics = load_metrics(out_dir)
    metrics["baselines"].update(baselines)
    metrics["timing_s"].update(timing)
    write_results(out_dir, metrics)
    return metrics
