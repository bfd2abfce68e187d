"""Exact greedy circuit search (ACDC's rule) as a pure state machine that a driver feeds with
exact evaluations.

Receivers are visited from the output backwards (`out`, then every layer from the last down:
its MLP, then its heads from the highest index), and each receiver's incoming edges in the
graph's order (channels q, k, v, then senders by order). An edge e is removed from the current
circuit C when d(C without e) - d(C) < tau, d the mean over the dataset of the sweep's
metric, a distance to the clean run (ACDC's default: KL), and the removal is kept. A receiver
that no longer sends along any edge of C is read by nothing: its incoming edges are removed
without an evaluation, since they cannot change the output.

Stacking: `candidates(window)` proposes several candidate circuits at once, each assuming the
decisions before it went as predicted (the more frequent decision so far), so that a driver
can evaluate them as one hypothesis group. `record` takes the decisions in order and drops
the candidates after the first one predicted wrongly. How many are proposed adapts: one after
a wrong prediction, twice as many after a round predicted right, up to `window`, so runs of
like decisions are stacked and alternating ones cost little more than one at a time. Whatever
the window, the decisions, the steps and the final circuit are those of the search that
evaluates one candidate at a time.

Cost: one evaluation per edge that is visited (receivers still read), plus, per mispredicted
decision, the window's remaining candidates; Python set work O(|E|) per candidate.
"""

from __future__ import annotations

import hashlib
import math
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass

from pathpatch.errors import PathPatchError
from pathpatch.model.graph import Edge, Graph, NodeKind

START = "search start"
"""The name of the first evaluation: the full model (d = 0 for the built-in metrics)."""


@dataclass(frozen=True)
class Candidate:
    """One circuit to evaluate: the current one (as predicted) without `edge`.

    Attributes:
        index: the edge's position in the visiting order (-1: the full model, first).
        edge: the edge left out (None for the full model).
        circuit: the edges the candidate keeps.
        name: the hypothesis name, `search <index> without <edge> [<digest>]`, the digest
            that of the edges the circuit lacks: stable across runs, and a candidate proposed
            again after a wrong prediction (another circuit) is named apart.
    """

    index: int
    edge: Edge | None
    circuit: frozenset[Edge]
    name: str


@dataclass(frozen=True)
class Step:
    """One decision: a row of the search's `search_steps` view.

    Attributes:
        index: position in the visiting order.
        edge: the edge, in pathpatch's naming.
        before: d of the circuit before the decision.
        after: d without the edge (None when it was removed without an evaluation).
        removed: whether the edge left the circuit.
        evaluated: False for an edge into a receiver that nothing reads any more.
        circuit_edges: edges in the circuit after the decision.
    """

    index: int
    edge: str
    before: float
    after: float | None
    removed: bool
    evaluated: bool
    circuit_edges: int


def visiting_order(graph: Graph) -> list[Edge]:
    """Every edge once: receivers from the output backwards, then their incoming edges."""
    def backwards(node) -> tuple[int, int, int]:
        if node.kind is NodeKind.OUTPUT:
            return (graph.n_layers, 1, 0)
        return (node.layer, 1 if node.kind is NodeKind.MLP else 0, node.head or 0)

    receivers = sorted((n for n in graph.nodes[1:]), key=backwards, reverse=True)
    by_receiver: dict[str, list[Edge]] = {}
    for edge in graph.edges:
        by_receiver.setdefault(edge.receiver.name, []).append(edge)
    return [e for r in receivers for e in by_receiver.get(r.name, [])]


