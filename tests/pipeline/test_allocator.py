"""The allocator policy: freed memory kept for small models, handed back for large ones."""

import sys

import pytest

from pipeline import allocator
from tests.pathpatch.conftest import tiny_model


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt only")
def test_freed_memory_is_kept_for_small_models_and_returned_for_large_ones(monkeypatch):
    model = tiny_model("mlp")
    assert allocator.fit_to_model(model) is True  # a few KB of weights
    monkeypatch.setattr(allocator, "LARGE_MODEL_BYTES", 0)
    assert allocator.fit_to_model(model) is False  # glibc's defaults restored
    monkeypatch.undo()
    assert allocator.fit_to_model(model) is True  # and kept again for the next small model
