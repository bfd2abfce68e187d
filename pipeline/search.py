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

import math
import os
from collections.abc import Sequence
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
from pipeline.driver import BACKENDS, Outcome, RunOptions, drive, folder_identity
from pipeline.plan import HypothesisInfo, WorkItem, make_plan
from pipeline.progress import SearchProgress
from pipeline.resolve import Resolved, resolve
from pipeline.spec import SweepSpec
from pipeline.store import STEP_SCHEMA, SweepFolder, item_record
from pipeline.worker import Evaluate, Task


class SearchRounds:
    """ACDC's greedy search as rounds: each round, one group of candidate circuits on every
    shard; settling a round records its decisions (a steps file) and stops the search on an
    item that failed every attempt."""

    label = "search"

    def __init__(self, resolved: Resolved, outcome: Outcome, *, progress: bool):
        spec = resolved.spec
        assert spec.search is not None, "SearchRounds needs a spec with [search]"
        self.resolved = resolved
        self.window = spec.search.window
        self.graph = Graph.from_model(resolved.model)
        self.search = GreedySearch(self.graph, spec.search.tau)
        self.outcome = outcome
        self.enabled = progress
        self.receivers = {str(e): e.receiver.name for e in self.search.order}
        self.items: list[WorkItem] = []  # every round's, for the manifest at the end
        self.candidates: list[Candidate] = []
        self.hypotheses: dict[str, Any] = {}  # the round's, by name
        self.tables: dict[str, pa.Table] = {}  # the round's rows computed now, by item id
        self.bar: SearchProgress | None = None
        self.folder: SweepFolder | None = None

    def prepare(self, folder: SweepFolder) -> dict[str, Any]:
        self.folder = folder
        for old in [*folder.steps_dir.glob("*.parquet"), folder.root / "circuit.json",
                    folder.root / "circuit.csv"]:
            old.unlink(missing_ok=True)  # derived from the evaluations: the replay rewrites them
        return {"tau": self.search.tau, "window": self.window}

    def manifest(self, manifest: dict[str, Any]) -> dict[str, Any]:
        manifest["search_tau"] = self.search.tau  # part of the folder's identity
        manifest["search"] = {"tau": self.search.tau, "window": self.window}
        return manifest

    def next_round(self) -> Sequence[WorkItem] | None:
        """The next candidates, one group on every shard."""
        if self.search.done:
            return None
        self.candidates = self.search.candidates(self.window)
        hypotheses = [circuit_hypothesis(self.graph, c.name, c.circuit)
                      for c in self.candidates]
        self.hypotheses = {h.name: h for h in hypotheses}
        self.tables = {}
        infos = tuple(HypothesisInfo(name=h.name, canonical=h.canonical) for h in hypotheses)
        plan = self.resolved.plan
        items = make_plan(model_digest=plan.model_digest, shards=self.resolved.shards,
                          hypotheses=infos, group_size=len(infos), metric=plan.metric,
                          dtype=plan.dtype, intervention=plan.intervention,
                          ablation=plan.ablation).items
        self.items.extend(items)
        return items

    def task(self, item: WorkItem) -> Task:
        return Evaluate(item.id, item.shard.id,
                        tuple(self.hypotheses[h.name] for h in item.hypotheses))

    def computed(self, item: WorkItem, table: pa.Table) -> None:
        self.tables[item.id] = table  # its rows need not be read back from the file

    def settle(self, items: Sequence[WorkItem], failed: list[str]) -> None:
        """Each candidate's mean metric over the whole dataset, then the decisions it
        settles."""
        if failed:
            first = next((c for c in self.candidates if c.edge is not None),
                         self.candidates[0])
            raise PathPatchError(
                f"search stopped at {first.name!r}: a work item failed every attempt "
                f"({failed[0]}); fix the cause and run the same spec again: the search "
                "resumes from the evaluations already written (if a stacked round ran out of "
                "memory, a smaller search.window or resources.memory_budget stacks fewer)")
        values = self._values(items)
        steps = self.search.record(self.candidates, values)
        self.outcome.candidates += len(self.candidates)
        decided = sum(1 for s in steps if s.evaluated)
        self.outcome.discarded += len([c for c in self.candidates if c.edge is not None]) - decided
        if steps:
            assert self.folder is not None
            _write_steps(self.folder.steps_dir / f"{steps[0].index:07d}.parquet", steps,
                         self.receivers)
        if self.bar is not None:
            self.bar.update(len(steps), circuit=len(self.search.circuit),
                            evaluated=self.outcome.evaluations, reused=self.outcome.reused)

    def _values(self, items: Sequence[WorkItem]) -> dict[str, float]:
        sums: dict[str, list[float]] = {name: [] for name in self.hypotheses}
        for item in items:  # shard order: the same sums whatever order items completed in
            table = self.tables.get(item.id)
            if table is None:
                assert self.folder is not None
                table = pq.read_table(self.folder.item_path(item.id),
                                      columns=["hypothesis", "ue"])
            for name in sums:
                ue = table.filter(pc.equal(table["hypothesis"], name))["ue"].to_numpy()
                sums[name].extend(np.asarray(ue, dtype=np.float64).tolist())
        n = self.resolved.plan.n_examples
        return {name: math.fsum(v) / n for name, v in sums.items()}

    def progress(self, pending: int, outcome: Outcome) -> SearchProgress:
        self.bar = SearchProgress(len(self.search.order), enabled=self.enabled)
        return self.bar

    def finish(self, folder: SweepFolder, manifest: dict[str, Any]) -> dict[str, Any]:
        circuit = self.search.final_circuit()
        self.outcome.circuit = len(circuit)
        _write_circuit(folder.root, self.graph, self.search, self.resolved)
        manifest["items"] = [item_record(item) for item in self.items]
        manifest["search"]["circuit_edges"] = len(circuit)
        folder.write_manifest(manifest)
        return {"rounds": self.outcome.rounds, "circuit_edges": len(circuit)}


def run_search(spec: SweepSpec, out: str | Path, *, backend: str = "ray",
               address: str | None = None, progress: bool = True,
               resolved: Resolved | None = None, spec_file: str = "", force: bool = False,
               ray_init: dict[str, Any] | None = None,
               executor_options: dict[str, Any] | None = None) -> Outcome:
    """Run (or resume) the greedy search `spec.search` into folder `out`.

    Raises:
        PathPatchError: invalid spec or folder (before anything is written), a locked folder,
            or a work item that failed every attempt (the search stops there; rerun to resume).
    """
    assert spec.search is not None, "run_search needs a spec with [search]"
    if backend not in BACKENDS:
        raise ValueError(f"backend {backend!r}: allowed are {BACKENDS}")
    resolved = resolved or resolve(spec)
    address = address or os.environ.get("RAY_ADDRESS") or None
    plan = resolved.plan
    folder = SweepFolder(out)
    folder.check_target({**folder_identity(resolved), "search_tau": spec.search.tau}, force=force)
    outcome = Outcome(folder=folder.root, metric=plan.metric, search=True)
    rounds = SearchRounds(resolved, outcome, progress=progress)
    outcome.total = len(rounds.search.order)
    return drive(resolved, folder, rounds, outcome,
                 RunOptions(backend=backend, address=address,
                            ray_init=ray_init, executor_options=executor_options,
                            spec_file=spec_file))


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
