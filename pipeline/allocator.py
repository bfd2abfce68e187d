"""Keep freed memory in the process instead of handing it back to the OS (glibc only).

The engine allocates and frees tensors of tens of MB at every stage. By default glibc serves
each from fresh mmap'd pages that the kernel zero-fills on first touch, which on CPU costs
more than the arithmetic done on them (docs/MEASUREMENTS.md). With mmap and trimming off,
freed blocks are simply reused, and the resident size stays at its peak. On large models that
kept heap fragments (blocks of hundreds of MB in many sizes) and the resident size grows to
twice what the engine holds, so `fit_to_model` hands big blocks back to the OS again above
`LARGE_MODEL_BYTES` of weights: the memory budget then bounds what the process holds beside
its weights. Process-wide, so only the CLI and the workers call these, never the library.
"""

from __future__ import annotations

import ctypes
import functools
import sys

_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_GLIBC_MMAP_MAX = 65536  # glibc's defaults, restored by `fit_to_model`
_GLIBC_TRIM_THRESHOLD = 128 * 1024

LARGE_MODEL_BYTES = 2**30
"""Weights above this size: freed memory goes back to the OS (fragmentation would cost more
memory than the reuse saves time; docs/MEASUREMENTS.md)."""


@functools.cache
def keep_freed_memory() -> bool:
    """Tune glibc malloc to reuse freed memory (once per process); False where not possible."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.gnu_get_libc_version  # noqa: B018 - glibc only (musl has no mallopt knobs)
    except (OSError, AttributeError):
        return False
    return bool(libc.mallopt(_M_MMAP_MAX, 0)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))


@functools.cache
def _libc():
    return ctypes.CDLL("libc.so.6")


def fit_to_model(model) -> bool:
    """Keep freed memory for a model of at most `LARGE_MODEL_BYTES` of weights; above, restore
    glibc's defaults. Returns whether freed memory is kept."""
    if not keep_freed_memory():
        return False
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    if size <= LARGE_MODEL_BYTES:
        return True
    libc = _libc()
    libc.mallopt(_M_MMAP_MAX, _GLIBC_MMAP_MAX)
    libc.mallopt(_M_TRIM_THRESHOLD, _GLIBC_TRIM_THRESHOLD)
    keep_freed_memory.cache_clear()  # a later call sets it again (the next, smaller model)
    return False
