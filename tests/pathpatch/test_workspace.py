"""The workspace hands a buffer out again only once nothing views it, and holds no more than
what is in use at its fullest."""

import torch

from pathpatch.engine import workspace
from pathpatch.engine.workspace import Workspace

LIKE = torch.empty(0)


def test_a_buffer_is_handed_out_again_only_once_no_tensor_views_it(monkeypatch):
    monkeypatch.setattr(workspace, "LARGE_BYTES", 0)
    ws = Workspace()
    a = ws.empty((4, 8), LIKE)
    first, view = a.data_ptr(), a[1:, 2:]
    del a
    b = ws.empty((4, 8), LIKE)
    assert b.data_ptr() != first, "handed out while a view of it was alive"
    del view
    c = ws.empty((2, 16), LIKE)  # a's memory, free now
    assert c.data_ptr() == first and c.is_contiguous() and c.shape == (2, 16)
    assert ws.nbytes == 2 * 32 * 4
    smaller = ws.empty((3, 5), LIKE)  # nothing free: a new buffer
    del smaller
    reused = ws.empty((2, 7), LIKE)
    assert ws.nbytes == (2 * 32 + 15) * 4 and reused.numel() == 14


def test_free_buffers_too_small_for_a_request_are_let_go(monkeypatch):
    monkeypatch.setattr(workspace, "LARGE_BYTES", 0)
    ws = Workspace()
    small, kept = ws.empty((10,), LIKE), ws.empty((20,), LIKE)
    del small
    big = ws.empty((100,), LIKE)
    assert ws.nbytes == (20 + 100) * 4  # the free 10 went; the 20 still in use stays
    del kept, big
    assert ws.empty((50,), LIKE).numel() == 50 and ws.nbytes == (20 + 100) * 4


def test_small_blocks_are_left_to_the_allocator():
    ws = Workspace()
    t = ws.empty((16,), LIKE)
    assert t.shape == (16,) and ws.nbytes == 0
    other = torch.empty(0, dtype=torch.float64)
    n = workspace.LARGE_BYTES // 8
    assert ws.empty((n,), other).dtype == torch.float64 and ws.nbytes == n * 8
