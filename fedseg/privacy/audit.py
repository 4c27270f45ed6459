"""The last stop before a reply leaves a hospital: refuse key material, optionally keep a copy.

With ``privacy.audit_dir`` set, every payload a site sends is also written to
``<audit_dir>/<site>/NNNN_<message type>.npz`` so a hospital (or a test) can inspect exactly
what crossed the wire. Copies go through the atomic writer: a copy is whole or absent.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from fedseg.atomic import savez_atomic
from fedseg.config import RunConfig
from fedseg.privacy.keys import KeyRing, read_key_file
from fedseg.privacy.leakcheck import KeyMaterial


def numeric_lists(prefix: str, values: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """The list-valued entries of a metrics or config record as float64 arrays, so the key
    vector check sees a key row sent as a list of numbers, not only as an array."""
    out = {}
    for key, value in values.items():
        if (
            isinstance(value, (list, tuple))
            and value
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
        ):
            out[f"{prefix}.{key}"] = np.asarray(value, dtype=np.float64)
    return out


class KeyLeakError(RuntimeError):
    """A reply would have carried key material; it was not sent."""


@lru_cache(maxsize=4)
def _key_material(secret: bytes, channels: int, bias_scale: float) -> KeyMaterial:
    """Per process and secret (a simulation's actor serves several sites): the guard runs on
    every reply, and deriving this each time cost about 46 ms of a fine-tuning step's message."""
    ring = KeyRing.from_secret(secret, channels, bias_scale=bias_scale)
    return KeyMaterial(secret, ring)


def guard_and_audit(
    cfg: RunConfig,
    site: str,
    key_file: Path | None,
    message_type: str,
    arrays: dict[str, np.ndarray],
    texts: Iterable[str],
) -> None:
    texts = list(texts)
    findings = ckks_findings(arrays, ckks_secret_file(key_file, site) if key_file else None)
    # inr: the secret draws the code mixing, so it is looked for whatever the latent transform
    if key_file is not None and (cfg.privacy.transform != "none" or cfg.mode == "inr"):
        secret = read_key_file(key_file)
        material = _key_material(secret, cfg.model.latent_channels, cfg.privacy.bias_scale)
        findings += material.find(arrays, texts)
    if findings:
        raise KeyLeakError(f"{site}: refusing to send {message_type}: {'; '.join(findings[:5])}")
    if cfg.privacy.audit_dir:
        keep_copy(Path(cfg.privacy.audit_dir) / site, message_type, arrays, texts)


def ckks_secret_file(key_file: Path, site: str) -> Path:
    """Where a hospital keeps its CKKS secret context: beside its other secret."""
    return Path(key_file).with_name(f"{site}.ckks.key")


def ckks_findings(arrays: dict[str, np.ndarray], secret_file: Path | None = None) -> list[str]:
    """CKKS secret-key material in a payload: a serialised CKKS context that holds a secret
    key (whoever's), or this hospital's own secret key bytes (``secret_file``, if it has
    one). Only byte arrays can carry either, so other payloads cost nothing."""
    if not any(a.dtype == np.uint8 for a in arrays.values()):
        return []
    from fedseg.privacy.ckks import hospital_secret_bytes, secret_key_findings

    secret = hospital_secret_bytes(secret_file) if secret_file and secret_file.is_file() else None
    return secret_key_findings(arrays, secret)


def keep_copy(
    folder: Path, message_type: str, arrays: dict[str, np.ndarray], texts: list[str]
) -> Path:
    """``folder/NNNN_<type>.npz``, the next free number: written whole or not at all (a site
    killed mid-write leaves no torn copy) and never over an earlier copy."""
    folder.mkdir(parents=True, exist_ok=True)
    safe_type = message_type.replace(".", "_")
    payload = {"__texts__": np.array(json.dumps(texts)), **arrays}
    index = len(list(folder.glob("*.npz")))
    while True:
        try:
            return savez_atomic(folder / f"{index:04d}_{safe_type}.npz", payload, replace=False)
        except FileExistsError:
            index += 1  # another writer took this number: the copy goes after it
