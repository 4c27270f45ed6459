"""What a run keeps on the server's disk so that a killed run can resume where it stopped.

Two files under ``<out_dir>/checkpoints``: ``latents.pt`` (what the sites sent, written once
after collection) and ``umn.pt`` (UMN weights, optimizer and round, written after every round).
Both carry the run's config; a checkpoint made with a different config is refused, because
resuming it would silently mix two experiments. Neither file holds key material.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from fedseg.config import ConfigError, RunConfig, config_from_dict

UMN_NAME = "umn.pt"
LATENTS_NAME = "latents.pt"

# Settings that do not change what the federation computes: they may differ on resume.
_IGNORED = {
    ("out_dir",),
    ("resume",),
    ("overlays_per_site",),
    ("baselines",),
    ("attack",),
    ("privacy", "audit_dir"),
    ("federation", "node_wait_s"),
    ("federation", "message_timeout_s"),
    ("federation", "client_cpus"),
    # Fine-tuning runs after every checkpointed phase: a resumed run may add or change it.
    ("training", "finetune_epochs"),
    ("training", "finetune_lr"),
    ("training", "finetune_share"),
}


class CheckpointMismatch(ConfigError):
    """A checkpoint exists but was made with another configuration."""


def checkpoint_dir(cfg: RunConfig) -> Path:
    return Path(cfg.out_dir) / "checkpoints"


def comparable(config: dict[str, Any], path: tuple[str, ...] = ()) -> dict[str, Any]:
    """The config with the settings in ``_IGNORED`` removed."""
    out = {}
    for key, value in config.items():
        where = (*path, key)
        if where in _IGNORED:
            continue
        out[key] = comparable(value, where) if isinstance(value, dict) else value
    return out


def differences(a: dict[str, Any], b: dict[str, Any], prefix: str = "") -> list[str]:
    """``section.field: old -> new`` for every value that differs."""
    out = []
    for key in sorted(set(a) | set(b)):
        va, vb = a.get(key), b.get(key)
        name = f"{prefix}{key}"
        if isinstance(va, dict) and isinstance(vb, dict):
            out += differences(va, vb, f"{name}.")
        elif va != vb:
            out.append(f"{name}: {va!r} -> {vb!r}")
    return out


def check_config(path: Path, saved: dict[str, Any], cfg: RunConfig) -> None:
    try:  # a field added since the checkpoint was made counts as its default, not a change
        saved = config_from_dict(saved).to_dict()
    except ConfigError:
        pass  # unreadable as today's config: compare as saved, so the mismatch is reported
    diff = differences(comparable(saved), comparable(cfg.to_dict()))
    if diff:
        raise CheckpointMismatch(
            f"{path} was made with a different config ({'; '.join(diff[:5])}); "
            "resume with the same scenario, or use another --out to start afresh"
        )


def save_private(obj: Any, path: Path) -> Path:
    """Atomic write, mode 0600 (latents are a site's data under its key)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        torch.save(obj, handle)
    tmp.replace(path)
    return path


def load_checkpoint(cfg: RunConfig, name: str) -> dict[str, Any] | None:
    """A checkpoint file of this run, checked against ``cfg``; None if there is none."""
    path = checkpoint_dir(cfg) / name
    if not path.is_file():
        return None
    try:
        state = torch.load(path, weights_only=True)
    except Exception as err:  # a torn or foreign file: say which
        raise CheckpointMismatch(f"{path} cannot be read as a checkpoint: {err}") from err
    if not isinstance(state, dict) or "config" not in state:
        raise CheckpointMismatch(f"{path} is not a fedseg checkpoint (no config)")
    check_config(path, state["config"], cfg)
    return state


def check_not_finetuned(umn: dict[str, Any] | None, cfg: RunConfig) -> None:
    """A finished fine-tuning changed the sites' AEs: the kept latents no longer match them."""
    if umn and umn.get("finetuned"):
        raise CheckpointMismatch(
            f"{checkpoint_dir(cfg)}: this run's fine-tuning already finished (its sites' "
            "autoencoders and its UMN checkpoint are the fine-tuned ones); start a fresh run "
            "in another folder"
        )


def describe_resume(cfg: RunConfig) -> str:
    """Check the run's checkpoints before starting (a mismatch raises) and say what resumes."""
    latents = load_checkpoint(cfg, LATENTS_NAME)
    umn = load_checkpoint(cfg, UMN_NAME)
    if latents is None:
        return (
            f"resume: nothing collected yet in {checkpoint_dir(cfg)}; starting from the beginning"
        )
    check_not_finetuned(umn, cfg)
    done = int(umn["round"]) if umn else 0
    return (
        f"resume: collected latents and UMN round {done} of {cfg.training.umn_rounds} "
        f"from {checkpoint_dir(cfg)}"
    )


def fingerprint(cfg: RunConfig) -> str:
    """Short hash of what the federation computes; a site tags its saved AEs with it, so a
    resume never reuses autoencoders trained under another config."""
    import hashlib
    import json

    text = json.dumps(comparable(cfg.to_dict()), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]
