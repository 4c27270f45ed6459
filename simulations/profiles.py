"""Hospital profiles in a simulation: what a profile makes a simulated client *do*.

The data side of a profile (source, sample count, intensity, resolution, label noise) is built
by ``fedseg.data.hospitals``; this module holds the behaviour side, a mod of the simulated
ClientApp (``apply_profile``): per-round dropout (the client really raises, or really stalls
past the deadline) in UMN rounds and blind-aggregation rounds, and the compute-speed factor
(the client really takes longer). Draws are deterministic in
(seed, hospital, round), so a rerun fails the same hospitals in the same rounds.
"""

from __future__ import annotations

import logging
import time

import numpy as np
from flwr.app import Context, Message

from fedseg import protocol
from fedseg.config import HospitalConfig, RunConfig
from fedseg.data.hospitals import expand_hospitals
from fedseg.protocol import FinetuneRequest, RoundRequest


class SimulatedOutage(RuntimeError):
    """A hospital's drawn dropout for this round (raised on the client, seen by the server)."""


def fails_in_round(profile: HospitalConfig | None, seed: int, index: int, rnd: int) -> bool:
    """Whether hospital ``index`` is down in UMN round ``rnd`` (1-based)."""
    if profile is None or profile.dropout <= 0:
        return False
    return bool(np.random.default_rng([seed, index, rnd, 99_991]).uniform() < profile.dropout)


class _RoutineShutdown(logging.Filter):
    """Flower warns "Manually terminating ClientAppActor" from every actor it stops at the
    normal end of a simulation: routine, and nothing its user can act on."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Manually terminating")


def quiet_routine_shutdown() -> None:
    """In a simulated hospital's Ray actor (where this mod runs): drop that one notice."""
    flower = logging.getLogger("flwr")
    if not any(isinstance(f, _RoutineShutdown) for f in flower.filters):
        flower.addFilter(_RoutineShutdown())


def apply_profile(
    msg: Message,
    context: Context,
    call_next,
    cfg: RunConfig,
    name: str,
    profile: HospitalConfig | None,
    index: int,
) -> Message:
    """The ClientApp mod: fail the rounds the profile draws, and take ``1 / speed`` as long.
    ``name, profile, index``: the hospital (fedseg.data.simulated_hospital)."""
    quiet_routine_shutdown()
    outage = outage_round(msg, cfg)
    if outage is not None and fails_in_round(profile, cfg.federation.seed, index, outage[0]):
        simulate_outage(profile, name, *outage)
    started = time.perf_counter()
    reply = call_next(msg, context)
    slow_down(profile, time.perf_counter() - started)
    return reply


def outage_round(msg: Message, cfg: RunConfig) -> tuple[int, float] | None:
    """(round, reply deadline) of a message that belongs to a round a hospital can miss: a UMN
    round, or a blind-aggregation round of split training (its epoch + 1); else None."""
    kind = msg.metadata.message_type
    if kind not in (protocol.ROUND, protocol.FINETUNE_FORWARD):
        return None
    values = msg.content.config_records[protocol.REQUEST]
    if kind == protocol.ROUND:
        request = RoundRequest.from_config(values)
        return request.round, request.deadline_s
    step = FinetuneRequest.from_config(values)
    if step.step != protocol.SHARE_STEP:
        return None
    share_round = (step.share_epoch if step.share_epoch is not None else step.epoch) + 1
    return share_round, round_deadline(cfg) or 0.0


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
