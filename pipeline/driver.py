"""The driver loop: rounds of work items run on one executor, every result checked and written.

One loop serves a sweep and a search. A run takes the folder's lock, records the manifest and
the spec, then asks its `Rounds` for work until they have none: a sweep's plan is one round,
a search's candidates are many, each known only once the previous round's values are in.
Items whose file is already whole are skipped (`SweepFolder.whole_items`: the done index
vouches for a file without opening it, any other file is read in full), a file that is not
whole is removed and computed again; the rest go to the executor (Ray actors or this process),
opened on the first round that needs it and kept for the others (so actors keep their model
and cached shards). Each result is written as it arrives (`on_done`), made durable in batches
(`SweepFolder.batched`), each item that failed every attempt is recorded (`on_failed`), and
the rounds see what their round produced (`Rounds.settle`). Running it again is resuming.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from pipeline.execution import Counts, Executor, ExecutorOptions, InProcessExecutor
from pipeline.plan import WorkItem
from pipeline.resolve import Resolved
from pipeline.store import SweepFolder, build_manifest, git_revision, library_versions
from pipeline.worker import Task, TaskInfo, Worker, WorkerConfig

if TYPE_CHECKING:  # annotations only: result tables are built by the engine
    import pyarrow as pa

    from pipeline.spec import SweepSpec

BACKENDS = ("ray", "inprocess")


@dataclass
class Outcome(Counts):
    """What one driver run did: the shared `Counts`, and what a sweep or a search adds.

    Attributes:
        folder: the sweep folder.
        total: a sweep's items in the plan; a search's edges (decisions).
        metric: the delta the scores are in.
        search: True for a search (its summary line names rounds and the circuit).
        rounds: rounds of work items run (a sweep: one).
        candidates, discarded: a search's candidates, and those evaluated on a decision
            predicted wrongly.
        circuit: edges of the circuit a search found.
    """

    folder: Path = Path()
    total: int = 0
    metric: str = ""
    search: bool = False
    rounds: int = 0
    candidates: int = 0
    discarded: int = 0
    circuit: int = 0

    def summary(self) -> str:
        if self.search:
            return (f"search: {self.total} edges decided in {self.rounds} rounds "
                    f"({self.candidates} candidates, {self.discarded} discarded); "
                    f"{self.evaluations} work items computed, {self.reused} read back, in "
                    f"{self.seconds:.1f} s{self.ray_times()}; circuit of {self.circuit} edges in "
                    f"{self.folder}/circuit.json")
        return (f"{self.total} items: {self.reused} already done, {self.evaluations} computed, "
                f"{self.failed} failed ({self.requeues} requeued) in {self.seconds:.1f} s"
                f"{self.ray_times()}; results in {self.folder}")

    def ray_times(self) -> str:
        """The cluster's own start and stop, apart from the sweep's time ("" without Ray)."""
        if not (self.ray_start_seconds or self.ray_stop_seconds):
            return ""
        return (f" (plus Ray: {self.ray_start_seconds:.1f} s to start, "
                f"{self.ray_stop_seconds:.1f} s to stop)")


class Bar(Protocol):
    """A run's progress display (`pipeline.progress`): told of every item as it ends."""

    def done(self, examples: int) -> None: ...

    def fail(self) -> None: ...

    def requeue(self) -> None: ...

    def close(self) -> None: ...


