"""What a run keeps on the server's disk so that a killed run can resume where it stopped.

Two files under ``<out_dir>/checkpoints``: ``latents.pt`` (what the sites sent, written once
after collection) and ``umn.pt`` (UMN weights, optimizer and round, written after every round).
Both carry the run's config; a checkpoint made with a different config is refused, because
resuming it would silently mix two experiments. Neither file holds key material.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch

from fedseg.atomic import torch_save_atomic
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


class CheckpointError(ConfigError):
    """A checkpoint file exists but cannot be used (empty, torn, foreign, another config)."""


class CheckpointMismatch(CheckpointError):
    """A checkpoint exists but was made with another configuration."""


class ResultsFolderError(ConfigError):
    """A run would write into a folder that holds another run's results."""


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
    """Atomic write (``fedseg.atomic``), mode 0600 (latents are a site's data under its key)."""
    return torch_save_atomic(obj, path, mode=0o600)


def read_checkpoint(path: Path) -> dict[str, Any]:
    """A fedseg checkpoint file, or a :class:`CheckpointError` naming it and saying what is
    wrong: missing, empty, torn or not a torch file, or not a fedseg checkpoint."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    if path.stat().st_size == 0:
        raise CheckpointError(
            f"{path} is empty (0 bytes): not a checkpoint; move it aside and resume or re-run"
        )
    try:
        state = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as err:  # a torn or foreign file: say which, in one line
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        reason = reason.split(". ")[0][:200]  # torch's first sentence says what failed
        raise CheckpointError(
            f"{path} cannot be read as a checkpoint (truncated or not a torch file: {reason})"
        ) from None
    if not isinstance(state, dict) or "config" not in state:
        raise CheckpointError(f"{path} is not a fedseg checkpoint (no config)")
    return state


def load_checkpoint(cfg: RunConfig, name: str) -> dict[str, Any] | None:
    """A checkpoint file of this run, checked against ``cfg``; None if there is none."""
    path = checkpoint_dir(cfg) / name
    if not path.exists():
        return None
    state = read_checkpoint(path)
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


# What a run writes into its results folder (``keys`` only where privacy.key_dir is unset).
RUN_OUTPUTS = ("metrics.json", "report.md", "figures", "checkpoints", "sites", "keys")


def run_outputs(cfg: RunConfig) -> list[Path]:
    """The entries of ``cfg.out_dir`` that a run wrote (and a new run would replace)."""
    out = Path(cfg.out_dir)
    names = [n for n in RUN_OUTPUTS if n != "keys" or not cfg.privacy.key_dir]
    return [out / n for n in names if (out / n).exists() or (out / n).is_symlink()]


def claim_out_dir(cfg: RunConfig, overwrite: bool = False) -> list[Path]:
    """Check, before anything is written, that a run may write into ``cfg.out_dir``.

    A folder holding another run's results is refused, unless the run resumes it
    (``cfg.resume``) or ``overwrite`` is given: then that run's outputs (metrics, report,
    figures, checkpoints, the simulated sites' models and seed-derived keys) are removed and
    returned; anything else in the folder is left alone. Key files in a ``privacy.key_dir`` of
    the user's are never touched.
    """
    out = Path(cfg.out_dir)
    if cfg.resume and overwrite:
        raise ResultsFolderError("--resume and --overwrite exclude each other: choose one")
    if out.exists() and not out.is_dir():
        raise ResultsFolderError(f"results folder {out} is a file, not a folder")
    found = run_outputs(cfg)
    if cfg.resume or not found:
        return []
    if not overwrite:
        names = ", ".join(p.name for p in found)
        raise ResultsFolderError(
            f"results folder {out} already holds a run ({names}): pass --resume to continue "
            "it, --overwrite to replace it, or --out for another folder"
        )
    for path in found:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
    return found
