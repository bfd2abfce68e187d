"""Files that appear whole or not at all: written under a temporary name, fsynced, renamed over
the target, and the folder fsynced, so that a crash at any point leaves either the old file or
the new one, never half of one, and the rename itself survives a power cut.

The one implementation for every file the project writes that a later run trusts: datasets
(`pathpatch.data.pairs.save_parquet`) and a sweep folder's results, spec, manifest and reports
(`pipeline.store`).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

TEMP_MARK = ".tmp-"
"""In the name of every file being written: a folder scan skips (or clears) such leftovers."""


def fsync_dir(path: Path) -> None:
    """Make a rename (or an unlink) in folder `path` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sync_filesystem(path: Path) -> None:
    """Make every file written and renamed on `path`'s filesystem durable, in one call (Linux's
    `syncfs`; `os.sync` elsewhere): the barrier of a batch of `atomic_write(sync=False)`."""
    fd = os.open(path, os.O_RDONLY)
    try:
        if _syncfs is None or _syncfs(fd) != 0:
            os.sync()
    finally:
        os.close(fd)


def _libc_syncfs() -> Callable[[int], int] | None:
    try:
        import ctypes

        return ctypes.CDLL(None, use_errno=True).syncfs
    except (OSError, AttributeError):  # not Linux
        return None


_syncfs = _libc_syncfs()


def atomic_write(path: str | os.PathLike[str], write: Callable[[BinaryIO], None], *,
                 sync: bool = True) -> None:
    """Run `write(f)` on a temp file beside `path`, then fsync, rename and fsync the folder.

    `sync=False` skips both fsyncs: the file still appears whole or not at all to every
    process (a killed writer leaves only a temp file), but a power cut may lose or damage it
    until the caller's next `sync_filesystem`; trust such a file only after that barrier.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}{TEMP_MARK}{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            if sync:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # only left when something failed before the rename
        raise
    if sync:
        fsync_dir(path.parent)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes, *, sync: bool = True) -> None:
    """`atomic_write` of a bytes object."""
    atomic_write(path, lambda f: f.write(data), sync=sync)
