"""How work items are executed, as a contract: the `Executor` protocol, its options and stats,
the scheduling policy every executor shares (`Schedule`: pure, no Ray and no clock, so it is
tested on its own), and the in-process executor. The Ray executor is
`pipeline.ray_executor.RayExecutor`, the only Ray code.
"""

from __future__ import annotations

import time
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from pathpatch.data.pairs import PairDataset
from pipeline.spec import Execution, Resources
from pipeline.worker import Task, TaskInfo, Worker

if TYPE_CHECKING:
    import pyarrow as pa

OnDone = Callable[[Task, "pa.Table", TaskInfo], None]
"""Called on the driver with each result, in completion order; raising fails the attempt."""
OnFailed = Callable[[Task, str, int], None]
"""Called once per item that failed every attempt: (task, last error, attempts)."""
ShardData = Callable[[str], PairDataset]
"""A shard's examples by shard id."""


@dataclass(frozen=True)
class ExecutorOptions:
    """How the driver uses the cluster (never part of an item's identity): the spec's own
    `[resources]` and `[execution]` sections, plus what only the driver's loop needs.

    Attributes:
        resources: workers, GPUs and threads per worker (`pipeline.spec.Resources`).
        execution: attempts, timeouts and in-flight depth (`pipeline.spec.Execution`).
        poll_s: `ray.wait` timeout of the scheduling loop.
        grow_every_s: how often a run sized by the cluster (`workers` unset) looks for
            resources added since (nodes joining a shared cluster) and starts actors on them.
        warm_start: start every actor before submitting work, and time the run from then
            (benchmarks: excludes worker start-up).
    """

    resources: Resources = field(default_factory=Resources)
    execution: Execution = field(default_factory=Execution)
    poll_s: float = 0.5
    grow_every_s: float = 10.0
    warm_start: bool = False


@dataclass
class Counts:
    """What a driver run did, counted once: the executor counts the calls (evaluations,
    failures, requeues, worker starts, nodes, seconds), the driver the files (reused, redone)
    and the rows; a sweep's and a search's outcome are these counts and a few of their own.

    Attributes:
        evaluations: items computed and written in this run.
        reused: items whose file was already whole (a sweep's "already done", a search's
            "read back").
        failed: items that failed every attempt.
        requeues: retries (actor deaths, timeouts, errors).
        redone: broken result files found and computed again.
        worker_starts: workers started.
        nodes: node ids that held a worker for the run (a Ray node once its actor is up).
        seconds: time spent executing items, workers' start-up included (the cluster's
            excluded: `ray_start_seconds`, `ray_stop_seconds`).
        ray_start_seconds, ray_stop_seconds: starting (or joining) the Ray cluster and stopping
            (or leaving) it; 0 in process or inside a Ray session someone else opened.
        examples, rows: examples evaluated (per item, summed) and result rows written.
    """

    evaluations: int = 0
    reused: int = 0
    failed: int = 0
    requeues: int = 0
    redone: int = 0
    worker_starts: int = 0
    nodes: set[str] = field(default_factory=set)
    seconds: float = 0.0
    ray_start_seconds: float = 0.0
    ray_stop_seconds: float = 0.0
    examples: int = 0
    rows: int = 0


class Executor(Protocol):
    """Runs every task once, retrying faults, and reports each outcome through callbacks;
    its `stats` (`Counts`, the caller's when it passes them) accumulate over its runs."""

    stats: Counts

    def run(self, tasks: Sequence[Task], shard_data: ShardData, on_done: OnDone,
            on_failed: OnFailed) -> Counts: ...

    def close(self) -> None:
        """Release the workers; `run` may be called many times before (a search's rounds)."""


@dataclass(frozen=True)
class Verdict:
    """What a failed attempt leads to: another try (`requeue`) or a final failure."""

    requeue: bool
    attempts: int
    """Attempts the item has been charged so far."""


