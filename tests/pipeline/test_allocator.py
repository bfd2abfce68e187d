"""The allocator policy: freed memory kept where its worst case fits, handed back otherwise."""

import sys

import pytest

from pipeline import allocator
from tests.pathpatch.conftest import tiny_model


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt only")
def test_freed_memory_is_kept_where_the_worst_case_fits_and_handed_back_where_not():
    model = tiny_model("mlp")
    memory = allocator.machine_memory()
    assert 0 < memory
    assert allocator.fit_to_model(model, 2**20) is True  # a few KB of weights, a 1 MiB budget
    # weights + FRAGMENTATION x budget beyond the usable memory: glibc hands big blocks back
    assert allocator.fit_to_model(model, memory) is False
    # a worker given a tenth of the machine: a budget of a quarter no longer fits
    assert allocator.fit_to_model(model, memory // 4, share=0.1) is False
    assert allocator.fit_to_model(model, 2**20) is True  # and kept again for the next small model
