"""The simulation engine's console: Flower's notice to fedseg's developers stays out of it."""

from __future__ import annotations

import logging

from simulations.engine import _FedsegsOwnNotices


def _record(text: str) -> logging.LogRecord:
    return logging.LogRecord("flwr", logging.WARNING, __file__, 0, text, None, None)


def test_only_the_run_simulation_notice_is_filtered():
    notice = (
        "DEPRECATED FEATURE: The `run_simulation` function is deprecated and will be removed "
        "in a future version of Flower."
    )
    kept = _FedsegsOwnNotices()
    assert not kept.filter(_record(notice))
    assert kept.filter(_record("DEPRECATED FEATURE: something a user passed"))
    assert kept.filter(_record("Manually terminating ClientAppActor"))
