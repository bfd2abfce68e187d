"""Keep freed memory in the process instead of handing it back to the OS (glibc only).

The engine allocates and frees tensors of tens to hundreds of MB at every stage. Served from
fresh mmap'd pages, each costs the kernel's zero-filling on first touch, which on CPU costs more
than the arithmetic done on them (docs/MEASUREMENTS.md). With mmap and trimming off, freed
blocks are simply reused and the resident size stays at its peak; but the heap fragments
(blocks of hundreds of MB in many sizes), and the resident size beside the weights grows to up
to `FRAGMENTATION` times the engine's memory budget. So `fit_to_model` keeps freed memory only
where that worst case fits the process's share of the machine's memory, and otherwise hands
blocks of 32 MiB and more back to the OS (what glibc's own adaptive threshold settles at, which
a `mallopt` call switches off). Process-wide, so only the CLI and the workers call these, never
the library.
"""

from __future__ import annotations

import ctypes
import functools
import os
import sys
from pathlib import Path

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_MMAP_MAX = -4
_GLIBC_MMAP_MAX = 65536  # glibc's default
_HAND_BACK_MMAP_THRESHOLD = 32 * 2**20  # glibc's adaptive threshold's ceiling on 64-bit
_HAND_BACK_TRIM_THRESHOLD = 64 * 2**20

FRAGMENTATION = 2.0
"""Resident size beside the weights with freed memory kept, per byte of memory budget, rounded
up from what was measured (1.7 for a Llama-3.2-1B shape; docs/MEASUREMENTS.md)."""
USABLE_MEMORY = 0.7
"""Fraction of the machine's (or the cgroup's) memory the worst case may plan for: at 0.75 a
Llama-3.2-1B shape at a 6 GiB budget kept freed memory on 23.5 GiB and `bench engine`'s hook
baseline, which the budget does not bound, was killed for memory."""


@functools.cache
def keep_freed_memory() -> bool:
    """Tune glibc malloc to reuse freed memory (once per process); False where not possible."""
    libc = _libc()
    if libc is None:
        return False
    return bool(libc.mallopt(_M_MMAP_MAX, 0)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))


@functools.cache
def _libc():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.gnu_get_libc_version  # noqa: B018 - glibc only (musl has no mallopt knobs)
    except (OSError, AttributeError):
        return None
    return libc


def machine_memory() -> int:
    """Bytes of memory this process may use: the machine's, or its cgroup's limit if lower."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
    except OSError:
        return total
    return min(total, int(limit)) if limit.isdigit() else total


def fit_to_model(model, memory_budget: int, share: float = 1.0) -> bool:
    """Keep freed memory if the model's weights plus `FRAGMENTATION` x `memory_budget` fit in
    `share` (this process's part of the machine) of `USABLE_MEMORY`; otherwise hand big
    blocks back to the OS. Returns whether freed memory is kept."""
    libc = _libc()
    if libc is None:
        return False
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    if weights + FRAGMENTATION * memory_budget <= share * USABLE_MEMORY * machine_memory():
        return keep_freed_memory()
    libc.mallopt(_M_MMAP_MAX, _GLIBC_MMAP_MAX)
    libc.mallopt(_M_MMAP_THRESHOLD, _HAND_BACK_MMAP_THRESHOLD)
    libc.mallopt(_M_TRIM_THRESHOLD, _HAND_BACK_TRIM_THRESHOLD)
    keep_freed_memory.cache_clear()  # a later call sets it again (the next, smaller model)
    return False