class Rounds(Protocol):
    """Where a run's work items come from, round after round, and what becomes of them.

    `next_round` returns the next round's items (None: no more work); the driver reads back
    or computes each, passing every table it computed to `computed` as it is written, then
    calls `settle` with the items that failed every attempt. Rounds may stop the run there by
    raising.
    """

    label: str
    """Names the run's start and finish events in events.jsonl (`<label>_started`)."""

    def prepare(self, folder: SweepFolder) -> dict[str, Any]:
        """Tidy the folder before the run (under its lock); return fields to log."""

    def manifest(self, manifest: dict[str, Any]) -> dict[str, Any]:
        """The manifest to write first, from the plan's."""

    def next_round(self) -> Sequence[WorkItem] | None: ...

    def task(self, item: WorkItem) -> Task:
        """What a worker runs for `item`."""

    def computed(self, item: WorkItem, table: pa.Table) -> None:
        """A result just written (keep it only if the round's decision needs its rows)."""

    def settle(self, items: Sequence[WorkItem], failed: list[str]) -> None: ...

    def progress(self, pending: int, outcome: Outcome) -> Bar:
        """The run's bar, made once workers are up (or a round ended without them)."""

    def finish(self, folder: SweepFolder, manifest: dict[str, Any]) -> dict[str, Any]:
        """Write what the rounds leave (under the lock); return fields to log."""


@dataclass(frozen=True)
class RunOptions:
    """How a run reaches its workers (never part of a result).

    Attributes:
        backend: "ray" (a local cluster on demand, or `address`) or "inprocess".
        address: Ray cluster address (already probed by the caller).
        on_event: called as on_event(event, **fields) for every scheduling event (tests).
        ray_init: extra `ray.init` arguments for a local cluster started here.
        executor_options: `ExecutorOptions` fields to override (e.g. warm_start=True).
        spec_file: where the spec was read from (recorded in the manifest).
        executor: an executor to run items on instead of the backend's (`bench driver`'s
            stand-in workers); the caller opens and closes it.
    """

    backend: str = "ray"
    address: str | None = None
    on_event: Callable[..., None] | None = None
    ray_init: dict[str, Any] | None = None
    executor_options: dict[str, Any] | None = None
    spec_file: str = ""
    executor: Executor | None = None


def worker_config(resolved: Resolved, *, device: str = "auto") -> WorkerConfig:
    """What every worker of this run is built from."""
    spec = resolved.spec
    return WorkerConfig(
        model=spec.model, model_digest=resolved.plan.model_digest, dtype=spec.dtype,
        metric=spec.metric, threads=spec.resources.threads_per_worker, device=device,
        batch_size=spec.resources.batch_size, memory_budget=spec.resources.memory_budget,
        shard_cache=spec.execution.shard_cache, max_mixed_copies=spec.max_mixed_copies,
        intervention=resolved.ablation or spec.intervention,
    )


def folder_identity(resolved: Resolved) -> dict[str, Any]:
    """What a sweep folder's rows stand for (`SweepFolder.check_target`): another name, model,
    metric, dtype or intervention is refused unless forced. Under resample the intervention is
    None, as in manifests written before interventions existed."""
    plan = resolved.plan
    return {"name": resolved.spec.name, "model_digest": plan.model_digest, "metric": plan.metric,
            "dtype": plan.dtype,
            "intervention": None if plan.intervention == "resample" else plan.intervention}


def provenance_of(resolved: Resolved) -> dict[str, Any]:
    """What every result file's metadata records of the run (the item adds its shard, its
    hypotheses and its identity)."""
    spec, plan = resolved.spec, resolved.plan
    out = {
        "spec_hash": spec.digest(), "git_revision": git_revision(),
        "versions": library_versions(), "dtype": spec.dtype, "seed": spec.seed,
        "dataset": _dataset_provenance(spec),
        "metric": plan.metric, "intervention": plan.intervention,
        "model": spec.model, "model_digest": plan.model_digest,
        "threads_per_worker": spec.resources.threads_per_worker,
        "batch_size": spec.resources.batch_size,
        "memory_budget": spec.resources.memory_budget,
    }
    if plan.intervention != "resample":
        out["ablation_digest"] = plan.ablation  # the values every x_c-free item used
    if spec.intervention_dataset is not None:
        out["intervention_dataset"] = _dataset_provenance(
            replace(spec, dataset=spec.intervention_dataset))
    if spec.search is not None:
        out["search"] = {"tau": spec.search.tau, "window": spec.search.window}
    return out


