"""What the engine prepares from hypotheses alone, once per process: compiled copies and plans.

A hypothesis's compilation (its copy graph on the evaluation graph, `for_evaluation` applied),
its position restrictions, and a group's stage plan (`GroupPlan`) depend on the hypotheses and
the model's graph, never on the data, the weights' values, dtype or device. `Prepared` keeps
them, per model, for whoever meets the same hypotheses again in the process: `evaluate` for
every batch and call (a worker's next item of the same group, on another shard; a search's next
round), and `check`, whose compilations an `evaluate` in the same process (the in-process
backend) then reuses.

Bounded: each of the two tables holds at most `max_bytes` (estimated from the copy graphs' sizes:
`Compiled.nbytes`; a plan weighs its hypotheses' together), least recently used out first; the
entry just made always stays, so what is held beyond the bound is at most what the current call
needs anyway. Reused values are the very objects a fresh compilation would build (compiling is
deterministic), so results are bitwise those of preparing anew.
"""

from __future__ import annotations

import gc
import weakref
from collections import OrderedDict
from collections.abc import Hashable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

from pathpatch.engine.stage_plan import GroupPlan
from pathpatch.errors import PathPatchError
from pathpatch.language.copies import CopyGraph, for_evaluation
from pathpatch.language.patterns import Restriction
from pathpatch.model.graph import Graph

DEFAULT_MAX_KEPT_BYTES = 256 * 1024**2
"""Bytes each table of a `Prepared` keeps (compiled hypotheses; group plans), as estimated by
`Compiled.nbytes`: some 75,000 mixed copies of GPT-2 small's graph."""


@dataclass(frozen=True)
class Compiled:
    """One hypothesis, compiled and validated against a graph (no data read)."""

    n_mixed: int
    """Mixed copies of its paths' copy graph: what `max_mixed_copies` bounds and `check`
    reports (a norm over heads' sums adds copies for evaluation, not counted here)."""
    copy_graph: CopyGraph
    """On `graph.evaluation` (`copies.for_evaluation`): what `GroupPlan` and `MemoryBudget` read."""
    restrictions: frozenset[Restriction]
    """Its position restrictions, read off its pattern once (checked against each dataset)."""
    nbytes: int
    """Memory its copy graph holds, estimated from its copies, inputs and versions (within
    about 1.5x of tracemalloc's count; its plan holds less again)."""


def _nbytes(cg: CopyGraph) -> int:
    """Estimated bytes of a copy graph's objects: per copy, per channel input, per version (a
    tuple of one id per sender)."""
    return sum(180 + sum(150 + sum(84 + 12 * len(v) for v in ci.versions) for ci in c.inputs)
               for c in cg.copies)


@contextmanager
def gc_paused() -> Iterator[None]:
    """Compiling makes ~10^5 small objects per dense circuit and no garbage cycles; CPython's
    cyclic collector would scan the heap every 700 of them (3/4 of a circuit's parse time)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


class _Lru:
    """A table bounded by the total weight of its entries, least recently used out first; the
    newest entry is never dropped (it is what the caller is about to use)."""

    def __init__(self, max_weight: int):
        self.max_weight = max_weight
        self.weight = 0
        self._entries: OrderedDict[Hashable, tuple[object, int]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: Hashable) -> object | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        self._entries.move_to_end(key)
        return entry[0]

    def put(self, key: Hashable, value: object, weight: int) -> None:
        old = self._entries.pop(key, None)
        if old is not None:
            self.weight -= old[1]
        self._entries[key] = (value, weight)
        self.weight += weight
        while self.weight > self.max_weight and len(self._entries) > 1:
            _, (_, dropped) = self._entries.popitem(last=False)
            self.weight -= dropped


def _key(*parts: object) -> Hashable | None:
    """A table key, or None where a part is not hashable (such a hypothesis is not kept)."""
    try:
        hash(parts)
    except TypeError:
        return None
    return parts


class Prepared:
    """Compiled hypotheses and group plans kept for one model (`Prepared.of`), keyed by the
    model's graph and the hypotheses themselves (frozen values: equal hypotheses shipped anew
    with each work item find what an earlier one prepared).

    Attributes:
        compiles: hypotheses compiled so far (what tests count).
        plans_built: `GroupPlan`s built so far.
    """

    def __init__(self, max_bytes: int = DEFAULT_MAX_KEPT_BYTES):
        self._compiled = _Lru(max_bytes)
        self._plans = _Lru(max_bytes)
        self.compiles = 0
        self.plans_built = 0

    @classmethod
    def of(cls, model) -> Prepared:
        """The store of `model`, made on first use. Kept in a weak table: it refers to no model
        (graphs are values), so it goes when the model does. Nothing in it depends on the
        weights, dtype or device, so changing them leaves it valid; a model given another
        config has another graph, hence other keys."""
        prepared = _BY_MODEL.get(model)
        if prepared is None:
            prepared = _BY_MODEL[model] = cls()
        return prepared

    def compile(self, graph: Graph, hypothesis, max_mixed_copies: int) -> Compiled:
        """`hypothesis` compiled on `graph`, from the table or made now.

        Raises:
            PathPatchError: the pattern does not fit the graph, or it needs more than
                `max_mixed_copies` mixed copies (naming it).
        """
        key = _key(graph, hypothesis)
        compiled = self._compiled.get(key) if key is not None else None
        if compiled is None:
            with gc_paused():
                cg = hypothesis.compile(graph)
            self.compiles += 1
            check_mixed_copies(hypothesis, cg.n_mixed, max_mixed_copies)
            with gc_paused():
                evaluated = for_evaluation(cg)
                compiled = Compiled(cg.n_mixed, evaluated, hypothesis.restrictions,
                                    _nbytes(evaluated))
            if key is not None:
                self._compiled.put(key, compiled, compiled.nbytes)
        check_mixed_copies(hypothesis, compiled.n_mixed, max_mixed_copies)
        return compiled

    def compile_all(self, graph: Graph, hypotheses: Sequence,
                    max_mixed_copies: int) -> list[Compiled]:
        return [self.compile(graph, h, max_mixed_copies) for h in hypotheses]

    def plan(self, graph: Graph, hypotheses: Sequence, compiled: Sequence[Compiled]) -> GroupPlan:
        """The stage plan of one group (`hypotheses` and their `compiled`, in order), from the
        table or built now."""
        key = _key(graph, tuple(hypotheses))
        plan = self._plans.get(key) if key is not None else None
        if plan is None:
            plan = GroupPlan(graph, [c.copy_graph for c in compiled])
            self.plans_built += 1
            if key is not None:
                self._plans.put(key, plan, sum(c.nbytes for c in compiled))
        return plan

    def clear(self) -> None:
        """Drop everything kept (the counters stay)."""
        self._compiled = _Lru(self._compiled.max_weight)
        self._plans = _Lru(self._plans.max_weight)


def check_mixed_copies(hypothesis, n_mixed: int, max_mixed_copies: int) -> None:
    if n_mixed > max_mixed_copies:
        raise PathPatchError(
            f"hypothesis {hypothesis.name!r} needs {n_mixed} mixed copies, over max_mixed_copies ="
            f" {max_mixed_copies}; simplify it or raise max_mixed_copies"
        )


_BY_MODEL: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
"""model -> its `Prepared` (weak: the store never keeps a model alive)."""
