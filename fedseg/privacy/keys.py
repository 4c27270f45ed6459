"""Client secrets and the keys derived from them.

A hospital holds one 256-bit secret in a key file readable only by its owner (mode 0600).
Every transform key is derived from it with HKDF-SHA256 under a label naming the role (image or
mask latents) and the scale, so keys for different purposes are independent and nothing but
the secret ever needs to be stored. No object here prints its key material.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from fedseg.atomic import write_text_atomic
from fedseg.deploy.runtime import node_out_dir

if TYPE_CHECKING:
    from fedseg.config import RunConfig

SECRET_BYTES = 32
KEY_FILE_HEADER = "fedseg-secret-v1"
ROLES = ("image", "mask")


class KeyFileError(ValueError):
    """A key file is missing, malformed or readable by others."""


def generate_secret() -> bytes:
    return secrets.token_bytes(SECRET_BYTES)


def simulated_secret(seed: int, owner: str) -> bytes:
    """A simulated hospital's secret, derived from the run's seed (``training.seed``) and its
    owner ("federation" or a site name), so two runs with one seed draw the same keys and give
    the same figures. Anyone who knows the seed knows this secret: it is for simulations only,
    where one machine plays every party; a real hospital's secret comes from ``fedseg keygen``.
    """
    return derive_bytes(f"fedseg/simulation-seed/{int(seed)}".encode(), f"simulated-key/{owner}")


def needs_secret(cfg: RunConfig) -> bool:
    """Whether a site of this run holds a secret."""
    return (
        cfg.privacy.transform != "none"
        or cfg.training.finetune_share == "blind"
        or cfg.mode == "inr"  # its code mixing is drawn from the secret
    )


def site_key_file(cfg: RunConfig, node_config: dict, name: str) -> Path | None:
    """Where site ``name``'s secret is: its node config's ``key-file``, else (a simulated
    hospital that needs one) its own, or the federation's, in the run's keys folder. Known
    without the site's data or torch, for the guard of every reply."""
    if "key-file" in node_config:
        return Path(str(node_config["key-file"]))
    if not needs_secret(cfg) or "partition-id" not in node_config:
        return None
    owner = "federation" if cfg.privacy.key_scope == "federation" else name
    out_dir = node_out_dir(cfg.out_dir, node_config)
    return Path(cfg.privacy.key_dir or out_dir / "keys") / f"{owner}.key"


def write_key_file(path: str | Path, secret: bytes | None = None, overwrite: bool = False) -> Path:
    """Create a key file: mode 0600 from the first byte on, written whole or not at all, and
    (without ``overwrite``) never replacing an existing one, even one created meanwhile."""
    path = Path(path)
    secret = generate_secret() if secret is None else secret
    if len(secret) != SECRET_BYTES:
        raise KeyFileError(f"a secret has {SECRET_BYTES} bytes, got {len(secret)}")
    if path.is_dir():
        raise KeyFileError(f"key file {path} is a directory; give a file name")
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)  # a new key folder: owner only
    text = f"{KEY_FILE_HEADER}:{secret.hex()}\n"
    try:
        write_text_atomic(path, text, mode=0o600, replace=overwrite)
    except FileExistsError as err:
        raise KeyFileError(f"key file {path} exists; refusing to overwrite a secret") from err
    return path


def read_key_file(path: str | Path) -> bytes:
    """The secret in a key file; every problem is a KeyFileError naming the file (and never
    showing its content)."""
    path = Path(path)
    if path.is_dir():
        raise KeyFileError(f"key file {path} is a directory, not a key file")
    if not path.is_file():
        raise KeyFileError(
            f"key file not found: {path} (create one with `fedseg keygen --out {path}`)"
        )
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        raise KeyFileError(f"key file {path} has mode {mode:o}; it must be 600 (chmod 600 {path})")
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise KeyFileError(f"key file {path} cannot be read: {err.strerror}") from None
    try:
        text = raw.decode("ascii").strip()
    except UnicodeDecodeError:
        text = ""  # binary: not a key file (its bytes are not shown)
    header, _, body = text.partition(":")
    try:
        secret = bytes.fromhex(body)
    except ValueError:
        secret = b""
    if header != KEY_FILE_HEADER or len(secret) != SECRET_BYTES:
        raise KeyFileError(f"key file {path} is not a fedseg secret ({KEY_FILE_HEADER}:<64 hex>)")
    return secret


