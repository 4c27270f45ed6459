"""Reproducibility of a simulation's keys: derived from the run's seed unless the user gives
key files; key files are created whole, 0600, and never replaced; bad key files are one clear
error naming the file."""

from __future__ import annotations

import stat
import threading
from pathlib import Path

import pytest

from fedseg.privacy.keys import (
    KeyFileError,
    key_fingerprint,
    load_or_create_key,
    read_key_file,
    simulated_secret,
    write_key_file,
)
from fedseg.site import resolve_site
from tests.helpers import blind_config


def test_simulated_secret_depends_on_seed_and_owner_only():
    assert simulated_secret(0, "federation") == simulated_secret(0, "federation")
    assert len(simulated_secret(0, "federation")) == 32
    assert simulated_secret(0, "federation") != simulated_secret(1, "federation")
    assert simulated_secret(0, "hospital-1") != simulated_secret(0, "hospital-2")
    assert simulated_secret(0, "federation") != simulated_secret(0, "hospital-1")


def _simulated_key(out: Path, seed: int, scope: str = "federation") -> bytes:
    cfg = blind_config(out, sites=2, epochs=1)
    cfg.training.seed = seed
    if scope == "site":
        cfg.privacy.key_scope = "site"
        cfg.training.finetune_share = "none"
    setup = resolve_site(cfg, {"partition-id": 1})
    assert setup.key_file is not None
    assert stat.S_IMODE(setup.key_file.stat().st_mode) == 0o600
    return read_key_file(setup.key_file)


def test_two_runs_with_one_seed_draw_the_same_keys(tmp_path):
    first = _simulated_key(tmp_path / "a", seed=7)
    assert first == _simulated_key(tmp_path / "b", seed=7)
    assert first == simulated_secret(7, "federation")
    assert first != _simulated_key(tmp_path / "c", seed=8)
    site_key = _simulated_key(tmp_path / "d", seed=7, scope="site")
    assert site_key == simulated_secret(7, "hospital-2") != first


def test_key_files_the_user_gave_are_used_as_they_are(tmp_path):
    given = write_key_file(tmp_path / "mine" / "federation.key")
    secret = read_key_file(given)
    cfg = blind_config(tmp_path / "run", sites=2, epochs=1)
    cfg.privacy.key_dir = str(given.parent)  # a key folder holding the user's file
    setup = resolve_site(cfg, {"partition-id": 0})
    assert setup.key_file == given and read_key_file(given) == secret
    assert secret != simulated_secret(cfg.training.seed, "federation")
    node = {"partition-id": 0, "key-file": str(given)}  # or named in the node config
    assert resolve_site(cfg, node).key_file == given


def test_sites_starting_at_once_share_one_whole_key(tmp_path):
    path = tmp_path / "keys" / "federation.key"
    seen: list[bytes] = []
    threads = [
        threading.Thread(target=lambda s: seen.append(load_or_create_key(path, s)), args=(secret,))
        for secret in (simulated_secret(0, "federation"), None, None, None)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(seen)) == 1 and seen[0] == read_key_file(path)
    assert [p.name for p in path.parent.iterdir()] == ["federation.key"]
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700


def test_keygen_never_replaces_a_secret(tmp_path):
    path = write_key_file(tmp_path / "h.key")
    before = path.read_bytes()
    with pytest.raises(KeyFileError, match="exists"):
        write_key_file(path)
    assert path.read_bytes() == before
    write_key_file(path, overwrite=True)
    assert path.read_bytes() != before and stat.S_IMODE(path.stat().st_mode) == 0o600


@pytest.mark.parametrize(
    "content, expected",
    [
        (b"\xff\xfe\x00binary garbage\x9c", "is not a fedseg secret"),
        (b"", "is not a fedseg secret"),
        (b"fedseg-secret-v1:abcd\n", "is not a fedseg secret"),
    ],
)
def test_a_bad_key_file_is_named_and_its_content_never_shown(tmp_path, content, expected):
    path = tmp_path / "h.key"
    path.write_bytes(content)
    path.chmod(0o600)
    with pytest.raises(KeyFileError) as err:
        read_key_file(path)
    assert expected in str(err.value) and str(path) in str(err.value)
    assert "garbage" not in str(err.value) and "abcd" not in str(err.value)


def test_a_key_path_that_is_a_folder_says_so(tmp_path):
    with pytest.raises(KeyFileError, match="is a directory") as err:
        read_key_file(tmp_path)
    assert "keygen" not in str(err.value)
    with pytest.raises(KeyFileError, match="is a directory"):
        write_key_file(tmp_path)


def test_fingerprint_is_stable_for_a_seeded_key():
    assert key_fingerprint(simulated_secret(0, "federation")) == key_fingerprint(
        simulated_secret(0, "federation")
    )
