"""The engine's large temporaries, reused across stages and groups instead of freed.

A group's bank, a stage's mixing sources (bases and bank entries stacked for one product) and
its mixing output are hundreds of MB each on the larger models. Freed and allocated again,
blocks that large come back from glibc as fresh pages (it maps every block of 32 MiB and more on
its own), and where the process hands freed memory back to the OS (`pipeline/allocator.py` does
when keeping it would not fit) or a VM's balloon takes freed pages back, touching fresh pages
costs more than the product written into them (docs/MEASUREMENTS.md). A `Workspace` keeps the
large buffers it handed out and hands one out again once no tensor views its memory any more: it
never holds more than its largest set of buffers in use at once.
"""

from __future__ import annotations

import math

import torch

LARGE_BYTES = 32 * 2**20
"""Blocks from this size up come from the workspace; glibc reuses smaller freed blocks itself."""


def _storage_uses(t: torch.Tensor) -> int:
    # the check TorchInductor's CUDA graph trees make before reusing a block
    return torch._C._storage_Use_Count(t.untyped_storage()._cdata)


_UNVIEWED = _storage_uses(torch.empty(1))
"""What `_storage_uses` reads for a buffer no other tensor views."""


class Workspace:
    """Buffers of large temporaries, each handed out again once nothing views it.

    Hand one to every group of an evaluation, and keep it across evaluations of one model
    (`engine.ModelState`, with the `FoldedWeights`); what it holds is freed with it.
    """

    def __init__(self):
        self._buffers: list[torch.Tensor] = []  # flat

    def empty(self, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        """An uninitialized contiguous tensor of `shape`, with `like`'s dtype and device."""
        n = math.prod(shape)
        if n * like.element_size() < LARGE_BYTES:
            return like.new_empty(shape)
        free = [b for b in self._buffers if b.dtype == like.dtype and b.device == like.device
                and _storage_uses(b) == _UNVIEWED]
        fits = [b for b in free if b.numel() >= n]
        if fits:
            return min(fits, key=torch.Tensor.numel)[:n].view(shape)
        # every free buffer is too small: let them go, so what is held stays what is in use
        self._buffers = [b for b in self._buffers if not any(b is f for f in free)]
        buffer = like.new_empty(n)
        self._buffers.append(buffer)
        return buffer.view(shape)

    @property
    def nbytes(self) -> int:
        """Bytes held, in use or not."""
        return sum(b.numel() * b.element_size() for b in self._buffers)
