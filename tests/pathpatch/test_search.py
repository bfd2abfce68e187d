"""The greedy search's rule and its stacking, on distances computed in the test: whatever the
window, the decisions and the circuit are the one-at-a-time search's."""

import itertools
import math
import random

import pytest

from pathpatch.discovery.greedy import START, GreedySearch, visiting_order
from pathpatch.errors import PathPatchError
from pathpatch.model.graph import Graph
from tests.pathpatch.conftest import tiny_model


def _graph() -> Graph:
    return Graph.from_model(tiny_model("mlp", n_layers=2))


def _distance(graph: Graph, seed: int):
    """d(C): a nonlinear function of the edges C leaves out (pairs interact), 0 for all edges,
    blind to the edges into receivers nothing reads."""
    rng = random.Random(seed)
    weight = {e: rng.choice([0.0, 0.0, 0.001, 0.02, 0.5]) for e in graph.edges}
    pairs = {(a, b): rng.uniform(-0.01, 0.01)
             for a, b in itertools.combinations(rng.sample(graph.edges, 12), 2)}

    def d(circuit) -> float:
        # as in the engine, an edge into a receiver that no circuit edge reads cannot matter
        read = {e.sender for e in circuit} | {graph.output}
        missing = {e for e in set(graph.edges) - set(circuit) if e.receiver in read}
        linear = sum(weight[e] for e in missing)
        return linear ** 1.5 + sum(w for (a, b), w in pairs.items() if a in missing and b in missing)

    return d


def _run(graph: Graph, tau: float, window: int, d) -> tuple[GreedySearch, int]:
    search = GreedySearch(graph, tau)
    evaluated = 0
    circuits: dict[str, frozenset] = {}  # a name always means one circuit (its result file)
    while not search.done:
        candidates = search.candidates(window)
        assert candidates and len(candidates) <= window
        for c in candidates:
            assert circuits.setdefault(c.name, c.circuit) == c.circuit
        evaluated += len(candidates)
        search.record(candidates, {c.name: d(c.circuit) for c in candidates})
    return search, evaluated


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_any_window_takes_the_one_at_a_time_search_s_decisions(seed):
    graph = _graph()
    d = _distance(graph, seed)
    one, cost_one = _run(graph, 0.01, 1, d)
    assert 0 < len(one.circuit) < len(graph.edges)  # some edges kept, some removed
    for window in (2, 5, 64):
        many, cost = _run(graph, 0.01, window, d)
        assert many.steps == one.steps
        assert many.circuit == one.circuit
        assert cost >= cost_one  # discarded candidates cost evaluations, never decisions


def test_each_decision_follows_acdc_s_rule_and_unread_receivers_are_dropped():
    graph = _graph()
    d = _distance(graph, 3)
    search, _ = _run(graph, 0.01, 4, d)
    assert [s.index for s in search.steps] == list(range(len(graph.edges)))
    assert {s.edge for s in search.steps} == {str(e) for e in graph.edges}
    circuit = set(graph.edges)
    by_name = {str(e): e for e in graph.edges}
    for s in search.steps:
        edge = by_name[s.edge]
        assert math.isclose(s.before, d(circuit), abs_tol=1e-15)
        if s.evaluated:
            assert s.after == d(circuit - {edge})
            assert s.removed == (s.after - s.before < 0.01)
        else:  # nothing reads the receiver any more: its inputs cannot matter
            assert s.removed and edge.receiver.kind.value != "output"
            assert not any(e.sender == edge.receiver for e in circuit)
        if s.removed:
            circuit.discard(edge)
        assert s.circuit_edges == len(circuit)
    assert circuit == search.circuit
    assert any(not s.evaluated for s in search.steps)  # the rule above was exercised


def test_receivers_are_visited_from_the_output_backwards():
    graph = _graph()
    order = visiting_order(graph)
    assert sorted(map(str, order)) == sorted(map(str, graph.edges))
    receivers = list(dict.fromkeys(e.receiver.name for e in order))
    assert receivers[:2] == ["out", "m1"] and receivers[-1] == "a0.0"
    layers = [graph.node(n).layer if n != "out" else graph.n_layers for n in receivers]
    assert layers == sorted(layers, reverse=True)


def test_the_first_evaluation_is_the_full_model_and_bad_input_is_refused():
    graph = _graph()
    search = GreedySearch(graph, 0.1)
    (first,) = search.candidates(8)
    assert first.name == START and first.circuit == frozenset(graph.edges)
    with pytest.raises(PathPatchError, match="tau = -1"):
        GreedySearch(graph, -1)
    with pytest.raises(PathPatchError, match="window = 0"):
        search.candidates(0)
    with pytest.raises(PathPatchError, match="finite"):
        search.record([first], {START: float("nan")})
