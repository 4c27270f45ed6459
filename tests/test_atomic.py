"""The atomic writer: whole files or none, no temp file left, modes kept; a writer killed with
SIGKILL in the middle of its writes leaves every file whole."""

from __future__ import annotations

import json
import os
import random
import signal
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from fedseg import atomic
from fedseg.atomic import (
    remove_stale_temps,
    savez_atomic,
    torch_save_atomic,
    write_atomic,
    write_bytes_atomic,
    write_text_atomic,
)

REPO = Path(__file__).resolve().parents[1]


def leftovers(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.name.endswith(".tmp")]


@pytest.fixture(params=["unnamed", "named"])
def temp_kind(request, monkeypatch):
    """Both ways a write is staged: O_TMPFILE (Linux) and a named temp file (elsewhere)."""
    if request.param == "named":
        monkeypatch.setattr(atomic, "_open_unnamed", lambda folder, mode: None)
    return request.param


def test_write_replaces_whole_and_keeps_modes(tmp_path, temp_kind):
    target = tmp_path / "sub" / "metrics.json"
    write_text_atomic(target, "first")
    assert target.read_text() == "first"
    assert stat.S_IMODE(target.stat().st_mode) == 0o644
    write_text_atomic(target, "second")
    assert target.read_text() == "second"
    secret = write_bytes_atomic(tmp_path / "k.key", b"s", mode=0o600)
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    assert leftovers(tmp_path) == []


def test_a_failing_write_keeps_the_old_file_and_leaves_no_temp(tmp_path, temp_kind):
    target = tmp_path / "umn.pt"
    write_bytes_atomic(target, b"old")

    def half_then_fail(handle):
        handle.write(b"new but incomplete")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        write_atomic(target, half_then_fail)
    assert target.read_bytes() == b"old"
    assert leftovers(tmp_path) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["umn.pt"]


def test_create_only_never_replaces(tmp_path, temp_kind):
    target = tmp_path / "0000_share.npz"
    savez_atomic(target, {"a": np.arange(3)}, replace=False)
    with pytest.raises(FileExistsError, match="0000_share.npz"):
        savez_atomic(target, {"a": np.zeros(3)}, replace=False)
    assert np.load(target)["a"].tolist() == [0, 1, 2]
    assert leftovers(tmp_path) == []


def test_torch_checkpoint_is_private_and_loadable(tmp_path, temp_kind):
    import torch

    path = torch_save_atomic({"round": 3, "w": torch.ones(4)}, tmp_path / "umn.pt")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert torch.load(path, weights_only=True)["round"] == 3


def test_a_dead_writers_temp_file_is_removed_by_the_next_write(tmp_path):
    target = tmp_path / "metrics.json"
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        text=True,
        capture_output=True,
        check=True,
    )
    stale = tmp_path / f".metrics.json.{dead.stdout.strip()}.abcd1234.tmp"
    stale.write_text("torn")
    mine = tmp_path / f".metrics.json.{os.getpid()}.abcd1234.tmp"  # a live writer's: kept
    mine.write_text("in progress")
    assert remove_stale_temps(target) == [stale]
    write_text_atomic(target, "{}")
    assert not stale.exists() and mine.exists()


WRITER = textwrap.dedent(
    """
    import json, shutil, sys
    from pathlib import Path
    import numpy as np
    from fedseg.atomic import savez_atomic, write_bytes_atomic, write_text_atomic
    out, n, torch_too = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3] == "1"
    if torch_too:
        import torch
        from fedseg.atomic import torch_save_atomic
    shutil.rmtree(out / "audit", ignore_errors=True)  # checked after the last kill; bounded

    def write_all(i):
        audit = out / "audit"
        k = len(list(audit.glob("*.npz"))) if audit.is_dir() else 0
        savez_atomic(audit / f"{k:04d}_share.npz", {"v": np.full(n // 8, k)}, replace=False)
        stamp = i.to_bytes(8, "little")
        write_bytes_atomic(out / "latents.bin", stamp + bytes(n) + stamp)
        write_text_atomic(out / "metrics.json", json.dumps({"i": i, "pad": "x" * n, "end": i}))
        if torch_too:
            torch_save_atomic({"round": i, "w": torch.full((n,), float(i))}, out / "umn.pt")

    # Every file exists before the first kill, however slow the disk: a kill can only land
    # in a later write, which must leave each file whole.
    write_all(1)
    print("ready", flush=True)
    i = 1
    while True:
        i += 1
        write_all(i)
    """
)


def kill_while_writing(out: Path, kills: int, torch_too: bool, n: int) -> None:
    """Start the writer, SIGKILL it at a random moment after its first round of writes, check
    every file; ``kills`` times."""
    script = out.parent / "writer.py"
    script.write_text(WRITER)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    rng = random.Random(27)
    for _ in range(kills):
        writer = subprocess.Popen(
            [sys.executable, str(script), str(out), str(n), "1" if torch_too else "0"],
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        assert writer.stdout is not None and writer.stdout.readline() == "ready\n"
        time.sleep(rng.uniform(0.05, 0.3))
        writer.send_signal(signal.SIGKILL)
        writer.wait()
        # A kill in the microseconds between naming a temp file and renaming it over the
        # target can leave that temp (linkat cannot replace); the next write to the same file
        # removes it. Anything else left over is a defect.
        for temp in leftovers(out):
            target = temp.with_name(temp.name[1:].rsplit(".", 3)[0])
            assert temp in atomic.remove_stale_temps(target), f"{temp} left by the killed writer"
        assert leftovers(out) == [], "a temp file was left by the killed writer"
        metrics = json.loads((out / "metrics.json").read_text())  # whole JSON, or this raises
        assert metrics["end"] == metrics["i"] and len(metrics["pad"]) == n
        blob = (out / "latents.bin").read_bytes()
        assert len(blob) == n + 16 and blob[:8] == blob[-8:]
        for path in sorted((out / "audit").glob("*.npz")):
            values = np.load(path)["v"]  # a torn zip raises here
            assert len(values) == n // 8 and (values == int(path.name[:4])).all(), path
        if torch_too:
            import torch

            state = torch.load(out / "umn.pt", weights_only=True)
            assert (state["w"] == state["round"]).all() and len(state["w"]) == n


def test_a_writer_killed_mid_write_leaves_no_torn_file_and_no_temp(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    kill_while_writing(out, kills=6, torch_too=False, n=8_000_000)  # checks after each kill


@pytest.mark.slow
def test_a_checkpoint_writer_killed_mid_write_leaves_whole_files(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    kill_while_writing(out, kills=10, torch_too=True, n=1_000_000)