def _dataset_provenance(spec: SweepSpec) -> dict[str, Any]:
    """The spec's [dataset] as provenance: a file's keys, or a generator's parameters."""
    return (spec.dataset.table() if spec.dataset.path else
            {"kind": spec.dataset.kind, **spec.dataset_params()})


def drive(resolved: Resolved, folder: SweepFolder, rounds: Rounds, outcome: Outcome,
          options: RunOptions) -> Outcome:
    """Run `rounds` into `folder` (already checked as its target); see the module doc.

    Raises:
        PathPatchError: the folder is locked by another driver, no worker could start, or the
            rounds stopped the run.
    """
    spec = resolved.spec
    provenance = provenance_of(resolved)
    with folder.locked():
        stale = folder.remove_stale_temps()
        prepared = rounds.prepare(folder)
        # the manifest first: it marks the folder as a sweep's before spec.toml is written
        manifest = rounds.manifest(build_manifest(
            resolved.plan, spec_name=spec.name, spec_hash=spec.digest(),
            spec_file=options.spec_file, base_dir=spec.base_dir, model=spec.model,
            seed=spec.seed, provenance=provenance))
        folder.write_manifest(manifest)
        folder.write_hypotheses(resolved.plan)
        folder.write_spec(spec.source, spec.digest())
        with folder.batched():  # results made durable in batches (`SweepFolder.batched`)
            loop = _Loop(resolved, folder, rounds, outcome, options, provenance)
            try:
                first = True
                while (items := rounds.next_round()) is not None:
                    loop.run_round(items, log_start=({**prepared, "stale_temps_removed": stale}
                                                     if first else None))
                    first = False
            finally:
                loop.close()
        finished = rounds.finish(folder, manifest)
        folder.log(f"{rounds.label}_finished", **finished, evaluations=outcome.evaluations,
                   reused=outcome.reused, failed=outcome.failed, requeues=outcome.requeues,
                   seconds=round(outcome.seconds, 3), nodes=sorted(outcome.nodes))
    return outcome