def load_or_create_key(path: str | Path, secret: bytes | None = None) -> bytes:
    """What a simulated hospital does on first start: make its secret (``secret``, e.g.
    :func:`simulated_secret`, else a random one), then reuse the file. Several simulated sites
    may start at once: the file is created whole and never replaced, so none reads a
    half-written secret or replaces another's."""
    path = Path(path)
    if not path.exists():
        try:
            write_key_file(path, secret)
        except KeyFileError:
            if not path.is_file():
                raise
            # another site made it first: use theirs
    return read_key_file(path)


FINGERPRINT_FILE = "key-fingerprint"


def key_fingerprint(secret: bytes) -> str:
    """A public name for a secret (HMAC of a fixed label): it tells keys apart, reveals none."""
    return hmac.new(secret, b"fedseg/key-fingerprint/v1", hashlib.sha256).hexdigest()[:16]


def bind_key(folder: str | Path, key_file: str | Path, record: bool = True) -> str:
    """Check ``key_file`` against the fingerprint kept in ``folder`` (a site's models), and
    record it there if none is yet (``record``). A wrong key gives Dice 0 with no other sign,
    so it is refused here, before any work."""
    fingerprint = key_fingerprint(read_key_file(key_file))
    path = Path(folder) / FINGERPRINT_FILE
    if path.is_file():
        known = path.read_text().strip()
        if known != fingerprint:
            raise KeyFileError(
                f"key file {key_file} (fingerprint {fingerprint}) is not the key the models in "
                f"{folder} were trained with (fingerprint {known})"
            )
    elif record:
        write_text_atomic(path, fingerprint + "\n")
    return fingerprint


def derive_bytes(secret: bytes, label: str, length: int = 32) -> bytes:
    return HKDF(
        algorithm=hashes.SHA256(), length=length, salt=b"fedseg", info=label.encode()
    ).derive(secret)


@dataclass(frozen=True, repr=False)
class LatentKey:
    """KLT key of one (role, scale): z' = P Q z + b over channels; ``mixing`` holds P Q."""

    mixing: np.ndarray  # (C, C) orthogonal, float64
    bias: np.ndarray  # (C,) float64
    rotation: np.ndarray  # Q, kept so leak checks can look for it too
    permutation: np.ndarray  # P as an index array

    def __repr__(self) -> str:
        return f"LatentKey(channels={self.mixing.shape[0]}, <secret>)"


def derive_latent_key(
    secret: bytes, role: str, scale: int, channels: int, bias_scale: float
) -> LatentKey:
    """Q from the QR of a seeded Gaussian (signs fixed so Q is unique), P a permutation, b bias."""
    if role not in ROLES:
        raise ValueError(f"role must be one of {ROLES}, got {role!r}")
    seed = int.from_bytes(derive_bytes(secret, f"klt/{role}/scale{scale}"), "big")
    rng = np.random.default_rng(seed)
    q, r = np.linalg.qr(rng.standard_normal((channels, channels)))
    q = q * np.sign(np.diag(r))[None, :]
    perm = rng.permutation(channels)
    bias = rng.standard_normal(channels) * bias_scale
    return LatentKey(mixing=q[perm], bias=bias, rotation=q, permutation=perm)


@dataclass(frozen=True, repr=False)
class KeyRing:
    """All KLT keys of one hospital: ``keys[role][scale]``."""

    keys: dict[str, list[LatentKey]]

    @classmethod
    def from_secret(
        cls, secret: bytes, channels: int, scales: int = 3, bias_scale: float = 1.0
    ) -> KeyRing:
        return cls(
            {
                role: [
                    derive_latent_key(secret, role, s, channels, bias_scale) for s in range(scales)
                ]
                for role in ROLES
            }
        )

    def __repr__(self) -> str:
        return "KeyRing(<secret>)"
