"""Checkpoint and resume: a run killed with SIGKILL finishes from its last checkpoint.

The federated run goes through the CLI (Flower's simulation engine, Ray) in its own process
group, which is killed as a whole once the first UMN round is on disk.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import tomli_w
import torch

from fedseg.checkpoint import (
    LATENTS_NAME,
    UMN_NAME,
    CheckpointMismatch,
    checkpoint_dir,
    fingerprint,
    load_checkpoint,
)
from fedseg.config import RunConfig
from fedseg.coordinator import Coordinator
from tests.helpers import small_config

ROUNDS, EPOCHS = 3, 8
FEDSEG = [sys.executable, "-m", "fedseg.cli"]
ENV = {**os.environ, "COLUMNS": "300"}  # rich must not wrap the lines asserted on


def tiny(out: Path) -> RunConfig:
    return small_config(
        out, 2, [8, 8, 16, 16, 16], 16, ae_epochs=1, umn_rounds=ROUNDS, umn_epochs_per_round=EPOCHS
    ).validate()


def write_scenario(cfg: RunConfig, path: Path) -> Path:
    values = cfg.to_dict()
    del values["out_dir"], values["resume"]
    path.write_text(tomli_w.dumps(values))
    return path


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def saved_round(out: Path) -> int:
    path = out / "checkpoints" / UMN_NAME
    try:
        return int(torch.load(path, weights_only=True)["round"]) if path.is_file() else 0
    except Exception:  # being replaced right now
        return 0


def test_checkpoint_round_trip_and_config_mismatch(tmp_path):
    cfg = tiny(tmp_path)
    cfg.privacy.transform = "none"
    coordinator = Coordinator(cfg, ["a", "b"])
    shapes = coordinator.shapes
    for site in ("a", "b"):
        arrays = {
            f"{role}{s}": torch.randn(4, *shape).half().numpy()
            for role in ("image", "mask")
            for s, shape in enumerate(shapes)
        }
        coordinator.add_chunk(site, arrays)
    coordinator.save_latents(checkpoint_dir(cfg), {"timing": {}, "train_bytes": 0})
    coordinator.train_round()
    coordinator.save_checkpoint(checkpoint_dir(cfg))

    restored = Coordinator(cfg, ["a", "b"])
    restored.restore_latents(load_checkpoint(cfg, LATENTS_NAME))
    restored.restore_round(load_checkpoint(cfg, UMN_NAME))
    assert restored.round == 1 and restored.epoch == EPOCHS
    assert restored.collected() == {"a": 4, "b": 4}
    for key, value in coordinator.umn.state_dict().items():
        assert torch.equal(value, restored.umn.state_dict()[key]), key
    # Both continue identically: the optimizer's moments came back too.
    assert coordinator.train_round() == pytest.approx(restored.train_round(), rel=1e-5)

    # Output settings may change on resume; what the federation computes may not.
    cfg.overlays_per_site = 1
    assert load_checkpoint(cfg, UMN_NAME) is not None
    before = fingerprint(cfg)
    cfg.out_dir = "elsewhere"
    assert fingerprint(cfg) == before  # sites tag their AEs with this: same run, same tag
    cfg.training.umn_lr = 0.5
    assert fingerprint(cfg) != before
    cfg.out_dir = str(tmp_path)
    with pytest.raises(CheckpointMismatch, match=r"training\.umn_lr: 0\.001 -> 0\.5"):
        load_checkpoint(cfg, UMN_NAME)
    with pytest.raises(CheckpointMismatch, match="saved for"):
        Coordinator(tiny(tmp_path), ["a", "c"]).restore_latents(
            torch.load(checkpoint_dir(cfg) / LATENTS_NAME, weights_only=True)
        )


@pytest.mark.slow
def test_killed_run_resumes_to_completion(tmp_path):
    out = tmp_path / "run"
    scenario = write_scenario(tiny(out), tmp_path / "tiny.toml")
    command = [*FEDSEG, "run", "--config", str(scenario), "--out", str(out), "--no-baselines"]
    log = (tmp_path / "first.log").open("w")
    first = subprocess.Popen(
        command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=ENV
    )
    try:
        deadline = time.monotonic() + 400
        while saved_round(out) < 1:
            assert first.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "no UMN round was checkpointed in time"
            time.sleep(0.2)
    finally:
        os.killpg(first.pid, signal.SIGKILL)  # the CLI, Ray and its workers, no clean-up
        first.wait()
    killed_at = saved_round(out)
    assert 1 <= killed_at < ROUNDS, "the run finished before it could be killed"
    assert not (out / "metrics.json").exists()
    aes = sorted((out / "sites").glob("*/autoencoders.pt"))
    assert len(aes) == 2
    before = {p: digest(p) for p in [*aes, out / "checkpoints" / LATENTS_NAME]}

    resumed = subprocess.run(
        [*command, "--resume"],
        capture_output=True,
        text=True,
        timeout=600,
        start_new_session=True,
        env=ENV,
    )
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "resume: collected latents and UMN round" in resumed.stdout

    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["resumed"] == {"latents": True, "from_round": killed_at}
    assert set(metrics["sites"]) == {"hospital-1", "hospital-2"} and metrics["dropped"] == []
    final = torch.load(out / "checkpoints" / UMN_NAME, weights_only=True)
    assert (final["round"], final["epoch"]) == (ROUNDS, ROUNDS * EPOCHS)
    # The sites reloaded their AEs and the server kept its latents: nothing was redone.
    assert {p: digest(p) for p in before} == before

    # A different scenario against these checkpoints is refused before anything starts.
    other = tiny(out)
    other.training.umn_rounds = ROUNDS + 1
    other_scenario = write_scenario(other, tmp_path / "other.toml")
    refused = subprocess.run(
        [*FEDSEG, "run", "--config", str(other_scenario), "--out", str(out), "--resume"],
        capture_output=True,
        text=True,
        timeout=120,
        env=ENV,
    )
    assert refused.returncode == 2
    said = refused.stderr  # CLI errors are one line on stderr
    assert "different config" in said and "training.umn_rounds: 3 -> 4" in said


def test_checkpoint_from_before_a_new_field_counts_it_as_its_default(tmp_path):
    """A run checkpointed before ``model.umn_arch`` existed resumes; a real change is refused."""
    cfg = tiny(tmp_path)
    cfg.privacy.transform = "none"
    coordinator = Coordinator(cfg, ["a"])
    path = coordinator.save_checkpoint(checkpoint_dir(cfg))
    state = torch.load(path, weights_only=False)
    del state["config"]["model"]["umn_arch"]
    torch.save(state, path)
    assert load_checkpoint(cfg, UMN_NAME)["config"]["model"].get("umn_arch") is None
    cfg.model.umn_arch = "reference"
    with pytest.raises(CheckpointMismatch, match=r"model\.umn_arch: 'fast' -> 'reference'"):
        load_checkpoint(cfg, UMN_NAME)
