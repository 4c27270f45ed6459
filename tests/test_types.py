"""The library type-checks: mypy over fedseg/ (settings in pyproject.toml) finds no error."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


def test_mypy_finds_no_error_in_the_library():
    from mypy import api

    config = [
        "--config-file",
        str(ROOT / "pyproject.toml"),
        "--cache-dir",
        str(ROOT / ".mypy_cache"),
    ]
    stdout, stderr, status = api.run([*config, str(ROOT / "fedseg")])
    assert status == 0, stdout[-4000:] + stderr[-2000:]
