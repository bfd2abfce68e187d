"""Circuits the way the field reports them: edge names both ways, pruning, ranked circuits of many
sizes, and the EAP-IG / MIB graph format (JSON and .pt), each checked independently."""

import json
import random

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from pathpatch.engine.group_evaluation import evaluate_logits
from pathpatch.engine.positions import PositionContext
from pathpatch.engine.runs import Runs
from pathpatch.errors import PathPatchError
from pathpatch.language.circuits import (
    MIB_FRACTIONS,
    Ranking,
    circuit_curve,
    circuit_hypothesis,
    eap_name,
    edge_of,
    prune,
    read_eap_graph,
    write_eap_json,
)
from pathpatch.language.hypotheses import Hypothesis, StructuralHypothesis
from pathpatch.language.hypothesis_families import load_hypotheses
from pathpatch.model.graph import Graph
from tests.pathpatch.conftest import tiny_model
from tests.pathpatch.test_group_evaluation import _circuit_hook_run
from tests.pathpatch.test_structural import _shape, walked

GRAPH = Graph(n_layers=2, n_heads=2, has_mlp=True)


def test_edge_names_map_both_ways():
    names = {str(e): eap_name(e) for e in GRAPH.edges}
    assert names["in->a0.1.q"] == "input->a0.h1<q>"
    assert names["a0.1->a1.0.k"] == "a0.h1->a1.h0<k>"
    assert names["m0->a1.1.v"] == "m0->a1.h1<v>"
    assert names["a1.1->m1"] == "a1.h1->m1"
    assert names["m1->out"] == "m1->logits"
    for edge in GRAPH.edges:
        assert edge_of(GRAPH, str(edge)) is edge and edge_of(GRAPH, eap_name(edge)) is edge
    with pytest.raises(PathPatchError, match=r"edge 'a1.h0->a0.h1<q>' is not an edge of this model"):
        edge_of(GRAPH, "a1.h0->a0.h1<q>")


def test_names_come_apart_only_through_the_codec():
    from pathpatch.model.graph import NodeKind
    from pathpatch.model.names import edge_parts, node_parts

    for edge in GRAPH.edges:  # every edge's parts are its own, from its name alone
        assert edge_parts(str(edge)) == (edge.sender.name, edge.receiver.name, edge.channel.value)
    for node in GRAPH.nodes:
        layer = node.layer if node.kind in (NodeKind.HEAD, NodeKind.MLP) else None
        assert node_parts(node.name) == (node.kind, layer, node.head)
    for bad in ("a0.1", "->a1.0.q", "in->a0.1.q->out"):
        with pytest.raises(PathPatchError, match="expected sender->receiver"):
            edge_parts(bad)
    with pytest.raises(PathPatchError, match=r"node name 'a1': expected in"):
        node_parts("a1")


def _on_some_path(graph, edges) -> set:
    """Edges of the set used by some input -> output path: every path enumerated, naively."""
    out_of: dict = {}
    for e in edges:
        out_of.setdefault(e.sender, []).append(e)
    used = set()

    def walk(node, trail):
        if node is graph.output:
            used.update(trail)
            return
        for e in out_of.get(node, []):
            walk(e.receiver, trail + [e])

    walk(graph.input, [])
    return used


def test_pruning_keeps_exactly_the_edges_on_input_to_output_paths():
    rng = random.Random(0)
    for density in (0.05, 0.1, 0.3):
        for _ in range(20):
            chosen = [e for e in GRAPH.edges if rng.random() < density]
            assert set(prune(GRAPH, chosen)) == _on_some_path(GRAPH, chosen)
    # a head reached only through its q channel still feeds what it writes to
    chain = [edge_of(GRAPH, "in->a0.0.q"), edge_of(GRAPH, "a0.0->out"), edge_of(GRAPH, "a1.1->out")]
    assert [str(e) for e in prune(GRAPH, chain)] == ["in->a0.0.q", "a0.0->out"]


