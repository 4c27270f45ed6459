"""Finished runs side by side, grouped by one config value and summarised over their repeats.

One run scored on a few dozen test images cannot separate a 1 pp difference from run-to-run
spread: us-nerve's client custody scored 0.719 and 0.707 with training seeds 0 and 1
(docs/history.md, release 9). ``fedseg compare`` puts the repeats of each setting together,
with their spread, and pairs runs that share a training seed.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedseg.config import RunConfig
from fedseg.report import _fmt, load_metrics

# Runs that differ here were scored on different test images; their means do not compare.
SAME_TEST_SET = (
    "data.kind",
    "data.path",
    "data.test_path",
    "data.label_map",
    "data.class_names",
    "data.max_items",
    "federation.num_sites",
    "federation.seed",
    "federation.test_fraction",
    "model.image_size",
    "sources",
    "hospitals",
)
IGNORED = ("out_dir", "resume", "overlays_per_site")


@dataclass
class Group:
    """The runs that share one value of the grouping key."""

    value: str
    runs: list[str] = field(default_factory=list)
    seeds: list[int] = field(default_factory=list)
    dice: list[float] = field(default_factory=list)
    hd95: list[float | None] = field(default_factory=list)
    asd: list[float | None] = field(default_factory=list)
    units: str = ""

    def mean(self, metric: str) -> float | None:
        values = [v for v in getattr(self, metric) if v is not None]
        return statistics.fmean(values) if values else None

    def sd(self, metric: str) -> float | None:
        """Sample standard deviation; None for a single run."""
        values = [v for v in getattr(self, metric) if v is not None]
        return statistics.stdev(values) if len(values) > 1 else None


@dataclass
class Comparison:
    by: str
    groups: list[Group]
    varies: list[str]  # config keys, besides ``by``, that differ between the runs

    def paired(self, a: Group, b: Group) -> list[tuple[int, float]]:
        """(training seed, Dice of a - Dice of b) for each seed both groups ran (none when a
        group repeats a seed: then the pairs would be ambiguous)."""
        if len(set(a.seeds)) < len(a.seeds) or len(set(b.seeds)) < len(b.seeds):
            return []
        dice_b = dict(zip(b.seeds, b.dice, strict=True))
        return [(s, d - dice_b[s]) for s, d in zip(a.seeds, a.dice, strict=True) if s in dice_b]

    def difference(self, a: Group, b: Group) -> tuple[float, float | None]:
        """Mean Dice of a minus b, and its standard error (None unless both repeat)."""
        mean_a, mean_b = a.mean("dice"), b.mean("dice")
        if mean_a is None or mean_b is None:  # compare_runs refuses runs without a mean Dice
            raise ValueError(f"{a.value} or {b.value} has no mean Dice")
        diff = mean_a - mean_b
        sa, sb = a.sd("dice"), b.sd("dice")
        if sa is None or sb is None:
            return diff, None
        return diff, math.sqrt(sa**2 / len(a.dice) + sb**2 / len(b.dice))

    def differences(self) -> list[str]:
        """One line per pair of groups: the difference of means, its error, the paired seeds."""
        lines = []
        for i, a in enumerate(self.groups):
            for b in self.groups[i + 1 :]:
                diff, se = self.difference(a, b)
                text = f"- {a.value} - {b.value}: mean Dice {100 * diff:+.1f} pp"
                if se is not None:
                    text += f" (standard error {100 * se:.1f} pp)"
                pairs = self.paired(a, b)
                if pairs:
                    text += "; by seed " + ", ".join(f"{s}: {100 * d:+.1f}" for s, d in pairs)
                lines.append(text)
        return lines

    def to_markdown(self) -> str:
        units = {g.units for g in self.groups}
        unit = units.pop() if len(units) == 1 else "mm or px"
        varies = ", ".join(f"`{k}`" for k in self.varies) or "nothing"
        lines = [
            f"# Runs compared by `{self.by}`",
            "",
            f"Also differing between the runs: {varies}.",
            "",
            f"| {self.by} | runs | training seeds | mean Dice (sd) | Dice per run "
            f"| HD95 ({unit}) | ASD ({unit}) |",
            "|---|---|---|---|---|---|---|",
        ]
        for g in self.groups:
            lines.append(
                f"| {g.value} | {len(g.runs)} | {', '.join(map(str, g.seeds))} "
                f"| {_fmt(g.mean('dice'))} ({_fmt(g.sd('dice'))}) "
                f"| {' / '.join(_fmt(d) for d in g.dice)} "
                f"| {_fmt(g.mean('hd95'), 1)} | {_fmt(g.mean('asd'), 1)} |"
            )
        lines += ["", *self.differences()]
        lines += ["", "Runs:", ""]
        lines += [f"- {g.value}: {run}" for g in self.groups for run in g.runs]
        return "\n".join(lines) + "\n"


def flatten(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``; lists and tables of tables stay whole."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if (
            isinstance(value, dict)
            and value
            and not all(isinstance(v, dict) for v in value.values())
        ):
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


def compare_runs(run_dirs: list[Path], by: str = "privacy.custody") -> Comparison:
    """Group finished runs by the config value ``by``; refuse runs scored on other test sets."""
    if not run_dirs:
        raise ValueError("no runs to compare")
    configs: dict[str, dict[str, Any]] = {}
    groups: dict[str, Group] = {}
    # A run made before a config field existed ran with that field's default.
    defaults = flatten(RunConfig().to_dict())
    for run_dir in run_dirs:
        metrics = load_metrics(run_dir)
        name = str(run_dir)
        if not isinstance(metrics.get("config"), dict) or "mean" not in metrics:
            raise ValueError(f"{run_dir}/metrics.json: no 'config' or 'mean' (not a fedseg run)")
        config = {**defaults, **flatten(metrics["config"])}
        if by not in config:
            raise ValueError(f"{run_dir}: the run's config has no '{by}'")
        configs[name] = config
        mean = metrics["mean"]
        if mean.get("dice") is None:
            raise ValueError(f"{run_dir}/metrics.json: mean Dice is missing or NaN")
        group = groups.setdefault(str(config[by]), Group(str(config[by])))
        group.runs.append(name)
        group.seeds.append(int(config.get("training.seed", 0)))
        group.dice.append(float(mean["dice"]))
        group.hd95.append(mean.get("hd95"))
        group.asd.append(mean.get("asd"))
        group.units = mean.get("units", "")
    first, *rest = configs
    for key in SAME_TEST_SET:
        for other in rest:
            if configs[first].get(key) != configs[other].get(key):
                raise ValueError(
                    f"{first} and {other} were scored on different test sets: '{key}' is "
                    f"{configs[first].get(key)!r} against {configs[other].get(key)!r}"
                )
    keys = set().union(*configs.values()) - {by, *IGNORED}
    varies = sorted(k for k in keys if len({repr(c.get(k)) for c in configs.values()}) > 1)
    return Comparison(by, list(groups.values()), varies)
