"""Session-wide teardown: leave nothing native alive for the interpreter's own shutdown."""

from __future__ import annotations

import gc
import sys


def pytest_sessionfinish(session, exitstatus) -> None:
    """Disconnect Ray and collect reference cycles (DuckDB connections with registered Arrow
    data, tensors) while every module is still intact: native objects freed during interpreter
    finalization, after their modules are torn down, are a known source of crashes at exit."""
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        ray.shutdown()
    gc.collect()
