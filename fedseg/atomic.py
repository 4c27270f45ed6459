"""Files written whole or not at all: a reader (or a run killed mid-write) never sees half.

Every file a run writes goes through :func:`write_atomic`: the data goes to a file in the
target's own folder (so the final step is a rename on one filesystem), is flushed and fsynced,
and only then takes the target's name; the folder is fsynced after the rename, so the new name
survives a power cut too.

Where the kernel supports it (Linux, ``O_TMPFILE``) the data is written to an *unnamed* file: a
process killed with SIGKILL while writing leaves nothing behind, because a file without a name
is freed when its last descriptor closes. It is given a name only when complete: directly the
target's (a file that must not exist yet, e.g. a key or an audit copy: ``replace=False``), or a
hidden ``.<name>.<pid>.<random>.tmp`` that is renamed over the target at once. Elsewhere the
data goes to such a named temp file from the start. Either way a temp file is removed on any
exception, and a temp file whose writer died (SIGKILL, power cut) is removed by the next write
to the same target.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import IO, Any

TMP_SUFFIX = ".tmp"
_NO_TMPFILE = {errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL, errno.ENOENT, errno.EACCES}


def _temp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}{TMP_SUFFIX}")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def remove_stale_temps(path: Path) -> list[Path]:
    """Remove the temp files of earlier writes to ``path`` whose writer no longer runs (it was
    killed between naming its temp file and the rename); returns what was removed."""
    removed = []
    for tmp in path.parent.glob(f".{path.name}.*{TMP_SUFFIX}"):
        pid = tmp.name[len(path.name) + 2 :].split(".", 1)[0]
        if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            tmp.unlink(missing_ok=True)
            removed.append(tmp)
    return removed


def _fsync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` durable (best effort: some filesystems refuse a dir fd)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _open_unnamed(folder: Path, mode: int) -> int | None:
    """An unnamed file in ``folder`` (``O_TMPFILE``), or None where not supported."""
    flag = getattr(os, "O_TMPFILE", None)
    if flag is None or not os.path.isdir("/proc/self/fd"):  # naming it later needs /proc
        return None
    try:
        return os.open(folder, flag | os.O_WRONLY, mode)
    except OSError as err:
        if err.errno in _NO_TMPFILE:
            return None
        raise


def _name_unnamed(fd: int, path: Path) -> None:
    """Link an ``O_TMPFILE`` file to ``path`` (linkat with AT_SYMLINK_FOLLOW; os.link uses
    linkat, not link, only when given a directory fd)."""
    folder = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.link(f"/proc/self/fd/{fd}", path.name, dst_dir_fd=folder, follow_symlinks=True)
    finally:
        os.close(folder)


def write_atomic(
    path: str | Path,
    write: Callable[[IO[bytes]], Any],
    mode: int = 0o644,
    replace: bool = True,
) -> Path:
    """Call ``write(handle)`` on a binary file that becomes ``path`` only once complete.

    ``mode`` is the final file's mode from the first byte on (0o600 for secrets and a site's
    data). ``replace=False``: ``path`` must not exist; if it does (or appears meanwhile),
    ``FileExistsError`` is raised and nothing is changed, so two processes creating the same
    file cannot replace each other's.
    """
    path = Path(path)
    folder = path.parent
    folder.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(path)
    fd = _open_unnamed(folder, mode)
    try:
        _write(path, write, mode, replace, fd)
    except FileExistsError:
        if replace:
            raise
        raise FileExistsError(errno.EEXIST, "file exists; not replaced", str(path)) from None
    return path


def _write(
    path: Path, write: Callable[[IO[bytes]], Any], mode: int, replace: bool, fd: int | None
) -> None:
    folder = path.parent
    named: Path | None = None
    if fd is None:
        named = _temp_name(path)
        fd = os.open(named, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as handle:
            os.fchmod(handle.fileno(), mode)  # the umask may have cleared bits of ``mode``
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
            if named is None:  # give the unnamed file a name while its descriptor is open
                if replace:
                    named = _temp_name(path)
                _name_unnamed(handle.fileno(), named or path)
        if named is not None:
            if replace:
                os.replace(named, path)
            else:
                os.link(named, path)  # FileExistsError if it exists: never replaced
                named.unlink()
            named = None
        _fsync_dir(folder)
    finally:
        if named is not None:
            with contextlib.suppress(OSError):
                named.unlink()


def write_bytes_atomic(
    path: str | Path, data: bytes, mode: int = 0o644, replace: bool = True
) -> Path:
    return write_atomic(path, lambda handle: handle.write(data), mode, replace)


def write_text_atomic(path: str | Path, text: str, mode: int = 0o644, replace: bool = True) -> Path:
    return write_bytes_atomic(path, text.encode("utf-8"), mode, replace)


def torch_save_atomic(obj: Any, path: str | Path, mode: int = 0o600) -> Path:
    """``torch.save`` through :func:`write_atomic`; 0600 by default, since a checkpoint or a
    site's models can reveal its data."""
    import torch

    return write_atomic(path, lambda handle: torch.save(obj, handle), mode)


def savez_atomic(
    path: str | Path, arrays: Mapping[str, Any], mode: int = 0o644, replace: bool = True
) -> Path:
    """``numpy.savez`` through :func:`write_atomic` (the name is kept as given: no ``.npz``
    is appended)."""
    import numpy as np

    return write_atomic(path, lambda handle: np.savez(handle, **arrays), mode, replace)


def savefig_atomic(figure: Any, path: str | Path, **kwargs: Any) -> Path:
    """A matplotlib figure through :func:`write_atomic`, in the format of ``path``'s suffix."""
    path = Path(path)
    fmt = kwargs.pop("format", path.suffix.lstrip(".") or "png")
    return write_atomic(path, lambda handle: figure.savefig(handle, format=fmt, **kwargs))
