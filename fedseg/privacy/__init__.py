"""Keys and keyed transforms; nothing in here ever leaves the hospital that owns it.

The transforms (torch) load on first use: a deployed hospital's ClientApp runs in a process
started for every message, and its guard needs only the keys (``fedseg/privacy/audit.py``)."""

from importlib import import_module

from fedseg.privacy.keys import (
    KeyFileError,
    KeyRing,
    LatentKey,
    generate_secret,
    load_or_create_key,
    read_key_file,
    write_key_file,
)

_LAZY = {"LatentTransform": "klt", "apply_klt": "klt", "invert_klt": "klt"}

__all__ = [
    "KeyFileError",
    "KeyRing",
    "LatentKey",
    "LatentTransform",
    "apply_klt",
    "generate_secret",
    "invert_klt",
    "load_or_create_key",
    "read_key_file",
    "write_key_file",
]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(f"fedseg.privacy.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'fedseg.privacy' has no attribute {name!r}")
