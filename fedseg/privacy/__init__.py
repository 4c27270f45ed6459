"""Keys and keyed transforms; nothing in here ever leaves the hospital that owns it."""

from fedseg.privacy.keys import (
    KeyFileError,
    KeyRing,
    LatentKey,
    generate_secret,
    load_or_create_key,
    read_key_file,
    write_key_file,
)
from fedseg.privacy.klt import LatentTransform, apply_klt, invert_klt

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
