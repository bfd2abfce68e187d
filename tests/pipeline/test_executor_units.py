"""Executor pieces that need no cluster: pool sizing from cluster resources."""

from __future__ import annotations

from pipeline.executor import ExecutorOptions, size_pool
from pipeline.spec import Resources


def test_pool_size_follows_gpus_then_cpus():
    assert size_pool(ExecutorOptions(), {"CPU": 16.0, "GPU": 4.0}, 100) == (4, 1.0)
    assert size_pool(ExecutorOptions(), {"CPU": 16.0}, 100) == (16, 0.0)
    assert size_pool(ExecutorOptions(Resources(threads_per_worker=4)), {"CPU": 16.0}, 100) == (4, 0.0)
    assert size_pool(ExecutorOptions(Resources(gpus_per_worker=0.5)), {"CPU": 8, "GPU": 2}, 100) == (4, 0.5)
    assert size_pool(ExecutorOptions(Resources(gpus_per_worker=0.0)), {"CPU": 2, "GPU": 2}, 100) == (2, 0.0)
    assert size_pool(ExecutorOptions(Resources(workers=3)), {"CPU": 1}, 100) == (3, 0.0)
    assert size_pool(ExecutorOptions(), {"CPU": 16.0}, 2) == (2, 0.0)  # no idle actors
