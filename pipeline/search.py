"""`pathpatch run` of a spec with [search]: ACDC's exact greedy search, every evaluation an
ordinary work item on the cluster.

Each round, `pathpatch.discovery.greedy.GreedySearch` proposes up to `search.window` candidate circuits
(one receiver's incoming edges, stacked as one hypothesis group); they run on every dataset
shard like a sweep's items and land in `items/<identity>.parquet`, and the decisions they
settle are written as `steps/<first edge index>.parquet`. A rerun of the same spec on the same
folder replays the search from its first decision: every candidate whose file is whole is read
back instead of computed, so a search killed at any step ends with the same circuit. The found
circuit is written as `circuit.json` (the EAP-IG / MIB graph format) and `circuit.csv` (every
edge, scored so that the circuit's edges rank first, each by the metric's rise when it alone
was left out: a `circuit_curve` ranking).
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pathpatch.data.atomic import atomic_write, atomic_write_bytes
from pathpatch.discovery.greedy import Candidate, GreedySearch
from pathpatch.errors import PathPatchError
from pathpatch.language.circuits import circuit_hypothesis, write_eap_json
from pathpatch.model.graph import Graph
from pipeline.execution import Executor, ExecutorOptions
from pipeline.plan import HypothesisInfo, WorkItem, make_plan
from pipeline.progress import SearchProgress
from pipeline.resolve import Resolved, resolve
from pipeline.spec import SweepSpec
from pipeline.store import (
    STEP_SCHEMA,
    SweepFolder,
    build_manifest,
    git_revision,
    item_record,
    library_versions,
)
from pipeline.sweep import open_executor
from pipeline.worker import Task


@dataclass
class SearchOutcome:
    """What one driver run of a search did.

    Attributes:
        folder: the search folder.
        total: edges of the model (decisions).
        evaluations: candidate evaluations computed in this run (per shard: work items).
        reused: work items read back from an earlier run.
        discarded: candidates evaluated on a decision predicted wrongly.
        circuit: edges of the circuit found.
        rounds: stacked rounds; seconds: time spent in them.
    """

    folder: Path
    total: int
    metric: str = ""
    evaluations: int = 0
    reused: int = 0
    discarded: int = 0
    candidates: int = 0
    circuit: int = 0
    rounds: int = 0
    seconds: float = 0.0
    nodes: set[str] = field(default_factory=set)

    def summary(self) -> str:
        return (f"search: {self.total} edges decided in {self.rounds} rounds "
                f"({self.candidates} candidates, {self.discarded} discarded); {self.evaluations} "
                f"work items computed, {self.reused} read back, in {self.seconds:.1f} s; circuit "
                f"of {self.circuit} edges in {self.folder}/circuit.json")


def run_search(spec: SweepSpec, out: str | Path, *, backend: str = "ray",
               address: str | None = None, progress: bool = True,
               resolved: Resolved | None = None, spec_file: str = "", force: bool = False,
               ray_init: dict[str, Any] | None = None,
               executor_options: dict[str, Any] | None = None) -> SearchOutcome:
    """Run (or resume) the greedy search `spec.search` into folder `out`.

    Raises:
        PathPatchError: invalid spec or folder (before anything is written), a locked folder,
            or a work item that failed every attempt (the search stops there; rerun to resume).
    """
    assert spec.search is not None, "run_search needs a spec with [search]"
    resolved = resolved or resolve(spec)
    graph = Graph.from_model(resolved.model)
    search = GreedySearch(graph, spec.search.tau)
    plan = resolved.plan
    folder = SweepFolder(out)
    identity = {"name": spec.name, "model_digest": plan.model_digest, "metric": plan.metric,
                "dtype": plan.dtype, "search_tau": spec.search.tau}
    folder.check_target(identity, force=force)
    outcome = SearchOutcome(folder=folder.root, total=len(search.order), metric=plan.metric)
    steps_dir = folder.steps_dir
    provenance = {"spec_hash": spec.digest(), "git_revision": git_revision(),
                  "versions": library_versions(), "dtype": spec.dtype, "metric": plan.metric,
                  "model": spec.model, "model_digest": plan.model_digest,
                  "search": {"tau": spec.search.tau, "window": spec.search.window}}
    with folder.locked():
        folder.remove_stale_temps()
        for old in [*steps_dir.glob("*.parquet"), folder.root / "circuit.json",
                    folder.root / "circuit.csv"]:
            old.unlink(missing_ok=True)  # derived from the evaluations: the replay rewrites them
        manifest = build_manifest(plan, spec_name=spec.name, spec_hash=spec.digest(),
                                  spec_file=spec_file, base_dir=spec.base_dir, model=spec.model,
                                  seed=spec.seed, provenance=provenance)
        manifest["search_tau"] = spec.search.tau  # part of the folder's identity
        manifest["search"] = {"tau": spec.search.tau, "window": spec.search.window}
        folder.write_manifest(manifest)
        folder.write_hypotheses(plan)
        folder.write_spec(spec.source, spec.digest())
        folder.log("search_started", tau=spec.search.tau, window=spec.search.window)
        options = ExecutorOptions(resources=spec.resources, execution=spec.execution,
                                  **(executor_options or {}))
        bar = SearchProgress(len(search.order), enabled=progress)
        items: list[WorkItem] = []

        def event(name: str, **fields: Any) -> None:
            if name != "submitted":
                folder.log(name, **fields)

        shards = {shard.id: shard for shard in resolved.shards}

        def shard_data(shard_id: str):  # one function for every round: shards sent once
            return shards[shard_id].take(resolved.dataset)

        receivers = {str(e): e.receiver.name for e in search.order}
        start = time.perf_counter()
        try:
            with contextlib.ExitStack() as stack:
                opened = []

                def executor():  # started only once some candidate has no whole file
                    if not opened:
                        opened.append(stack.enter_context(open_executor(
                            backend, resolved, options, event, address, ray_init or {})))
                    return opened[0]

                while not search.done:
                    candidates = search.candidates(spec.search.window)
                    values, round_items = _evaluate(resolved, graph, folder, executor,
                                                    shard_data, candidates, provenance, outcome)
                    items.extend(round_items)
                    steps = search.record(candidates, values)
                    outcome.rounds += 1
                    outcome.candidates += len(candidates)
                    decided = sum(1 for s in steps if s.evaluated)
                    outcome.discarded += len([c for c in candidates if c.edge is not None]) - decided
                    if steps:
                        _write_steps(steps_dir / f"{steps[0].index:07d}.parquet", steps,
                                     receivers)
                    bar.update(len(steps), circuit=len(search.circuit),
                               evaluated=outcome.evaluations, reused=outcome.reused)
        finally:
            bar.close()
            outcome.seconds = time.perf_counter() - start
        circuit = search.final_circuit()
        outcome.circuit = len(circuit)
        _write_circuit(folder.root, graph, search, resolved)
        manifest["items"] = [item_record(item) for item in items]
        manifest["search"]["circuit_edges"] = len(circuit)
        folder.write_manifest(manifest)
        folder.log("search_finished", rounds=outcome.rounds, circuit_edges=len(circuit),
                   evaluations=outcome.evaluations, reused=outcome.reused,
                   seconds=round(outcome.seconds, 3))
    return outcome


def _evaluate(resolved: Resolved, graph: Graph, folder: SweepFolder,
              executor: Callable[[], Executor], shard_data: Callable[[str], Any],
              candidates: list[Candidate], provenance: dict[str, Any],
              outcome: SearchOutcome) -> tuple[dict[str, float], list[WorkItem]]:
    """Each candidate's mean metric over the whole dataset: its work items (one group of all
    the candidates per shard) computed where no whole file holds them yet."""
    hypotheses = [circuit_hypothesis(graph, c.name, c.circuit) for c in candidates]
    infos = tuple(HypothesisInfo(name=h.name, canonical=h.canonical) for h in hypotheses)
    plan = make_plan(model_digest=resolved.plan.model_digest, shards=resolved.shards,
                     hypotheses=infos, group_size=len(infos), metric=resolved.plan.metric,
                     dtype=resolved.plan.dtype)
    pending = [item for item in plan.items
               if not folder.is_whole(item.id, item.expected_rows, full=False)]
    outcome.reused += len(plan.items) - len(pending)
    computed: dict[str, pa.Table] = {}  # rows computed now: not read back from their files
    if pending:
        by_id = {item.id: item for item in pending}
        tasks = [Task(item.id, item.shard.id, tuple(hypotheses)) for item in pending]
        failures: list[str] = []

        def on_done(task: Task, table: pa.Table, info) -> None:
            item = by_id[task.item_id]
            shard = item.shard
            folder.write_item(item, table, {
                **provenance, "shard": {"index": shard.index, "start": shard.start,
                                        "stop": shard.stop, "digest": shard.digest},
                "hypotheses": [h.name for h in item.hypotheses]})
            computed[item.id] = table
            outcome.evaluations += 1
            outcome.nodes.add(info.node)

        def on_failed(task: Task, error: str, attempts: int) -> None:
            folder.record_failure(task.item_id, error, attempts)
            failures.append(f"{task.item_id} after {attempts} attempts: {error}")

        executor().run(tasks, shard_data, on_done, on_failed)
        if failures:
            first = next((c for c in candidates if c.edge is not None), candidates[0])
            raise PathPatchError(
                f"search stopped at {first.name!r}: a work item failed every attempt "
                f"({failures[0]}); fix the cause and run the same spec again: the search "
                "resumes from the evaluations already written (if a stacked round ran out of "
                "memory, a smaller search.window or resources.memory_budget stacks fewer)")
    sums: dict[str, list[float]] = {h.name: [] for h in hypotheses}
    for item in plan.items:  # shard order: the same sums whatever order items completed in
        table = computed.get(item.id)
        if table is None:
            table = pq.read_table(folder.item_path(item.id), columns=["hypothesis", "ue"])
        for name in sums:
            ue = table.filter(pc.equal(table["hypothesis"], name))["ue"].to_numpy()
            sums[name].extend(np.asarray(ue, dtype=np.float64).tolist())
    n = resolved.plan.n_examples
    return {name: math.fsum(v) / n for name, v in sums.items()}, list(plan.items)


def _write_steps(path: Path, steps, receivers: dict[str, str]) -> None:
    rows = pa.Table.from_pylist([
        {"index": s.index, "edge": s.edge, "receiver": receivers[s.edge], "before": s.before,
         "after": s.after, "removed": s.removed, "evaluated": s.evaluated,
         "circuit_edges": s.circuit_edges} for s in steps], schema=STEP_SCHEMA)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda f: pq.write_table(rows, f))


def _write_circuit(root: Path, graph: Graph, search: GreedySearch, resolved: Resolved) -> None:
    """circuit.json (EAP-IG format: each edge's score is the metric's rise when it alone was
    left out, where evaluated) and circuit.csv (edge, score: kept edges first, by that rise)."""
    rise = {s.edge: s.after - s.before for s in search.steps if s.after is not None}
    by_name = {str(e): e for e in graph.edges}
    scores = {by_name[name]: value for name, value in rise.items()}
    kept = search.final_circuit()
    write_eap_json(graph, root / "circuit.json", scores, kept, int(resolved.model.cfg.d_model))
    # a ranking whose top |circuit| edges are the circuit: kept edges above every removed one
    top = max([abs(v) for v in rise.values()] + [1.0])
    lines = ["edge,score"]
    for e in graph.edges:
        value = rise.get(str(e), 0.0)
        lines.append(f"{e},{(value + 2 * top) if e in search.circuit else value!r}")
    atomic_write_bytes(root / "circuit.csv", ("\n".join(lines) + "\n").encode())
