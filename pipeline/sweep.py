"""The driver: validate a spec, plan it, skip what is done, run the rest, write every result.

`run_sweep` is the whole life of one driver on one sweep folder: resolve (all user errors
here, nothing written yet), take the folder's lock, record the spec and manifest, drop stale
temp files and broken result files, then evaluate the pending items on Ray (or in this
process) and write each result as it completes. Running it again is resuming.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.execution import Executor, ExecutorOptions, InProcessExecutor
from pipeline.plan import WorkItem
from pipeline.progress import Progress
from pipeline.resolve import Resolved, resolve
from pipeline.spec import SweepSpec, parse_spec
from pipeline.store import (
    SweepFolder,
    build_manifest,
    git_revision,
    library_versions,
)
from pipeline.worker import Task, TaskInfo, Worker, WorkerConfig

if TYPE_CHECKING:  # annotations only: result tables are built by the engine
    import pyarrow as pa

BACKENDS = ("ray", "inprocess")


@dataclass
class SweepOutcome:
    """What one driver run did.

    Attributes:
        folder: the sweep folder.
        total: items in the current plan.
        skipped: items whose file was already whole.
        evaluations: items computed in this run.
        failed: items that failed every attempt in this run.
        requeues: retries (actor deaths, timeouts, errors).
        redone: broken result files found and recomputed.
        nodes: Ray node ids that ran work.
        seconds: time spent executing (cluster start-up excluded).
        examples, rows: examples evaluated (per item, summed) and result rows written.
        metric: the delta the scores are in.
    """

    folder: Path
    total: int
    skipped: int = 0
    evaluations: int = 0
    failed: int = 0
    requeues: int = 0
    redone: int = 0
    nodes: set[str] = field(default_factory=set)
    seconds: float = 0.0
    examples: int = 0
    rows: int = 0
    metric: str = ""

    def summary(self) -> str:
        return (f"{self.total} items: {self.skipped} already done, {self.evaluations} computed, "
                f"{self.failed} failed ({self.requeues} requeued) in {self.seconds:.1f} s; "
                f"results in {self.folder}")


def worker_config(resolved: Resolved, *, device: str = "auto") -> WorkerConfig:
    spec = resolved.spec
    return WorkerConfig(
        model=spec.model, model_digest=resolved.plan.model_digest, dtype=spec.dtype,
        metric=spec.metric, threads=spec.resources.threads_per_worker, device=device,
        batch_size=spec.resources.batch_size, memory_budget=spec.resources.memory_budget,
        shard_cache=spec.execution.shard_cache, max_mixed_copies=spec.max_mixed_copies,
    )


def load_sweep_spec(folder: str | Path) -> SweepSpec:
    """The spec a sweep folder was last run with (relative paths read from its old folder)."""
    sweep = SweepFolder(folder)
    manifest = sweep.read_manifest()
    return parse_spec(sweep.spec_path.read_text(), base_dir=manifest["base_dir"],
                      default_name=manifest["name"], where=str(sweep.spec_path))


def run_sweep(
    spec: SweepSpec,
    out: str | Path,
    *,
    backend: str = "ray",
    address: str | None = None,
    progress: bool = True,
    resolved: Resolved | None = None,
    on_event: Callable[..., None] | None = None,
    ray_init: dict[str, Any] | None = None,
    spec_file: str = "",
    executor_options: dict[str, Any] | None = None,
    force: bool = False,
) -> SweepOutcome:
    """Run (or resume) the sweep `spec` into folder `out`.

    Args:
        spec: the validated spec.
        out: sweep folder (created; reused when it exists).
        backend: "ray" (local cluster on demand, or `address` / RAY_ADDRESS) or "inprocess".
        address: Ray cluster address.
        progress: show a tqdm bar on stderr.
        resolved: `resolve(spec)` when the caller has it already.
        on_event: called as on_event(event, **fields) for every scheduling event (tests).
        ray_init: extra `ray.init` arguments for a local cluster started here.
        spec_file: where the spec was read from (recorded in the manifest).
        executor_options: `ExecutorOptions` fields to override (e.g. warm_start=True).
        force: take over `out` when it holds a sweep of another identity (`check_target`).

    Raises:
        PathPatchError: invalid spec or a folder that must not be written (before anything is
            written), folder locked by another driver, or no worker could start.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend {backend!r}: allowed are {BACKENDS}")
    resolved = resolved or resolve(spec)
    address = address or os.environ.get("RAY_ADDRESS") or None
    if backend == "ray" and address:
        from pipeline.ray_executor import probe_address

        probe_address(address)  # a wrong address fails here, before anything is written
    plan = resolved.plan
    folder = SweepFolder(out)
    folder.check_target({"name": spec.name, "model_digest": plan.model_digest,
                         "metric": plan.metric, "dtype": plan.dtype}, force=force)
    outcome = SweepOutcome(folder=folder.root, total=len(plan.items), metric=plan.metric)
    with folder.locked():
        stale = folder.remove_stale_temps()
        set_aside, restored = folder.set_aside({item.id for item in plan.items})
        spec_hash = spec.digest()
        provenance = {
            "spec_hash": spec_hash, "git_revision": git_revision(),
            "versions": library_versions(), "dtype": spec.dtype, "seed": spec.seed,
            "dataset": ({"path": spec.dataset.path} if spec.dataset.path else
                        {"kind": spec.dataset.kind, **spec.dataset_params()}),
            "metric": plan.metric, "model": spec.model, "model_digest": plan.model_digest,
            "threads_per_worker": spec.resources.threads_per_worker,
            "batch_size": spec.resources.batch_size,
            "memory_budget": spec.resources.memory_budget,
        }
        # the manifest first: it marks the folder as a sweep's before spec.toml is written
        folder.write_manifest(build_manifest(
            plan, spec_name=spec.name, spec_hash=spec_hash, spec_file=spec_file,
            base_dir=spec.base_dir, model=spec.model, seed=spec.seed, provenance=provenance))
        folder.write_hypotheses(plan)
        folder.write_spec(spec.source, spec_hash)

        pending: list[WorkItem] = []
        for item in plan.items:
            if folder.is_whole(item.id, item.expected_rows, full=True):
                outcome.skipped += 1
                continue
            if folder.item_path(item.id).exists():
                folder.item_path(item.id).unlink()  # truncated or foreign: compute it again
                outcome.redone += 1
                folder.log("broken_file_removed", item=item.id)
            pending.append(item)
        folder.log("run_started", spec_hash=spec_hash, backend=backend, items=len(plan.items),
                   skipped=outcome.skipped, pending=len(pending), stale_temps_removed=stale,
                   superseded_set_aside=set_aside, superseded_restored=restored)
        if pending:
            _execute(resolved, folder, pending, provenance, outcome, backend=backend,
                     address=address, progress=progress, on_event=on_event,
                     ray_init=ray_init or {}, executor_options=executor_options or {})
        folder.log("run_finished", evaluations=outcome.evaluations, failed=outcome.failed,
                   requeues=outcome.requeues, seconds=round(outcome.seconds, 3),
                   nodes=sorted(outcome.nodes))
    return outcome


