"""A run's results, typed: what ``metrics.json`` holds, and the helpers that read it.

``RunResults`` is the contract between the server (which writes it), the CLI (which prints and
extends it with baselines) and the report; ``SiteScores`` is one site's scores on its own test
split. ``metrics.json`` stays a flat JSON object (``RunResults.to_dict``), so older runs and
other tools read it as before; keys this module does not name are kept in ``extra``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from fedseg.evaluation import mean_over_sites

DEFAULT_METHOD = "fedseg"  # a metrics.json without a method (config.method_name names it)
BASELINE_LABELS = {
    "centralized_unet": "centralized UNet",
    "local_unet": "local UNets",
    "centralized_unet3d": "centralized 3D UNet",
}


@dataclass
class SiteScores:
    """One site's scores (``fedseg.evaluation.segmentation_metrics``): per foreground class
    and their mean; distances in ``units`` ("mm" where the data has a spacing, else "px")."""

    dice: dict[str, float | None]
    hd95: dict[str, float | None]
    asd: dict[str, float | None]
    dice_mean: float | None
    hd95_mean: float | None
    asd_mean: float | None
    units: str
    n_test: int
    extra: dict[str, Any] = field(default_factory=dict)  # e.g. decode_seconds

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> SiteScores:
        return cls(**_split(cls, values))

    def to_dict(self) -> dict[str, Any]:
        return _flat(self)


@dataclass
class MethodResults:
    """One method's scores over the sites (the federated run, or a baseline)."""

    sites: dict[str, SiteScores]
    mean: dict[str, Any]  # mean_over_sites: dice, hd95, asd, units
    extra: dict[str, Any] = field(default_factory=dict)  # a baseline's epochs, parameters, ...

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> MethodResults:
        sites = {k: SiteScores.from_dict(v) for k, v in (values.get("sites") or {}).items()}
        mean = values.get("mean") or mean_over_sites({k: v.to_dict() for k, v in sites.items()})
        rest = {k: v for k, v in values.items() if k not in ("sites", "mean")}
        return cls(sites=sites, mean=mean, extra=rest)

    def to_dict(self) -> dict[str, Any]:
        sites = {k: v.to_dict() for k, v in self.sites.items()}
        return {"sites": sites, "mean": self.mean, **self.extra}


@dataclass
class RunResults:
    """A run's record: its config and method, the federated scores, the baselines, timings
    and what was dropped or refused; ``extra`` holds the optional keys (rounds, losses,
    aggregation bytes, data statistics, ...)."""

    config: dict[str, Any]
    method: str
    federated: MethodResults
    baselines: dict[str, MethodResults] = field(default_factory=dict)
    timing_s: dict[str, float] = field(default_factory=dict)
    bytes_per_query: int | None = None
    dropped: list[dict] = field(default_factory=list)
    rejected: list[dict] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> RunResults:
        named = {"config", "method", "sites", "mean", "baselines", "timing_s"}
        named |= {"bytes_per_query", "dropped", "rejected"}
        return cls(
            config=values.get("config") or {},
            method=str(values.get("method") or DEFAULT_METHOD),
            federated=MethodResults.from_dict(
                {k: values[k] for k in ("sites", "mean") if k in values}
            ),
            baselines={
                k: MethodResults.from_dict(v)
                for k, v in (values.get("baselines") or {}).items()
                if isinstance(v, dict)
            },
            timing_s=dict(values.get("timing_s") or {}),
            bytes_per_query=values.get("bytes_per_query"),
            dropped=list(values.get("dropped") or []),
            rejected=list(values.get("rejected") or []),
            extra={k: v for k, v in values.items() if k not in named},
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "config": self.config,
            "method": self.method,
            **self.federated.to_dict(),
            "baselines": {k: v.to_dict() for k, v in self.baselines.items()},
            "timing_s": self.timing_s,
            "bytes_per_query": self.bytes_per_query,
            "dropped": self.dropped,
            "rejected": self.rejected,
            **self.extra,
        }


def _split(cls: type, values: dict[str, Any]) -> dict[str, Any]:
    """A dict as a dataclass's keyword arguments: its fields, and the rest in ``extra``."""
    names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
    missing = sorted(n for n in names if n not in values)
    if missing:
        raise ValueError(f"{cls.__name__}: missing {', '.join(missing)}")
    kwargs = {n: values[n] for n in names}
    kwargs["extra"] = {k: v for k, v in values.items() if k not in names}
    return kwargs


def _flat(obj: Any) -> dict[str, Any]:
    values = {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj) if f.name != "extra"}
    return {**values, **obj.extra}


def baselines_of(metrics: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """Baselines that have results, in their stored order."""
    found = metrics.get("baselines") or {}
    return [(k, b) for k, b in found.items() if isinstance(b, dict) and b.get("sites")]


def baseline_label(key: str) -> str:
    return BASELINE_LABELS.get(key, key.replace("_", " "))


def mean_of(block: dict[str, Any]) -> dict[str, Any]:
    """The stored mean, or one computed from the sites when it is missing."""
    return block.get("mean") or mean_over_sites(block.get("sites") or {})


def class_names_of(sites: dict[str, Any]) -> list[str]:
    """Foreground class names in first-seen order across sites."""
    names: list[str] = []
    for m in sites.values():
        names += [c for c in (m.get("dice") or {}) if c not in names]
    return names


def all_sites(blocks: list[tuple[str, dict[str, Any]]]) -> list[str]:
    sites: list[str] = []
    for _, block in blocks:
        sites += [s for s in (block.get("sites") or {}) if s not in sites]
    return sites
