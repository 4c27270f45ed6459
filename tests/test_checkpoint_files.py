"""Checkpoint and results-folder durability: a corrupt or empty checkpoint is one clear error
naming the file; a run refuses another run's results folder unless it resumes or overwrites
it; checkpoints and audit copies are written whole, 0600 where private."""

from __future__ import annotations

import stat
from pathlib import Path

import numpy as np
import pytest
import torch

from fedseg.checkpoint import (
    UMN_NAME,
    CheckpointError,
    ResultsFolderError,
    claim_out_dir,
    load_checkpoint,
    read_checkpoint,
    save_private,
)
from fedseg.config import RunConfig
from fedseg.privacy.audit import keep_copy


def config(out: Path, **privacy) -> RunConfig:
    cfg = RunConfig(name="t", out_dir=str(out))
    for key, value in privacy.items():
        setattr(cfg.privacy, key, value)
    return cfg


def real_checkpoint(cfg: RunConfig) -> Path:
    state = {"round": 1, "umn": {"w": torch.randn(64, 64)}, "config": cfg.to_dict()}
    return save_private(state, Path(cfg.out_dir) / "checkpoints" / UMN_NAME)


def test_a_checkpoint_is_private_whole_and_leaves_no_temp(tmp_path):
    cfg = config(tmp_path / "run")
    path = real_checkpoint(cfg)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert [p.name for p in path.parent.iterdir()] == [UMN_NAME]
    assert load_checkpoint(cfg, UMN_NAME)["round"] == 1


def test_an_empty_checkpoint_is_named_and_called_empty(tmp_path):
    cfg = config(tmp_path / "run")
    path = Path(cfg.out_dir) / "checkpoints" / UMN_NAME
    path.parent.mkdir(parents=True)
    path.touch()
    with pytest.raises(CheckpointError, match="is empty") as err:
        load_checkpoint(cfg, UMN_NAME)
    assert str(path) in str(err.value)


def test_a_truncated_checkpoint_is_one_line_naming_the_file(tmp_path):
    cfg = config(tmp_path / "run")
    path = real_checkpoint(cfg)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="cannot be read as a checkpoint") as err:
        read_checkpoint(path)
    message = str(err.value)
    assert str(path) in message and "\n" not in message
    assert err.value.__cause__ is None  # no chained torch traceback


def test_a_foreign_file_is_not_a_fedseg_checkpoint(tmp_path):
    path = tmp_path / "umn.pt"
    torch.save({"weights": torch.ones(2)}, path)
    with pytest.raises(CheckpointError, match="not a fedseg checkpoint"):
        read_checkpoint(path)
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        read_checkpoint(tmp_path / "absent.pt")


def finished_run(out: Path) -> None:
    (out / "checkpoints").mkdir(parents=True)
    (out / "checkpoints" / UMN_NAME).write_bytes(b"x")
    (out / "keys").mkdir()
    (out / "keys" / "federation.key").write_text("k")
    (out / "metrics.json").write_text("{}")
    (out / "notes.txt").write_text("mine")  # not a run's output


def test_a_run_refuses_another_runs_results_folder(tmp_path):
    out = tmp_path / "run"
    assert claim_out_dir(config(out)) == []  # a new folder
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert claim_out_dir(config(out)) == []  # a folder without a run's outputs
    finished_run(out / "done")
    with pytest.raises(ResultsFolderError, match="already holds a run") as err:
        claim_out_dir(config(out / "done"))
    assert str(out / "done") in str(err.value) and "--overwrite" in str(err.value)
    assert (out / "done" / "metrics.json").read_text() == "{}"  # nothing was touched


def test_resume_keeps_and_overwrite_replaces_only_the_runs_outputs(tmp_path):
    out = tmp_path / "run"
    finished_run(out)
    resume = config(out)
    resume.resume = True
    assert claim_out_dir(resume) == []
    assert (out / "metrics.json").exists()
    with pytest.raises(ResultsFolderError, match="choose one"):
        claim_out_dir(resume, overwrite=True)
    removed = claim_out_dir(config(out), overwrite=True)
    assert sorted(p.name for p in removed) == ["checkpoints", "keys", "metrics.json"]
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]


def test_overwrite_never_removes_the_users_key_folder(tmp_path):
    out = tmp_path / "run"
    finished_run(out)
    cfg = config(out, key_dir=str(out / "keys"))  # the user's keys, named in the scenario
    removed = claim_out_dir(cfg, overwrite=True)
    assert "keys" not in [p.name for p in removed]
    assert (out / "keys" / "federation.key").read_text() == "k"


def test_a_results_path_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "run").write_text("")
    with pytest.raises(ResultsFolderError, match="is a file"):
        claim_out_dir(config(tmp_path / "run"))


def test_audit_copies_are_numbered_whole_and_never_replaced(tmp_path):
    first = keep_copy(tmp_path / "site", "finetune.forward", {"z": np.ones(3)}, ["a"])
    second = keep_copy(tmp_path / "site", "finetune.forward", {"z": np.zeros(3)}, [])
    assert [first.name, second.name] == ["0000_finetune_forward.npz", "0001_finetune_forward.npz"]
    assert np.load(first)["z"].tolist() == [1, 1, 1]
    first.unlink()  # one copy fewer: the next number (1) is taken by the second copy
    third = keep_copy(tmp_path / "site", "finetune.forward", {"z": np.full(3, 2.0)}, [])
    assert third.name == "0002_finetune_forward.npz"  # not over the second: after it
    assert np.load(second)["z"].tolist() == [0, 0, 0]
    assert not [p for p in (tmp_path / "site").iterdir() if p.suffix == ".tmp"]


def test_flwr_run_claims_the_results_folder_like_the_cli(tmp_path):
    """``flwr run .`` (the ServerApp's run config): refused unless resume or overwrite is set;
    ``overwrite`` is declared in pyproject.toml, since a SuperLink refuses undeclared keys."""
    import tomllib

    from server.app import APP_DIR, claimed_config

    declared = tomllib.loads((APP_DIR / "pyproject.toml").read_text())["tool"]["flwr"]["app"]
    assert declared["config"]["overwrite"] is False and declared["config"]["resume"] is False
    out = tmp_path / "run"
    assert claimed_config({"out-dir": str(out), "quick": True}).out_dir == str(out)  # new folder
    finished_run(out)
    with pytest.raises(ResultsFolderError, match="already holds a run") as err:
        claimed_config({"out-dir": str(out), "quick": True})
    assert "overwrite=true" in str(err.value)
    assert (out / "metrics.json").exists()  # nothing touched
    assert claimed_config({"out-dir": str(out), "resume": True}).resume
    assert (out / "metrics.json").exists()
    with pytest.raises(ResultsFolderError, match="choose one"):
        claimed_config({"out-dir": str(out), "resume": True, "overwrite": True})
    claimed_config({"out-dir": str(out), "overwrite": True})
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
