"""Hospital profiles in a simulation: what a profile makes a simulated client *do*.

The data side of a profile (source, sample count, intensity, resolution, label noise) is built
by ``fedseg.data.hospitals``; this module holds the behaviour side, used by the ClientApp:
per-round dropout (the client really raises, or really stalls past the deadline) and the
compute-speed factor (the client really takes longer). Draws are deterministic in
(seed, hospital, round), so a rerun fails the same hospitals in the same rounds.
"""

from __future__ import annotations

import time

import numpy as np

from fedseg.config import HospitalConfig, RunConfig
from fedseg.data.hospitals import expand_hospitals


class SimulatedOutage(RuntimeError):
    """A hospital's drawn dropout for this round (raised on the client, seen by the server)."""


def fails_in_round(profile: HospitalConfig | None, seed: int, index: int, rnd: int) -> bool:
    """Whether hospital ``index`` is down in UMN round ``rnd`` (1-based)."""
    if profile is None or profile.dropout <= 0:
        return False
    return bool(np.random.default_rng([seed, index, rnd, 99_991]).uniform() < profile.dropout)


def simulate_outage(profile: HospitalConfig, site: str, rnd: int, deadline_s: float) -> None:
    """Fail the round the way the profile says: raise now, or stall past the server's deadline
    (then raise, so the late reply is an error, never a result)."""
    if profile.failure == "timeout":
        time.sleep(deadline_s + 1.0)
    raise SimulatedOutage(f"{site}: simulated outage in round {rnd} ({profile.failure})")


def slow_down(profile: HospitalConfig | None, seconds: float) -> float:
    """Sleep so that work that took ``seconds`` takes ``seconds / speed``; returns the sleep."""
    if profile is None or profile.speed >= 1.0 or seconds <= 0:
        return 0.0
    extra = seconds * (1.0 / profile.speed - 1.0)
    time.sleep(extra)
    return extra


def round_deadline(cfg: RunConfig) -> float | None:
    """Reply deadline of one UMN round's message (None = wait)."""
    f = cfg.federation
    return f.round_timeout_s or f.message_timeout_s or None


def describe(cfg: RunConfig) -> list[dict]:
    """One row per hospital: its profile's main settings, for the console and the report."""
    rows = []
    for h in expand_hospitals(cfg):
        p = h.profile
        rows.append(
            {
                "site": h.name,
                "source": p.source,
                "samples": p.samples or "share",
                "shift": p.intensity_shift,
                "contrast": p.contrast,
                "noise": p.noise,
                "resolution": p.resolution or cfg.model.image_size,
                "label_noise": p.label_noise,
                "speed": p.speed,
                "dropout": p.dropout,
            }
        )
    return rows