def _execute(resolved: Resolved, folder: SweepFolder, pending: list[WorkItem],
             provenance: dict[str, Any], outcome: SweepOutcome, *, backend: str,
             address: str | None, progress: bool, on_event: Callable[..., None] | None,
             ray_init: dict[str, Any], executor_options: dict[str, Any]) -> None:
    items = {item.id: item for item in pending}
    shards = {s.id: s for s in resolved.shards}
    tasks = [Task(item_id=item.id, shard_id=item.shard.id,
                  hypotheses=tuple(resolved.hypotheses_of(tuple(h.name for h in
                                                                 item.hypotheses))))
             for item in pending]
    bar: Progress | None = None  # made once the cluster is up: Ray's start-up lines come first

    def shard_data(shard_id: str):
        return shards[shard_id].take(resolved.dataset)

    def on_done(task: Task, table: pa.Table, info: TaskInfo) -> None:
        item = items[task.item_id]
        shard = item.shard
        prov = {**provenance,
                "shard": {"index": shard.index, "start": shard.start, "stop": shard.stop,
                          "digest": shard.digest},
                "hypotheses": [[h.name, h.canonical] for h in item.hypotheses]}
        folder.write_item(item, table, prov)
        outcome.examples += info.examples
        outcome.rows += table.num_rows
        outcome.nodes.add(info.node)
        folder.log("item_done", item=item.id, node=info.node, pid=info.pid,
                   seconds=round(info.seconds, 4))
        if bar is not None:
            bar.done(info.examples)

    def on_failed(task: Task, error: str, attempts: int) -> None:
        folder.record_failure(task.item_id, error, attempts)
        folder.log("item_failed", item=task.item_id, error=error, attempts=attempts)
        outcome.failed += 1
        if bar is not None:
            bar.fail()

    def event(name: str, **fields: Any) -> None:
        if name != "submitted":
            folder.log(name, **fields)
        if name == "requeued":
            outcome.requeues += 1
            if bar is not None:
                bar.requeue()
        if on_event is not None:
            on_event(name, **fields)

    def start_bar() -> None:
        nonlocal bar
        bar = Progress(len(pending), skipped=outcome.skipped, enabled=progress)

    options = ExecutorOptions(resources=resolved.spec.resources,
                              execution=resolved.spec.execution, **executor_options)
    try:
        with open_executor(backend, resolved, options, event, address, ray_init) as executor:
            start_bar()
            stats = executor.run(tasks, shard_data, on_done, on_failed)
        outcome.evaluations = stats.evaluations
        outcome.seconds = stats.seconds
    finally:
        if bar is not None:
            bar.close()


@contextlib.contextmanager
def open_executor(backend: str, resolved: Resolved, options: ExecutorOptions,
              event: Callable[..., None], address: str | None,
              ray_init: dict[str, Any]) -> Iterator[Executor]:
    """The backend's executor: this process, or Ray actors inside a cluster session."""
    if backend == "inprocess":
        worker = Worker(worker_config(resolved, device="cpu"), node="inprocess",
                        model=resolved.model)
        yield InProcessExecutor(worker, options, on_event=event)
        return
    from pipeline.ray_executor import RayExecutor, ray_session

    with ray_session(address, **ray_init):
        executor = RayExecutor(worker_config(resolved), options, on_event=event)
        try:
            yield executor
        finally:
            executor.close()