class _Loop:
    """The state of one run's rounds: the executor (opened on first need), the bar, and the
    callbacks every result and failure goes through."""

    def __init__(self, resolved: Resolved, folder: SweepFolder, rounds: Rounds,
                 outcome: Outcome, options: RunOptions, provenance: dict[str, Any]):
        self.resolved, self.folder, self.rounds = resolved, folder, rounds
        self.outcome, self.options, self.provenance = outcome, options, provenance
        self.shards = {s.id: s for s in resolved.shards}
        self.stack = contextlib.ExitStack()
        self.executor: Executor | None = None
        self.bar: Bar | None = None
        self.pending = 0

    def shard_data(self, shard_id: str):  # one function for every round: shards sent once
        return self.shards[shard_id].take(self.resolved.dataset)

    def run_round(self, items: Sequence[WorkItem], log_start: dict[str, Any] | None) -> None:
        pending: list[WorkItem] = []
        # files the done index vouches for are not opened: time grows with what is pending
        whole, broken = self.folder.whole_items([(item.id, item.expected_rows) for item in items])
        for item in items:
            if item.id in whole:
                self.outcome.reused += 1
                continue
            if item.id in broken:
                self.folder.item_path(item.id).unlink(missing_ok=True)  # compute it again
                self.outcome.redone += 1
                self.folder.log("broken_file_removed", item=item.id)
            pending.append(item)
        self.outcome.rounds += 1
        if log_start is not None:
            self.folder.log(f"{self.rounds.label}_started", spec_hash=self.resolved.spec.digest(),
                            backend=self.options.backend, items=len(items),
                            skipped=len(items) - len(pending), pending=len(pending), **log_start)
        self.pending = len(pending)
        failed: list[str] = []
        if pending:
            by_id = {item.id: item for item in pending}

            def on_done(task: Task, table: pa.Table, info: TaskInfo) -> None:
                item = by_id[task.item_id]
                shard = item.shard
                self.folder.write_item(item, table, {
                    **self.provenance,
                    "shard": {"index": shard.index, "start": shard.start, "stop": shard.stop,
                              "digest": shard.digest},
                    "hypotheses": [[h.name, h.canonical] for h in item.hypotheses]})
                self.rounds.computed(item, table)
                self.outcome.examples += info.examples
                self.outcome.rows += table.num_rows
                self.outcome.nodes.add(info.node)
                self.folder.log("item_done", item=item.id, node=info.node, pid=info.pid,
                                seconds=round(info.seconds, 4))
                if self.bar is not None:
                    self.bar.done(info.examples)

            def on_failed(task: Task, error: str, attempts: int) -> None:
                self.folder.record_failure(task.item_id, error, attempts)
                self.folder.log("item_failed", item=task.item_id, error=error,
                                attempts=attempts)
                failed.append(f"{task.item_id} after {attempts} attempts: {error}")
                if self.bar is not None:
                    self.bar.fail()

            executor = self._executor()
            executor.run([self.rounds.task(item) for item in pending], self.shard_data,
                         on_done, on_failed)
        self._bar()
        self.rounds.settle(items, failed)

    def _event(self, name: str, **fields: Any) -> None:
        if name != "submitted":
            self.folder.log(name, **fields)
        if name == "requeued" and self.bar is not None:
            self.bar.requeue()
        if self.options.on_event is not None:
            self.options.on_event(name, **fields)

    def _executor(self) -> Executor:
        if self.executor is None and self.options.executor is not None:
            self.executor = self.options.executor
            self._bar()
        if self.executor is None:
            spec = self.resolved.spec
            options = ExecutorOptions(resources=spec.resources, execution=spec.execution,
                                      **(self.options.executor_options or {}))
            self.executor = self.stack.enter_context(open_executor(
                self.options.backend, self.resolved, options, self._event,
                self.options.address, self.options.ray_init or {}, stats=self.outcome))
            self._bar()  # after the cluster is up: Ray's start-up lines come first
        return self.executor

    def _bar(self) -> None:
        if self.bar is None:
            self.bar = self.rounds.progress(self.pending, self.outcome)

    def close(self) -> None:
        try:
            if self.bar is not None:
                self.bar.close()
        finally:
            self.stack.close()


@contextlib.contextmanager
def open_executor(backend: str, resolved: Resolved, options: ExecutorOptions,
                  event: Callable[..., None], address: str | None, ray_init: dict[str, Any],
                  *, stats: Counts | None = None) -> Iterator[Executor]:
    """The backend's executor, counting into `stats`: this process, or Ray actors inside a
    cluster session."""
    if backend not in BACKENDS:
        raise ValueError(f"backend {backend!r}: allowed are {BACKENDS}")
    if backend == "inprocess":
        worker = Worker(worker_config(resolved, device="cpu"), node="inprocess",
                        model=resolved.model)
        yield InProcessExecutor(worker, options, on_event=event, stats=stats)
        return
    prepare_ray_environment(address)
    from pipeline.ray_executor import RayExecutor, ray_session  # Ray loads only when a run uses it

    with ray_session(address, stats=stats, **ray_init):
        executor = RayExecutor(worker_config(resolved), options, on_event=event, stats=stats)
        try:
            yield executor
        finally:
            executor.close()


def prepare_ray_environment(address: str | None) -> None:
    """Before Ray is first imported: a local cluster of pathpatch's own (no `address`, no
    RAY_ADDRESS) runs with token authentication, Ray's default for a new local cluster, stated
    as RAY_AUTH_MODE=token so that Ray does not print its notice about it (a notice that only
    suggests turning authentication off). A RAY_AUTH_MODE the user set is kept, and so is
    Ray's behaviour when joining a cluster: its authentication is the cluster's to decide
    (docs/PIPELINE.md). Ray reads the mode once, when it is imported: after that (a notebook
    that imported ray itself) nothing is changed."""
    if address or os.environ.get("RAY_ADDRESS") or "ray" in sys.modules:
        return
    os.environ.setdefault("RAY_AUTH_MODE", "token")
