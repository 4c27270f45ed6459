"""The time-to-Dice benchmark's arithmetic: when a curve first reaches a target."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "time_to_dice.py"
_SPEC = importlib.util.spec_from_file_location("time_to_dice", _PATH)
assert _SPEC is not None and _SPEC.loader is not None
ttd = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(ttd)


def test_time_to_a_target_is_interpolated_between_the_points_around_it():
    curve = [
        {"seconds": 100, "dice": 0.6},
        {"seconds": 300, "dice": 0.8},
        {"seconds": 200, "dice": 0.7},
    ]
    assert ttd.time_to(curve, 0.75) == pytest.approx(250.0)
    assert ttd.time_to(curve, 0.5) == 100  # already there at the first point
    assert ttd.time_to(curve, 0.9) is None  # never reached
