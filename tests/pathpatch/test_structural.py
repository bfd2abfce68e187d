"""Families compiled from the graph directly equal the same patterns compiled through the parser
and the automaton: same canonical text, same copies, bitwise the same logits."""

import pytest
import torch

from pathpatch.engine.evaluation import check
from pathpatch.engine.group_evaluation import evaluate_logits
from pathpatch.engine.positions import PositionContext
from pathpatch.engine.runs import Runs
from pathpatch.language.automaton import compile_pattern
from pathpatch.language.copies import CF, CLEAN, CopyGraph, build_copies
from pathpatch.language.hypotheses import Hypothesis, StructuralHypothesis
from pathpatch.language.hypothesis_families import edge_removal, node_removal, through_node
from pathpatch.model.graph import Graph
from tests.pathpatch.conftest import tiny_model

FAMILIES = (edge_removal, node_removal, through_node)


def _shape(cg: CopyGraph) -> tuple:
    """The copy graph with copy ids replaced by their nodes' names (ids are an order only)."""
    name = {c.id: c.node.name for c in cg.copies} | {CLEAN: "CLEAN", CF: "CF"}
    copies = {c.node.name: tuple((ci.channel, ci.atoms, tuple(tuple(name[x] for x in v) for v in ci.versions),
                                  ci.atom_version) for ci in c.inputs) for c in cg.copies}
    return name[cg.root], copies


def walked(h: Hypothesis, graph: Graph) -> CopyGraph:
    """The copies the automaton walk finds (what `compile` skips for circuits and removals)."""
    return build_copies(compile_pattern(h.ast, graph))


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.__name__)
def test_every_member_equals_its_parsed_pattern(family):
    for kind in ("attn-only", "attn-only-noln", "mlp"):
        graph = Graph.from_model(tiny_model(kind, n_layers=3))
        members = family(graph)
        assert members and all(isinstance(h, StructuralHypothesis) for h in members)
        for h in members:
            parsed = Hypothesis(h.name, h.pattern)
            assert h.canonical == parsed.canonical, h.name
            direct, walk = h.compile(graph), walked(parsed, graph)
            assert _shape(direct) == _shape(walk), h.name
            assert len(direct.copies) == len(walk.copies) > 0, h.name
            assert [c.node.order for c in direct.copies] == sorted(c.node.order for c in direct.copies)


def test_direct_and_parsed_members_give_bitwise_the_same_logits():
    model = tiny_model("mlp", n_layers=3)
    graph = Graph.from_model(model)
    gen = torch.Generator().manual_seed(3)
    xr, xc = (torch.randint(0, model.cfg.d_vocab, (3, 5), generator=gen) for _ in range(2))
    members = edge_removal(graph)[::7] + node_removal(graph)[::3] + through_node(graph)[::3]
    runs = Runs(model, xr, xc)
    positions = PositionContext({}, 3, 5, xr.device)
    direct = evaluate_logits(model, graph, [h.compile(graph) for h in members], runs, positions)
    parsed = evaluate_logits(model, graph, [walked(Hypothesis(h.name, h.pattern), graph) for h in members],
                             runs, positions)
    for h, a, b in zip(members, direct, parsed, strict=True):
        assert torch.equal(a, b), h.name
        assert not torch.equal(a, runs.logits["r"]), h.name  # a real patch


@pytest.mark.parametrize("family", ["mlp", "gemma", "olmo", "neox"])
def test_validation_shares_the_cost_of_removals_into_one_receiver_class(family):
    """Each member's copies and cost, compiled alone, equal the shared ones: on plain,
    grouped-query, windowed, heads-normed (Gemma-2) and parallel (NeoX) layers alike; the
    names `edge_removal` gives are the edges' own."""
    model = tiny_model(family, n_layers=4)
    graph = Graph.from_model(model)
    members = edge_removal(graph)
    assert [h.target for h in members] == [str(e) for e in graph.edges] == list(graph.edge_names)
    shared = check(model, members, seq_len=5)
    alone = [check(model, [h], seq_len=5)[0] for h in members]
    assert shared == alone
    # one key per receiver channel class (a layer's heads are interchangeable), and per sender
    # class too where a norm reads the heads' sum
    classes = {(n.kind, n.layer, c) for n in graph.nodes[1:] for c in n.channels}
    keys = {h.shared_cost(graph) for h in members}
    if graph.heads_normed:
        assert len(classes) < len(keys) < len(members)
    else:
        assert len(keys) == len(classes) < len({(n.order, c) for n in graph.nodes[1:]
                                                for c in n.channels})


def test_an_edge_is_found_by_its_names_without_a_table_of_every_edge():
    graph = Graph.from_model(tiny_model("mlp", n_layers=3))
    for e in graph.edges:
        assert graph.edge(e.sender.name, e.receiver.name, e.channel.value) == e
    assert graph.edge("a1.0", "a0.1", "q") is None  # a later sender
    assert graph.edge("a0.0", "a0.1", "q") is None  # the same layer's head
    assert graph.edge("in", "m0", "q") is None  # an MLP has no q channel
    assert graph.edge("a9.0", "out", "resid") is None and graph.edge("in", "out", "x") is None
