"""Executor pieces that need no cluster: pool sizing from cluster resources, and the scheduling
policy (shard affinity, queue depth, requeues, attempt accounting)."""

from __future__ import annotations

from pipeline.execution import ExecutorOptions, Schedule
from pipeline.ray_executor import size_pool
from pipeline.spec import Resources
from pipeline.worker import Evaluate


def test_pool_size_follows_gpus_then_cpus():
    assert size_pool(ExecutorOptions(), {"CPU": 16.0, "GPU": 4.0}, 100) == (4, 1.0)
    assert size_pool(ExecutorOptions(), {"CPU": 16.0}, 100) == (16, 0.0)
    assert size_pool(ExecutorOptions(Resources(threads_per_worker=4)), {"CPU": 16.0}, 100) == (4, 0.0)
    assert size_pool(ExecutorOptions(Resources(gpus_per_worker=0.5)), {"CPU": 8, "GPU": 2}, 100) == (4, 0.5)
    assert size_pool(ExecutorOptions(Resources(gpus_per_worker=0.0)), {"CPU": 2, "GPU": 2}, 100) == (2, 0.0)
    assert size_pool(ExecutorOptions(Resources(workers=3)), {"CPU": 1}, 100) == (3, 0.0)
    assert size_pool(ExecutorOptions(), {"CPU": 16.0}, 2) == (2, 0.0)  # no idle actors


def _schedule(layout: dict[str, int], max_attempts: int = 3, depth: int = 2) -> Schedule:
    tasks = [Evaluate(f"{shard}-{i}", shard, ()) for shard, n in layout.items() for i in range(n)]
    return Schedule(tasks, max_attempts=max_attempts, in_flight_per_worker=depth)


def test_a_worker_keeps_to_its_shard_then_takes_one_nobody_holds():
    s = _schedule({"A": 2, "B": 2, "C": 1})
    assert s.pick([], set()) == "A-0"
    assert s.pick(["A"], set()) == "A-1"  # more of the shard it holds
    assert s.pick(["A"], {"B"}) == "C-0"  # A is done; B is held by another worker
    assert s.pick(["C"], {"B"}) == "B-0"  # nothing fresh is left: share
    assert s.pick(["B", "A"], set()) == "B-1"  # its most recent shard first
    assert s.pick(["B"], set()) is None and not s.has_pending()


def test_queues_are_deep_only_while_plenty_is_left():
    s = _schedule({"A": 5}, depth=3)
    assert s.depth(n_workers=2) == 3  # 5 waiting > 2 per worker
    for _ in range(2):
        s.pick([], set())
    assert s.depth(n_workers=2) == 1  # 3 left: one call each, nobody waits behind a busy one


def test_a_failure_costs_an_attempt_unless_the_item_only_waited():
    s = _schedule({"A": 2}, max_attempts=2)
    first, second = s.pick([], set()), s.pick(["A"], set())
    assert (first, second) == ("A-0", "A-1") and s.attempt(first) == 1
    verdict = s.failed(first)  # it ran and failed: charged
    assert verdict.requeue and verdict.attempts == 1 and s.attempt(first) == 2
    assert s.failed(second, charged=False).attempts == 0  # queued behind it on a lost worker
    assert s.pick(["A"], set()) == "A-1" and s.pick(["A"], set()) == "A-0"  # requeued go first
    assert not s.failed(first).requeue  # second charged failure: given up, after 2 attempts
    assert s.finished(first) is False and s.finished(second) is True  # the shard is done