class Schedule:
    """Which item a worker runs next, how deep its queue is, and what a failure costs.

    Items wait in per-shard queues, in the tasks' order. A worker first takes more items of a
    shard it already holds (its cached runs and data are reused), then a shard no other worker
    holds, then any. Near the end only one call is queued per worker, so that no item waits
    behind a busy worker while another idles. A failure is charged an attempt unless the item
    only waited behind another that failed (`charged=False`); a requeued item goes first.
    """

    def __init__(self, tasks: Sequence[Task], *, max_attempts: int, in_flight_per_worker: int):
        self.tasks = {t.item_id: t for t in tasks}
        self.max_attempts = max_attempts
        self.in_flight_per_worker = in_flight_per_worker
        self.charged: dict[str, int] = dict.fromkeys(self.tasks, 0)
        # shards with items waiting, in order (a shard leaves when its queue empties): every
        # question below costs O(workers), never O(shards), at 10^5 items over 10^3 shards
        self.pending: OrderedDict[str, deque[str]] = OrderedDict()
        for t in tasks:
            self.pending.setdefault(t.shard_id, deque()).append(t.item_id)
        self.waiting = len(self.tasks)
        self._left = {shard_id: len(queue) for shard_id, queue in self.pending.items()}

    def has_pending(self) -> bool:
        return self.waiting > 0

    def depth(self, n_workers: int) -> int:
        """Calls to keep queued on each worker."""
        return self.in_flight_per_worker if self.waiting > 2 * n_workers else 1

    def pick(self, held: Sequence[str], held_elsewhere: set[str]) -> str | None:
        """The next item for a worker holding shards `held` (most recent last); None if none."""
        for shard_id in reversed(held):
            if shard_id in self.pending:
                return self._take(shard_id)
        if not self.pending:
            return None
        fresh = next((shard_id for shard_id in self.pending if shard_id not in held_elsewhere),
                     None)
        return self._take(fresh if fresh is not None else next(iter(self.pending)))

    def _take(self, shard_id: str) -> str:
        queue = self.pending[shard_id]
        item_id = queue.popleft()
        if not queue:
            del self.pending[shard_id]
        self.waiting -= 1
        return item_id

    def attempt(self, item_id: str) -> int:
        """The number of the attempt about to start (1 for the first)."""
        return self.charged[item_id] + 1

    def failed(self, item_id: str, *, charged: bool = True) -> Verdict:
        """Record a failed attempt: requeue the item first in line, or give it up (the caller
        then reports it and calls `finished`)."""
        if charged:
            self.charged[item_id] += 1
        attempts = self.charged[item_id]
        if attempts >= self.max_attempts:
            return Verdict(False, attempts)
        shard_id = self.tasks[item_id].shard_id
        self.pending.setdefault(shard_id, deque()).appendleft(item_id)
        self.pending.move_to_end(shard_id, last=False)
        self.waiting += 1
        return Verdict(True, attempts)

    def finished(self, item_id: str) -> bool:
        """Record that an item is done (or given up); True when its shard has nothing left."""
        shard_id = self.tasks[item_id].shard_id
        self._left[shard_id] -= 1
        return self._left[shard_id] == 0


class InProcessExecutor:
    """The same work, one item after another in this process (benchmarks, debugging)."""

    def __init__(self, worker: Worker, options: ExecutorOptions, *,
                 on_event: Callable[..., None] | None = None, stats: Counts | None = None):
        self.worker = worker
        self.options = options
        self.on_event = on_event or (lambda event, **fields: None)
        self.stats = stats if stats is not None else Counts()
        self.stats.worker_starts += 1
        self.stats.nodes.add(worker.node)

    def run(self, tasks: Sequence[Task], shard_data: ShardData, on_done: OnDone,
            on_failed: OnFailed) -> Counts:
        start = time.perf_counter()
        schedule = Schedule(tasks, max_attempts=self.options.execution.max_attempts,
                            in_flight_per_worker=1)
        held: list[str] = []
        while (item_id := schedule.pick(held, set())) is not None:
            task = schedule.tasks[item_id]
            try:
                data = None if self.worker.holds(task.shard_id) else shard_data(task.shard_id)
                table, info = self.worker.run(task, data)
                held = [task.shard_id]
                on_done(task, table, info)
            except Exception as err:  # noqa: BLE001 -- recorded per item, the sweep goes on
                self._failed(schedule, task, f"{type(err).__name__}: {err}", on_failed)
                continue
            self.stats.evaluations += 1
            schedule.finished(item_id)
        self.stats.seconds += time.perf_counter() - start
        return self.stats

    def close(self) -> None:
        """Nothing to release: the worker is this process's."""

    def _failed(self, schedule: Schedule, task: Task, error: str, on_failed: OnFailed) -> None:
        verdict = schedule.failed(task.item_id)
        if verdict.requeue:
            self.stats.requeues += 1
            self.on_event("requeued", item=task.item_id, attempts=verdict.attempts, error=error)
        else:
            self.stats.failed += 1
            on_failed(task, error, verdict.attempts)
            schedule.finished(task.item_id)