class GreedySearch:
    """ACDC's search over `graph`'s edges with threshold `tau`, one decision per visited edge."""

    def __init__(self, graph: Graph, tau: float):
        if isinstance(tau, bool) or not isinstance(tau, int | float) or not math.isfinite(tau) \
                or tau < 0:
            raise PathPatchError(f"search: tau = {tau!r}: give a threshold >= 0 (in the metric's "
                                 "units; ACDC's KL thresholds are ~0.001-0.1)")
        self.graph = graph
        self.tau = float(tau)
        self.order = visiting_order(graph)
        self.position = 0
        self.circuit: set[Edge] = set(graph.edges)
        self.value: float | None = None  # d(circuit), once the full model is evaluated
        self.steps: list[Step] = []
        self._sends = Counter(e.sender.name for e in graph.edges)  # circuit edges per sender
        self._decisions = Counter({True: 0, False: 0})  # removed?
        self._speculate = 1  # candidates to propose: doubled after a round predicted right
        self._window = 1

    @property
    def done(self) -> bool:
        return self.value is not None and self.position >= len(self.order)

    def candidates(self, window: int) -> list[Candidate]:
        """Up to `window` circuits to evaluate next (fewer after wrong predictions), within one
        receiver's incoming edges."""
        if window < 1:
            raise PathPatchError(f"search: window = {window}: give at least 1")
        if self.value is None:
            return [Candidate(-1, None, frozenset(self.circuit), START)]
        if self.position >= len(self.order):
            return []
        predict_removal = self._decisions[True] >= self._decisions[False]
        receiver = self.order[self.position].receiver
        assumed = set(self.circuit)
        out = []
        self._window = window
        width = min(window, self._speculate)
        for index in range(self.position, min(self.position + width, len(self.order))):
            edge = self.order[index]
            if edge.receiver != receiver:
                break
            circuit = frozenset(assumed - {edge})
            out.append(Candidate(index, edge, circuit,
                                 f"search {index} without {edge} [{self._digest(circuit)}]"))
            if predict_removal:
                assumed.discard(edge)
        return out

    def record(self, candidates: list[Candidate], values: Mapping[str, float]) -> list[Step]:
        """Decide in order from the candidates' d values; return the steps taken, those without
        an evaluation included (at least one when `candidates` came from `candidates()`)."""
        first = len(self.steps)
        mispredicted = False
        for c in candidates:
            if c.edge is not None and (c.index != self.position
                                       or c.circuit != frozenset(self.circuit - {c.edge})):
                mispredicted = True  # built on a decision predicted wrongly: not looked at
                break
            value = float(values[c.name])
            if not math.isfinite(value):
                raise PathPatchError(f"search: {c.name}: the metric's mean is {value}; the "
                                     "search needs finite distances")
            if c.edge is None:
                self.value = value
                continue
            removed = value - self.value < self.tau
            if removed:
                self._remove(c.edge)
            self._step(c.edge, self.value, value, removed, evaluated=True)
            if removed:
                self.value = value
            self._decisions[removed] += 1
            self.position += 1
        self._speculate = 1 if mispredicted else min(2 * self._speculate, self._window)
        self._skip_unread()
        return self.steps[first:]

    def _digest(self, circuit: frozenset[Edge]) -> str:
        """12 hex digits naming the edges `circuit` lacks (by their graph order)."""
        missing = [i for i, e in enumerate(self.graph.edges) if e not in circuit]
        return hashlib.sha256(",".join(map(str, missing)).encode()).hexdigest()[:12]

    def _skip_unread(self) -> None:
        """Remove, without evaluating, the incoming edges of receivers nothing reads."""
        while self.position < len(self.order):
            edge = self.order[self.position]
            if edge.receiver.kind is NodeKind.OUTPUT or self._sends[edge.receiver.name] > 0:
                return
            self._remove(edge)
            self._step(edge, self.value, None, True, evaluated=False)
            self.position += 1

    def _remove(self, edge: Edge) -> None:
        self.circuit.discard(edge)
        self._sends[edge.sender.name] -= 1

    def _step(self, edge: Edge, before: float, after: float | None, removed: bool, *,
              evaluated: bool) -> None:
        self.steps.append(Step(self.position, str(edge), before, after, removed, evaluated,
                               len(self.circuit)))

    def final_circuit(self) -> list[Edge]:
        """The circuit's edges in graph order (complete once `done`)."""
        return [e for e in self.graph.edges if e in self.circuit]
