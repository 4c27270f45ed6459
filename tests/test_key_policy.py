"""Keys that cannot be mistaken, and errors that tell the server nothing private (issue 24)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from fedseg.privacy.keys import (
    FINGERPRINT_FILE,
    KeyFileError,
    bind_key,
    key_fingerprint,
    read_key_file,
    write_key_file,
)
from fedseg.privacy.redact import MAX_CHARS, public_error
from fedseg.site import resolve_site
from tests.helpers import blind_config

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "us-nerve"


def test_a_fingerprint_names_a_key_without_revealing_it(tmp_path):
    a, b = write_key_file(tmp_path / "a.key"), write_key_file(tmp_path / "b.key")
    fa, fb = key_fingerprint(read_key_file(a)), key_fingerprint(read_key_file(b))
    assert fa != fb and len(fa) == 16
    assert fa not in read_key_file(a).hex() and fa == key_fingerprint(read_key_file(a))


def test_a_wrong_key_is_refused_before_any_work(tmp_path):
    a, b = write_key_file(tmp_path / "a.key"), write_key_file(tmp_path / "b.key")
    models = tmp_path / "sites" / "h1"
    bind_key(models, a)  # first use records the fingerprint beside the models
    assert (models / FINGERPRINT_FILE).read_text().strip() == key_fingerprint(read_key_file(a))
    bind_key(models, a)
    with pytest.raises(KeyFileError, match="is not the key the models"):
        bind_key(models, b)
    with pytest.raises(KeyFileError, match="key file not found"):
        bind_key(models, tmp_path / "a.kye")  # mistyped


@pytest.mark.skipif(not DATA.is_dir(), reason="needs ../shared/data")
def test_a_deployed_site_never_creates_a_secret(tmp_path):
    """Only `fedseg keygen` or a simulated hospital's first start makes a secret: a site
    whose key file is missing, mistyped or absent from its node config stops with a clear
    error, and no key file appears."""
    cfg = blind_config(tmp_path / "out")
    cfg.data.kind, cfg.data.path = "pairs", str(DATA)
    node = {"data-dir": str(DATA), "site-name": "h1", "out-dir": str(tmp_path / "site")}
    with pytest.raises(KeyFileError, match="needs a secret"):
        resolve_site(cfg, node)
    missing = tmp_path / "keys" / "h1.key"
    with pytest.raises(KeyFileError, match="key file not found"):
        resolve_site(cfg, {**node, "key-file": str(missing)})
    assert not missing.exists()


def test_a_simulated_hospital_makes_its_secret_on_first_start(tmp_path):
    cfg = blind_config(tmp_path / "out")
    setup = resolve_site(cfg, {"partition-id": 0})
    assert setup.key_file is not None and setup.key_file.is_file()
    assert oct(setup.key_file.stat().st_mode & 0o777) == "0o600"


_LEAKY = """
import os, sys
import fedseg.privacy.keys as keys
keys.generate_secret = lambda: bytes(range(32))
def broken(*args, **kwargs):
    raise RuntimeError("disk vanished")
keys.write_text_atomic = broken  # the write fails with the secret in a local
from fedseg.cli import app
sys.argv = ["fedseg", "keygen", "--out", sys.argv[1]]
app()
"""


@pytest.mark.slow
def test_no_traceback_prints_a_secret(tmp_path):
    """An unexpected failure while a secret is in a local variable: the traceback a user sees
    names the error and never the secret (no locals in tracebacks)."""
    env = {**os.environ, "COLUMNS": "200", "_TYPER_STANDARD_TRACEBACK": ""}
    env.pop("_TYPER_STANDARD_TRACEBACK")
    done = subprocess.run(
        [sys.executable, "-c", _LEAKY, str(tmp_path / "k.key")],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=120,
    )
    out = done.stdout + done.stderr
    assert done.returncode != 0 and "disk vanished" in out, out[-2000:]
    secret = bytes(range(32))
    assert secret.hex() not in out and repr(secret)[:40] not in out


@pytest.mark.slow
def test_keygen_to_an_impossible_place_is_a_clear_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    done = subprocess.run(
        [sys.executable, "-m", "fedseg.cli", "keygen", "--out", str(blocker / "k.key")],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert done.returncode != 0 and "cannot create" in done.stdout + done.stderr
    assert "Traceback" not in done.stdout + done.stderr


def test_errors_reach_the_server_without_paths():
    err = FileNotFoundError("/srv/hospital/archive/patient-4711/img_003.png: unreadable")
    text = public_error(err)
    assert text.startswith("FileNotFoundError: ") and "patient-4711" not in text
    assert "<path>: unreadable" in text
    assert len(public_error(ValueError("x" * 1000))) == MAX_CHARS
    assert "\n" not in public_error(ValueError("two\nlines  here"))


def test_a_key_row_sent_as_a_list_of_numbers_in_a_metrics_record_is_refused(tmp_path):
    from fedseg.privacy.audit import KeyLeakError, guard_and_audit, numeric_lists
    from fedseg.privacy.keys import KeyRing

    cfg = blind_config(tmp_path / "out")
    key = write_key_file(tmp_path / "k.key")
    ring = KeyRing.from_secret(read_key_file(key), cfg.model.latent_channels)
    row = [float(v) for v in ring.keys["image"][1].rotation[3]]
    honest = numeric_lists("metrics", {"loss": 0.3, "dice": [0.8, 0.7]})
    guard_and_audit(cfg, "h1", key, "train.x", honest, [])
    forged = numeric_lists("metrics", {"loss": 0.3, "calibration": row})
    assert set(forged) == {"metrics.calibration"}
    with pytest.raises(KeyLeakError, match="metrics.calibration"):
        guard_and_audit(cfg, "h1", key, "train.x", forged, [])