def test_a_circuit_built_from_the_graph_equals_its_parsed_pattern():
    graph = Graph.from_model(tiny_model("mlp", n_layers=3))
    rng = random.Random(1)
    for density in (0.02, 0.2, 0.6):
        kept = [e for e in graph.edges if rng.random() < density]
        h = circuit_hypothesis(graph, "c", kept)
        assert isinstance(h, StructuralHypothesis)
        parsed = Hypothesis("c", h.pattern)
        assert h.canonical == parsed.canonical
        assert _shape(h.compile(graph)) == _shape(walked(parsed, graph))
    assert circuit_hypothesis(graph, "e", []).pattern == "none"
    assert circuit_hypothesis(graph, "f", graph.edges).pattern == "all"


@pytest.mark.parametrize("family", ["mlp", "neox", "gemma"])
def test_a_written_circuit_or_removal_compiles_to_what_the_walk_finds(family):
    """`circuit(...)` and `remove(...)` typed by hand (globs, whole heads, edges reaching no
    output) skip the automaton walk; their copies are the walk's, on sequential, parallel and
    post-normed wiring."""
    graph = Graph.from_model(tiny_model(family))
    rng = random.Random(4)
    patterns = ["circuit(in->a0.*, a0.*->a1.*, a1.*->out)", "circuit(in->m0, m0->a1.0.v, a1.0->out)",
                "remove(a0.0->a1.*, m1->out)", "remove(a*->out)", "circuit(in->a0.0.q)"]
    for density in (0.1, 0.5, 0.9):
        kept = [str(e) for e in graph.edges if rng.random() < density]
        patterns += [f"circuit({', '.join(kept)})", f"remove({', '.join(kept)})"]
    for pattern in patterns:
        h = Hypothesis("c", pattern)
        direct, walk = h.compile(graph), walked(h, graph)
        assert _shape(direct) == _shape(walk), pattern
        assert [c.node.order for c in direct.copies] == sorted(c.node.order for c in direct.copies)
    assert Hypothesis("c", "circuit(in->a0.0.q)").compile(graph).root == -2  # reaches no output


def _ranking(graph, seed=0) -> Ranking:
    rng = random.Random(seed)
    return Ranking.from_pairs(graph, "random", [(str(e), rng.gauss(0, 1)) for e in graph.edges])


