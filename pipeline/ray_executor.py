"""Ray execution: a pool of model-holding actors fed by a small completion-order scheduler.

The only module that imports Ray. The driver keeps a bounded number of calls in flight per
actor, prefers an actor that already holds the item's shard, and handles results in the order
they complete (a `ray.wait` loop; no ActorPool, which gets stuck on dead actors). Actors
return Arrow tables; the caller's `on_done` writes them (the driver alone writes files).

Faults: an actor that dies (or whose node goes away) is replaced and its in-flight items are
requeued; the item that was running when it died is charged one attempt. An item that raises,
or runs past `item_timeout_s` (its actor is then killed and replaced), is retried until
`max_attempts`, then reported failed while the sweep goes on. Every `ray.wait`/`ray.get` has
a timeout, and actors that cannot start end the run with an error instead of a hang.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import ray
import ray.exceptions

from pathpatch.errors import PathPatchError
from pipeline.execution import Counts, ExecutorOptions, OnDone, OnFailed, Schedule, ShardData
from pipeline.worker import Task, TaskInfo, Worker, WorkerConfig

if TYPE_CHECKING:  # annotations only: result tables are built by the engine
    import pyarrow as pa

GET_TIMEOUT_S = 120.0
"""Longest wait to fetch a result that Ray already reported ready."""


class _Actor:
    """Ray actor body: one `Worker` (one model), fetching a shard only when it lacks it."""

    def __init__(self, config: WorkerConfig, worker_factory: Callable[..., Any] | None = None):
        self.node = ray.get_runtime_context().get_node_id()
        self.worker = (worker_factory or Worker)(config, node=self.node)

    def ready(self) -> tuple[str, int]:
        return self.node, os.getpid()

    def run(self, task: Task, shard_box: list) -> tuple[pa.Table, TaskInfo]:
        # The shard's ref travels inside a list so Ray does not fetch it for every call; only
        # an actor that does not hold the shard yet pulls it from the object store.
        data = None
        if not self.worker.holds(task.shard_id):
            data = ray.get(shard_box[0], timeout=GET_TIMEOUT_S)
        return self.worker.run(task, data)


_RemoteActor = ray.remote(max_restarts=0, max_task_retries=0)(_Actor)


@dataclass
class _Slot:
    """Driver-side state of one actor."""

    index: int
    handle: Any
    ready_ref: Any
    created: float
    ready: bool = False
    node: str = ""
    pid: int = 0
    inflight: deque = field(default_factory=deque)  # (ref, item_id)
    head_since: float = 0.0
    held: OrderedDict = field(default_factory=OrderedDict)  # shard ids, most recent last


@contextlib.contextmanager
def ray_session(address: str | None = None, *, stats: Counts | None = None,
                **local_kwargs: Any) -> Iterator[dict[str, Any]]:
    """Connect to a cluster (`address`, else RAY_ADDRESS) or start a local one; yield resources.

    A local cluster started here is shut down on exit; a connection to an existing one is
    only closed. Inside an already-initialized Ray (tests, notebooks) nothing is started. The
    seconds spent starting and stopping go to `stats` (`ray_start_seconds`,
    `ray_stop_seconds`), apart from the sweep's own.
    """
    if ray.is_initialized():
        yield ray.cluster_resources()
        return
    address = address or os.environ.get("RAY_ADDRESS") or None
    # The least Ray needs to run our actors: no dashboard, workers' output not forwarded
    # (their errors come back with the failed calls), Ray's own log lines at warning level.
    kwargs: dict[str, Any] = {"logging_level": logging.WARNING, "log_to_driver": False,
                              "configure_logging": True}
    if address:
        probe_address(address)
    started = time.perf_counter()
    try:
        if address:
            ray.init(address=address, **kwargs)
        else:
            # address="local": a new cluster of our own, never the last `ray start` one found
            # in /tmp/ray (which may be someone else's).
            local = {"num_cpus": os.cpu_count() or 1, "include_dashboard": False}
            local.update(local_kwargs)
            ray.init(address="local", **local, **kwargs)
    except (ConnectionError, RuntimeError, ValueError) as err:
        where = f"at {address!r}" if address else "locally"
        raise PathPatchError(
            f"could not start or reach a Ray cluster {where}: {err}; check the address (and "
            "RAY_ADDRESS), that the cluster is up (`ray status`), and that RAY_AUTH_MODE is the "
            "same for every Ray process of the cluster"
        ) from None
    if stats is not None:
        stats.ray_start_seconds += time.perf_counter() - started
    try:
        yield ray.cluster_resources()
    finally:
        stopping = time.perf_counter()
        ray.shutdown()
        if stats is not None:
            stats.ray_stop_seconds += time.perf_counter() - stopping


def probe_address(address: str, timeout_s: float = 10.0) -> None:
    """Fail fast when nothing listens at a host:port address (`ray.init` would wait for long)."""
    if "://" in address or address in ("auto", "local") or ":" not in address:
        return
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout_s):
            pass
    except (OSError, ValueError) as err:
        raise PathPatchError(
            f"no Ray cluster answers at {address!r} ({err}): check the address (the head's "
            "GCS host:port, as `ray start --head` printed it; also RAY_ADDRESS), or drop "
            "--address to start a local cluster"
        ) from None


def size_pool(options: ExecutorOptions, resources: dict[str, float], n_items: int
              ) -> tuple[int, float]:
    """(workers, gpus_per_worker) for this cluster; auto values follow its resources."""
    gpus = float(resources.get("GPU", 0.0))
    cpus = float(resources.get("CPU", 1.0))
    gpw = options.resources.gpus_per_worker if options.resources.gpus_per_worker is not None else (
        1.0 if gpus >= 1 else 0.0)
    if options.resources.workers is not None:
        workers = options.resources.workers
    elif gpw > 0:
        workers = max(1, int(gpus // gpw))
    else:
        workers = max(1, int(cpus // options.resources.threads_per_worker))
    return max(1, min(workers, n_items)), gpw


class RayExecutor:
    """Runs tasks on actors; reports each completion or final failure through callbacks."""

    def __init__(self, config: WorkerConfig, options: ExecutorOptions, *,
                 worker_factory: Callable[..., Any] | None = None,
                 on_event: Callable[..., None] | None = None, stats: Counts | None = None):
        self.config = config
        self.options = options
        self.worker_factory = worker_factory
        self.on_event = on_event or (lambda event, **fields: None)
        self.stats = stats if stats is not None else Counts()
        # the state of one `run`, all of it (set afresh by `run`)
        self._schedule = Schedule([], max_attempts=options.execution.max_attempts,
                                  in_flight_per_worker=options.execution.in_flight_per_worker)
        self._shard_data: ShardData | None = None
        self._shard_refs: dict[str, Any] = {}  # shard id -> its object in the store
        self._on_done: OnDone | None = None
        self._on_failed: OnFailed | None = None
        self._refs: dict[Any, tuple[_Slot, str | None]] = {}  # call -> (actor, item; None: start)
        self._slots: list[_Slot] = []
        self._gpus = 0.0  # per actor
        self._start_failures = 0  # in a row
        self._last_start_error = ""

    # --- public -----------------------------------------------------------------------------

    def run(self, tasks: Sequence[Task], shard_data: ShardData, on_done: OnDone,
            on_failed: OnFailed) -> Counts:
        """Evaluate every task once (retrying faults); return what happened.

        Args:
            tasks: the work, in preferred order.
            shard_data: a shard's examples by shard id (put in the object store once).
            on_done: called on the driver with each result, in completion order; if it raises,
                the item counts as a failed attempt.
            on_failed: called once per item that failed `max_attempts` times.

        Raises:
            PathPatchError: no actor could be started (resources, model, digest), with the
                last error and what to change.
        """
        start = time.perf_counter()
        self._schedule = Schedule(tasks, max_attempts=self.options.execution.max_attempts,
                                  in_flight_per_worker=self.options.execution.in_flight_per_worker)
        if shard_data is not self._shard_data:
            self._shard_refs = {}  # other data: shards are fetched again
        self._shard_data = shard_data
        self._on_done, self._on_failed = on_done, on_failed
        self._start_failures = 0
        self._last_start_error = ""

        # the pool outlives a run (later runs reuse its loaded models) and grows when a later
        # run has more items than an earlier one could use, or nodes join while it runs; it
        # never shrinks before `close()`
        self._grow(len(tasks))
        grown = time.monotonic()
        try:
            while self.options.warm_start and not all(s.ready for s in self._slots):
                self._wait_once()
                self._check_deadlines()
                if not self._slots:
                    raise PathPatchError(self._no_workers_message())
            start = time.perf_counter()
            while self._open_items():
                self._fill()
                self._wait_once()
                self._check_deadlines()
                if time.monotonic() - grown > self.options.grow_every_s:
                    self._grow(len(tasks), joining=True)
                    grown = time.monotonic()
                if not self._slots:
                    raise PathPatchError(self._no_workers_message())
        except BaseException:
            self.close()
            raise
        finally:
            self.stats.seconds += time.perf_counter() - start
        return self.stats

    def close(self) -> None:
        """Stop every actor and drop the shards from the object store."""
        for slot in self._slots:
            with contextlib.suppress(Exception):
                ray.kill(slot.handle, no_restart=True)
        self._slots = []
        self._refs = {}
        self._shard_refs = {}

    # --- actors -----------------------------------------------------------------------------

    def _grow(self, n_items: int, *, joining: bool = False) -> None:
        """Start actors up to what the cluster's resources now allow (`size_pool`): at a run's
        start (a later run with more items than an earlier one could use), and while it runs
        (`joining`) when nodes have joined, unless the spec fixes `workers`."""
        if joining and self.options.resources.workers is not None:
            return
        workers, gpus = size_pool(self.options, ray.cluster_resources(), n_items)
        if len(self._slots) >= workers:
            return
        self._gpus = gpus if not self._slots else self._gpus
        self.on_event("pool", workers=workers, gpus_per_worker=self._gpus,
                      threads_per_worker=self.options.resources.threads_per_worker)
        first = max((slot.index for slot in self._slots), default=-1) + 1
        for i in range(first, first + workers - len(self._slots)):
            self._slots.append(self._start_actor(i))

    def _start_actor(self, index: int) -> _Slot:
        handle = _RemoteActor.options(
            num_cpus=self.options.resources.threads_per_worker, num_gpus=self._gpus,
            scheduling_strategy="SPREAD",
        ).remote(self.config, self.worker_factory)
        slot = _Slot(index=index, handle=handle, ready_ref=handle.ready.remote(),
                     created=time.monotonic())
        self._refs[slot.ready_ref] = (slot, None)
        self.stats.worker_starts += 1
        return slot

    def _replace(self, slot: _Slot) -> None:
        with contextlib.suppress(Exception):
            ray.kill(slot.handle, no_restart=True)
        self._slots.remove(slot)
        if self._start_failures >= self.options.execution.max_attempts:
            return  # actors keep failing to start: stop replacing; run() reports it
        self._slots.append(self._start_actor(slot.index))
        self.on_event("worker_replaced", worker=slot.index, node=slot.node)

    def _no_workers_message(self) -> str:
        need = f"{self.options.resources.threads_per_worker} CPU" + (
            f" + {self._gpus:g} GPU" if self._gpus else "")
        return (
            f"no worker could be started ({self._start_failures} failed starts; each needs "
            f"{need}; the cluster has {ray.cluster_resources()}): "
            f"{self._last_start_error or 'start timed out'}; lower resources.workers / "
            "gpus_per_worker / threads_per_worker, or fix the model so it loads on every node"
        )

    # --- scheduling -------------------------------------------------------------------------

    def _open_items(self) -> bool:
        return self._schedule.has_pending() or any(s.inflight for s in self._slots)

    def _fill(self) -> None:
        depth = self._schedule.depth(len(self._slots))
        for slot in list(self._slots):
            while slot.ready and len(slot.inflight) < depth:
                held_elsewhere = {sid for s in self._slots if s is not slot for sid in s.held}
                item_id = self._schedule.pick(list(slot.held), held_elsewhere)
                if item_id is None:
                    return
                self._submit(slot, item_id)

    def _submit(self, slot: _Slot, item_id: str) -> None:
        task = self._schedule.tasks[item_id]
        if task.shard_id not in self._shard_refs:
            self._shard_refs[task.shard_id] = ray.put(self._shard_data(task.shard_id))
        ref = slot.handle.run.remote(task, [self._shard_refs[task.shard_id]])
        if not slot.inflight:
            slot.head_since = time.monotonic()
        slot.inflight.append((ref, item_id))
        slot.held[task.shard_id] = True
        slot.held.move_to_end(task.shard_id)
        self._refs[ref] = (slot, item_id)
        self.on_event("submitted", item=item_id, worker=slot.index, node=slot.node,
                      pid=slot.pid, attempt=self._schedule.attempt(item_id))

    def _wait_once(self) -> None:
        refs = list(self._refs)
        if not refs:
            return
        ready, _ = ray.wait(refs, num_returns=1, timeout=self.options.poll_s)
        if ready:
            ready, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
        for ref in ready:
            if ref in self._refs:  # a death handled earlier in this loop may have dropped it
                slot, item_id = self._refs.pop(ref)
                if item_id is None:
                    self._on_ready(slot, ref)
                else:
                    self._on_result(slot, item_id, ref)

    def _on_ready(self, slot: _Slot, ref: Any) -> None:
        try:
            slot.node, slot.pid = ray.get(ref, timeout=GET_TIMEOUT_S)
        except (ray.exceptions.RayError, ray.exceptions.GetTimeoutError) as err:
            self._start_failures += 1
            self._last_start_error = _describe(err)
            self.on_event("worker_start_failed", worker=slot.index, error=self._last_start_error)
            self._replace(slot)
            return
        slot.ready = True
        self._start_failures = 0
        self.stats.nodes.add(slot.node)
        self.on_event("worker_started", worker=slot.index, node=slot.node, pid=slot.pid)

    def _on_result(self, slot: _Slot, item_id: str, ref: Any) -> None:
        took = time.monotonic() - slot.head_since
        if took > self.options.execution.item_timeout_s:  # done, but after its deadline: a timeout too
            self._forget(slot, ref)
            self._retry_or_fail(item_id, f"took {took:.3g} s, over item_timeout_s = "
                                         f"{self.options.execution.item_timeout_s:g} s", slot)
            return
        try:
            table, info = ray.get(ref, timeout=GET_TIMEOUT_S)
        except ray.exceptions.RayTaskError as err:  # the item itself raised; actor is fine
            self._forget(slot, ref)
            self._retry_or_fail(item_id, _describe(err), slot)
            return
        except (ray.exceptions.RayError, ray.exceptions.GetTimeoutError) as err:
            self._actor_lost(slot, f"worker {slot.index} lost: {_describe(err)}")
            return
        self._forget(slot, ref)
        try:
            self._on_done(self._schedule.tasks[item_id], table, info)
        except Exception as err:  # noqa: BLE001 -- a write or row-count problem: retry the item
            self._retry_or_fail(item_id, f"{type(err).__name__}: {err}", slot)
            return
        self.stats.evaluations += 1
        self._finished(item_id)

    def _forget(self, slot: _Slot, ref: Any) -> None:
        slot.inflight = deque((r, i) for r, i in slot.inflight if r != ref)
        slot.head_since = time.monotonic()

    def _finished(self, item_id: str) -> None:
        if self._schedule.finished(item_id):  # the shard's last item: let the store free it
            self._shard_refs.pop(self._schedule.tasks[item_id].shard_id, None)

    def _retry_or_fail(self, item_id: str, error: str, slot: _Slot | None,
                       charged: bool = True) -> None:
        verdict = self._schedule.failed(item_id, charged=charged)
        if not verdict.requeue:
            self.stats.failed += 1
            self._on_failed(self._schedule.tasks[item_id], error, verdict.attempts)
            self._finished(item_id)
            return
        self.stats.requeues += 1
        self.on_event("requeued", item=item_id, attempts=verdict.attempts, error=error,
                      worker=None if slot is None else slot.index,
                      node=None if slot is None else slot.node)

    def _actor_lost(self, slot: _Slot, error: str) -> None:
        """Replace a dead or hung actor; charge its running item, requeue the rest free."""
        inflight = list(slot.inflight)
        for ref, _ in inflight:
            self._refs.pop(ref, None)
        self._refs.pop(slot.ready_ref, None)
        self.on_event("worker_lost", worker=slot.index, node=slot.node, pid=slot.pid,
                      error=error, items=[i for _, i in inflight])
        for k, (_, item_id) in enumerate(inflight):
            # the running item is charged; those queued behind it only waited
            self._retry_or_fail(item_id, error, slot, charged=(k == 0))
        self._replace(slot)

    def _check_deadlines(self) -> None:
        now = time.monotonic()
        for slot in list(self._slots):
            if not slot.ready and now - slot.created > self.options.execution.start_timeout_s:
                self._refs.pop(slot.ready_ref, None)
                self._start_failures += 1
                self._last_start_error = (f"worker {slot.index} did not start within "
                                          f"{self.options.execution.start_timeout_s:g} s")
                self.on_event("worker_start_failed", worker=slot.index,
                              error=self._last_start_error)
                self._replace(slot)
            elif slot.inflight and now - slot.head_since > self.options.execution.item_timeout_s:
                self._actor_lost(slot, f"timed out after {self.options.execution.item_timeout_s:g} s "
                                       f"on worker {slot.index}")


def _describe(err: BaseException) -> str:
    """One line for an error from Ray: the user's exception where there is one."""
    cause = getattr(err, "cause", None)
    if cause is not None and not isinstance(cause, ray.exceptions.RayError):
        return f"{type(cause).__name__}: {cause}"
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"[:500]