def test_a_curve_has_every_fraction_both_orders_and_the_two_ends():
    ranking = _ranking(GRAPH)
    members = circuit_curve(GRAPH, ranking, fractions=(0.01, 0.1, 0.5, 1.0))
    assert len(members) == 2 * 4 + 2
    total = len(GRAPH.edges)
    by_name = {h.name: h for h in members}
    for order in ("signed", "absolute"):
        top = ranking.top(total // 10, absolute=order == "absolute")
        kept = prune(GRAPH, top)
        name = f"curve random {order} k=0.1 n={total // 10} pruned={len(kept)}"
        assert by_name[name].pattern == circuit_hypothesis(GRAPH, name, kept).pattern
    assert by_name["curve random empty"].pattern == "none"
    assert by_name["curve random full"].pattern == "all"
    assert [h for h in members if "k=1 " in h.name][0].pattern == "all"  # every edge, nothing pruned
    for h in members[:-2]:  # each member's facts, as data: nothing to read back from its name
        f = h.facts
        assert (f.family, f.kind, f.ranking) == ("circuit_curve", "circuit", "random")
        assert h.name == f"curve random {f.ordering} k={f.k:g} n={f.n_edges} pruned={f.n_pruned}"
        assert f.n_edges == int(f.k * total) and f.n_pruned == len(f.edges)
    assert by_name["curve random full"].facts.edges == tuple(map(str, GRAPH.edges))
    assert by_name["curve random empty"].facts.ordering is None
    signed = ranking.top(20, absolute=False)
    assert signed == sorted(signed, key=lambda e: -ranking.scores[e])
    assert ranking.top(20, absolute=True) != signed  # the orders differ on signed scores
    assert MIB_FRACTIONS[0] == 0.001 and MIB_FRACTIONS[-1] == 1.0
    with pytest.raises(PathPatchError, match="fraction 0 must be in"):
        circuit_curve(GRAPH, ranking, fractions=(0,))


def test_curve_circuits_equal_the_patching_rule_on_the_model():
    """MIB's rule, by TransformerLens hooks: edges outside C carry the counterfactual value."""
    model = tiny_model("mlp", n_layers=3, n_heads=4)
    graph = Graph.from_model(model)
    members = [h for h in circuit_curve(graph, _ranking(graph, 2), fractions=(0.05, 0.2, 0.5))
               if h.pattern not in ("none", "all")]
    gen = torch.Generator().manual_seed(4)
    xr, xc = (torch.randint(0, model.cfg.d_vocab, (2, 5), generator=gen) for _ in range(2))
    copy_graphs = [h.compile(graph) for h in members]
    assert members and all(cg.n_mixed > 0 for cg in copy_graphs)  # real recomputations
    got = evaluate_logits(model, graph, copy_graphs, Runs(model, xr, xc),
                          PositionContext({}, 2, 5, xr.device))
    for h, logits in zip(members, got, strict=True):
        kept = set(h.edges)
        torch.testing.assert_close(logits, _circuit_hook_run(model, kept, xr, xc),
                                   rtol=1e-10, atol=1e-10, msg=lambda m, h=h: f"{h.name}: {m}")


def test_rankings_load_from_parquet_csv_and_eap_graphs(tmp_path):
    ranking = _ranking(GRAPH, 3)
    names = [eap_name(e) if i % 2 else str(e) for i, e in enumerate(ranking.scores)]  # both namings
    table = pa.table({"edge": names, "score": list(ranking.scores.values())})
    pq.write_table(table, tmp_path / "r.parquet")
    (tmp_path / "r.csv").write_text("edge,score\n" + "".join(
        f"{n},{s!r}\n" for n, s in zip(names, ranking.scores.values(), strict=True)))
    kept = prune(GRAPH, ranking.top(12, absolute=True))
    write_eap_json(GRAPH, tmp_path / "r.json", ranking.scores, kept, d_model=8)
    for name in ("r.parquet", "r.csv", "r.json"):
        assert Ranking.load(GRAPH, tmp_path / name).scores == pytest.approx(ranking.scores), name
    scores, in_graph = read_eap_graph(GRAPH, tmp_path / "r.json")
    assert in_graph == set(kept)
    d = json.loads((tmp_path / "r.json").read_text())
    assert d["cfg"]["n_layers"] == 2 and d["nodes"]["logits"]["in_graph"]
    assert set(d["nodes"]) == {"input", "a0.h0", "a0.h1", "m0", "a1.h0", "a1.h1", "m1", "logits"}
    assert d["edges"]["a0.h1->a1.h0<k>"]["score"] == ranking.scores[edge_of(GRAPH, "a0.1->a1.0.k")]


def _eap_pt(graph, scores, in_graph) -> dict:
    """A graph in EAP-IG's .pt layout: [source node, destination] matrices (`Graph.to_pt`)."""
    src = ["input"] + [n for layer in range(graph.n_layers)
                       for n in [f"a{layer}.h{h}" for h in range(graph.n_heads)] + [f"m{layer}"]]
    dst = [n for layer in range(graph.n_layers)
           for n in [f"a{layer}.h{h}<{c}>" for c in "qkv" for h in range(graph.n_heads)] + [f"m{layer}"]]
    dst.append("logits")
    by_name = {eap_name(e): e for e in graph.edges}
    s, g = torch.zeros(len(src), len(dst)), torch.zeros(len(src), len(dst), dtype=torch.bool)
    for i, a in enumerate(src):
        for j, b in enumerate(dst):
            child, _, ch = b.partition("<")
            edge = by_name.get(f"{a}->{child}" + (f"<{ch}" if ch else ""))
            if edge is not None:
                s[i, j], g[i, j] = scores[edge], edge in in_graph
    return {"cfg": {"n_layers": graph.n_layers, "n_heads": graph.n_heads,
                    "parallel_attn_mlp": graph.parallel, "d_model": 8},
            "src_nodes": src, "dst_nodes": dst, "edges_scores": s, "edges_in_graph": g,
            "nodes_in_graph": torch.ones(len(src), dtype=torch.bool)}


class Payload:
    """An arbitrary object in a .pt file: `weights_only` refuses to build it."""


def test_the_pt_form_reads_without_unpickling_objects(tmp_path):
    ranking = _ranking(GRAPH, 5)
    kept = set(prune(GRAPH, ranking.top(10, absolute=False)))
    torch.save(_eap_pt(GRAPH, ranking.scores, kept), tmp_path / "g.pt")
    scores, in_graph = read_eap_graph(GRAPH, tmp_path / "g.pt")
    assert in_graph == kept
    assert scores == pytest.approx({e: float(torch.tensor(v)) for e, v in ranking.scores.items()})

    torch.save({"cfg": {}, "obj": Payload()}, tmp_path / "evil.pt")
    with pytest.raises(PathPatchError, match="not a plain .pt graph"):
        read_eap_graph(GRAPH, tmp_path / "evil.pt")


def test_bad_rankings_are_refused_by_name(tmp_path):
    edges = [str(e) for e in GRAPH.edges]
    with pytest.raises(PathPatchError, match="edges have no score, e.g."):
        Ranking.from_pairs(GRAPH, "r", [(edges[0], 1.0)])
    with pytest.raises(PathPatchError, match="is scored twice"):
        Ranking.from_pairs(GRAPH, "r", [(edges[0], 1.0), (eap_name(GRAPH.edges[0]), 2.0)])
    with pytest.raises(PathPatchError, match="score nan"):
        Ranking.from_pairs(GRAPH, "r", [(edges[0], float("nan"))])
    wrong = Graph(n_layers=3, n_heads=2, has_mlp=True)
    write_eap_json(wrong, tmp_path / "w.json", {}, [], d_model=8)
    with pytest.raises(PathPatchError, match="cfg n_layers = 3, but the model has 2"):
        read_eap_graph(GRAPH, tmp_path / "w.json")
    with pytest.raises(PathPatchError, match="always have MLP nodes"):
        read_eap_graph(Graph(n_layers=2, n_heads=2, has_mlp=False), tmp_path / "w.json")


def test_the_family_reads_its_ranking_file(tmp_path):
    ranking = _ranking(GRAPH, 6)
    path = tmp_path / "scores.parquet"
    pq.write_table(pa.table({"edge": [str(e) for e in ranking.scores],
                             "score": list(ranking.scores.values())}), path)
    members = load_hypotheses([{"family": "circuit_curve", "ranking": str(path),
                                "fractions": [0.1, 0.5], "orders": ["absolute"]}], GRAPH)
    assert [h.name.split(" k=")[-1].split(" ")[0] for h in members[:2]] == ["0.1", "0.5"]
    assert [h.name for h in members[2:]] == ["curve scores empty", "curve scores full"]


def test_the_cli_writes_a_ranking_s_circuit_for_mib(tmp_path, capsys, monkeypatch):
    from pathpatch.model.loading import load_model
    from pipeline.cli import main

    graph = Graph.from_model(load_model("mlp-2l"))
    ranking = _ranking(graph, 7)
    (tmp_path / "r.csv").write_text("edge,score\n" + "".join(
        f"{eap_name(e)},{s!r}\n" for e, s in ranking.scores.items()))
    out = tmp_path / "circuit.json"
    assert main(["circuit", str(tmp_path / "r.csv"), "--model", "mlp-2l", "--fraction", "0.2",
                 "--out", str(out)]) == 0
    scores, in_graph = read_eap_graph(graph, out)
    assert in_graph == set(prune(graph, ranking.top(len(graph.edges) // 5, absolute=False)))
    assert scores == pytest.approx(ranking.scores)
    assert "edges in the circuit" in capsys.readouterr().out
    monkeypatch.chdir(tmp_path)  # a relative --out: the message names the absolute path written
    assert main(["circuit", str(tmp_path / "r.csv"), "--model", "mlp-2l", "--out", "c.json"]) == 0
    assert capsys.readouterr().out.startswith(f"wrote {tmp_path.resolve() / 'c.json'}: ")


def test_an_edge_list_reads_as_the_parser_reads_it():
    """`circuit(...)` / `remove(...)` skip the tokenizer; every text, well formed or not, gives
    the parser's pattern or the parser's error."""
    from pathpatch.language.patterns import _Parser, parse

    texts = ["circuit(a0.3->a1.5.k, in->m0, m1->out)", " remove ( a0.* -> a1.?.q ,m0->out ) ",
             "circuit(a0.0->a1.0.x)", "circuit(a0.0 -> a1.0, a0.0->a1.0)", "remove(in->a0.0.v)",
             "circuit(in->a0.0) | a1.0", "circuit()", "circuit(in->)", "circuit(in->a0.0,)",
             "circuit(in a0.0)", "circuit((in->a0.0))", "circuit(in->a0.0) )", "circuit(->a0.0)",
             "circuit(in->a0.0#)", "circuit(0a->a1.0)", "~circuit(in->m0)"]
    for text in texts:
        try:
            want = _Parser(text).parse()
        except PathPatchError as err:
            with pytest.raises(PathPatchError) as got:
                parse(text)
            assert str(got.value) == str(err), text
        else:
            assert parse(text) == want, text
    assert parse(texts[0]) == _Parser(texts[0]).parse() != parse(texts[1])


def test_ties_rank_in_the_graph_s_edge_order_whatever_the_file_s_row_order(tmp_path):
    """A ranking written with its rows reversed ranks as the same ranking: equal scores rank in
    the graph's edge order, so `top(n)` and the curve's circuits do not depend on the file."""
    edges = list(GRAPH.edges)
    scores = [float((i * 7) % 4 - 1) for i in range(len(edges))]  # four values: ties everywhere
    rows = [(str(e), s) for e, s in zip(edges, scores, strict=True)]
    for folder, ordered in (("graph", rows), ("reversed", rows[::-1])):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "r.csv").write_text(
            "edge,score\n" + "".join(f"{n},{s!r}\n" for n, s in ordered))
        pq.write_table(pa.table({"edge": [n for n, _ in ordered], "score": [s for _, s in ordered]}),
                       tmp_path / folder / "r.parquet")
    position = {e: i for i, e in enumerate(edges)}
    for file in ("r.csv", "r.parquet"):
        a, b = (Ranking.load(GRAPH, tmp_path / folder / file) for folder in ("graph", "reversed"))
        for absolute in (False, True):
            for n in (1, 5, 13, len(edges) // 2, len(edges)):
                assert b.top(n, absolute=absolute) == a.top(n, absolute=absolute), (file, n)
            ranked = a.top(len(edges), absolute=absolute)
            key = (lambda e, a=a: abs(a.scores[e])) if absolute else (lambda e, a=a: a.scores[e])
            ties = [(x, y) for x, y in zip(ranked, ranked[1:]) if key(x) == key(y)]
            assert len(ties) > len(edges) // 2
            assert all(position[x] < position[y] for x, y in ties)  # the rule itself
        curves = [[(h.name, h.pattern, h.facts) for h in circuit_curve(GRAPH, r, (0.1, 0.3, 0.5))]
                  for r in (a, b)]
        assert curves[0] == curves[1]
