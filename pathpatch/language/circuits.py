"""Circuits as the field reports them: edges ranked by a score, circuits of the top k% of them,
and the EAP-IG / MIB graph format they are exchanged in.

A circuit C is a set of edges; `circuit(C)` is evaluated as MIB's "patching" intervention:
edges outside C carry the counterfactual run's sender value, edges inside C the value the
circuit computes (SPEC section 6). The circuit of the top ⌊k·|E|⌋ edges is pruned to the edges
on some input → output path (what EAP-IG's `Graph.prune` keeps), and built from the graph
directly (`StructuralHypothesis` kind "circuit"), so a curve of 20 circuits of 10^5 edges each
compiles in seconds.

Edge names map both ways (`pathpatch.model.names`): pathpatch's `in->a0.3.q`, `a0.3->a1.5.k`,
`m11->out` are EAP-IG's `input->a0.h3<q>`, `a0.h3->a1.h5<k>`, `m11->logits`.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from pathpatch.data.atomic import atomic_write_bytes
from pathpatch.errors import PathPatchError
from pathpatch.language.hypotheses import FREE_FORM, Facts, Hypothesis, StructuralHypothesis
from pathpatch.model.graph import Edge, Graph, NodeKind
from pathpatch.model.names import eap_name, eap_node_name, edge_names, edge_of, pathpatch_name

__all__ = ["MIB_FRACTIONS", "Ranking", "circuit_curve", "circuit_hypothesis", "eap_name", "edge_of",
           "pathpatch_name", "prune", "read_eap_graph", "write_eap_json"]

MIB_FRACTIONS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)
"""The fractions of edges MIB's circuit-localization track evaluates."""


# --- rankings --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Ranking:
    """A score per edge (higher ranks first; by absolute value for CMD's ranking).

    Ties rank in the graph's edge order (`Graph.edges`), whatever order a file lists its rows
    in: `from_pairs` and `load` keep `scores` in the graph's edge order, which `top` breaks ties
    by (a `Ranking` made directly breaks them by its mapping's order)."""

    name: str
    scores: Mapping[Edge, float]

    @classmethod
    def from_pairs(cls, graph: Graph, name: str, pairs: Iterable[tuple[str, float]],
                   where: str = "ranking") -> Ranking:
        """Scores from (edge name, score) pairs: every edge once, finite scores."""
        scores: dict[Edge, float] = {}
        for edge_name, score in pairs:
            edge = edge_of(graph, str(edge_name), where)
            if edge in scores:
                raise PathPatchError(f"{where}: edge {edge_name!r} ({edge}) is scored twice")
            if score is None or not math.isfinite(float(score)):
                raise PathPatchError(f"{where}: edge {edge_name!r} has score {score!r}; scores "
                                     "must be finite numbers")
            scores[edge] = float(score)
        missing = [e for e in graph.edges if e not in scores]
        if missing:
            raise PathPatchError(
                f"{where}: {len(missing):,} of the model's {len(graph.edges):,} edges have no "
                f"score, e.g. {missing[0]} ({eap_name(missing[0])}); a ranking scores every edge")
        return cls(name, {e: scores[e] for e in graph.edges})  # ties: the graph's edge order

    @classmethod
    def load(cls, graph: Graph, path: str | Path) -> Ranking:
        """A ranking from a file: Parquet or CSV with columns `edge` and `score`, or an EAP-IG /
        MIB graph (`.json`, or `.pt` read with `weights_only=True`)."""
        path = Path(path)
        where = f"ranking {str(path)!r}"
        if not path.is_file():
            raise PathPatchError(f"{where}: no such file")
        suffix = path.suffix.lower()
        if suffix in (".json", ".pt"):
            scores, _ = read_eap_graph(graph, path)
            return cls(path.stem, {e: scores[e] for e in graph.edges})  # as in `from_pairs`
        if suffix not in (".parquet", ".csv"):
            raise PathPatchError(f"{where}: give a .parquet or .csv table (edge, score), or an "
                                 "EAP-IG graph (.json or .pt)")
        import pyarrow.csv as pacsv
        import pyarrow.parquet as pq

        table = pq.read_table(path) if suffix == ".parquet" else pacsv.read_csv(path)
        for column in ("edge", "score"):
            if column not in table.column_names:
                raise PathPatchError(f"{where}: no column {column!r} (columns: "
                                     f"{', '.join(table.column_names)}); expected edge, score")
        return cls.from_pairs(graph, path.stem, zip(table.column("edge").to_pylist(),
                                                    table.column("score").to_pylist(),
                                                    strict=True), where)

    def top(self, n: int, *, absolute: bool) -> list[Edge]:
        """The n highest-scoring edges; ties in `scores`' order (the graph's edge order for a
        ranking read by `from_pairs` or `load`)."""
        order = {e: i for i, e in enumerate(self.scores)}
        key = (lambda e: (-abs(self.scores[e]), order[e])) if absolute else \
            (lambda e: (-self.scores[e], order[e]))
        return sorted(self.scores, key=key)[:n]


# --- circuits --------------------------------------------------------------------------------


def prune(graph: Graph, edges: Iterable[Edge]) -> list[Edge]:
    """The edges of a set that lie on some input -> output path through the set, in the graph's
    edge order (a head's channels are one node: an edge into its q reaches what it feeds)."""
    chosen = set(edges)
    ordered = [e for e in graph.edges if e in chosen]  # by receiver: senders come first
    from_input = {graph.input}
    for e in ordered:
        if e.sender in from_input:
            from_input.add(e.receiver)
    to_output = {graph.output}
    for e in sorted(ordered, key=lambda e: -e.sender.order):
        if e.receiver in to_output:
            to_output.add(e.sender)
    return [e for e in ordered if e.sender in from_input and e.receiver in to_output]


def circuit_hypothesis(graph: Graph, name: str, edges: Sequence[Edge],
                       facts: Facts = FREE_FORM) -> Hypothesis:
    """`circuit(edges)` built from the graph directly; no edge is `none`, every edge `all`.
    Its facts are `facts` with kind "circuit" and the edges' names, in the graph's order."""
    kept = set(edges)
    names = tuple(str(e) for e in graph.edges if e in kept)
    facts = dataclasses.replace(facts, kind="circuit", edges=names)
    if not names:
        return Hypothesis(name, "none", facts=facts)
    if len(names) == len(graph.edges):
        return Hypothesis(name, "all", facts=facts)
    return StructuralHypothesis(name, "circuit(" + ", ".join(names) + ")", "circuit",
                                edges=frozenset(names), facts=facts)


def circuit_curve(graph: Graph, ranking: Ranking, fractions: Sequence[float] = MIB_FRACTIONS,
                  orders: Sequence[str] = ("signed", "absolute")) -> list[Hypothesis]:
    """For each order and fraction k: the circuit of the top ⌊k·|E|⌋ edges, pruned; then the
    empty circuit and the full model. Each member's facts hold the ranking, order, k and both
    edge counts (what the `faithfulness` view groups by); its name
    (`curve <ranking> signed k=0.01 n=324 pruned=201`) only labels it."""
    for k in fractions:
        if not isinstance(k, int | float) or isinstance(k, bool) or not 0 < k <= 1:
            raise PathPatchError(f"circuit_curve: fraction {k!r} must be in (0, 1]")
    for order in orders:
        if order not in ("signed", "absolute"):
            raise PathPatchError(f"circuit_curve: order {order!r}: use 'signed' or 'absolute'")
    total = len(graph.edges)
    out: list[Hypothesis] = []
    for order in orders:
        ranked = ranking.top(total, absolute=order == "absolute")  # sorted once per order
        for k in fractions:
            n = math.floor(k * total)
            kept = prune(graph, ranked[:n])
            name = f"curve {ranking.name} {order} k={k:g} n={n} pruned={len(kept)}"
            facts = Facts("circuit_curve", ranking=ranking.name, ordering=order, k=float(k),
                          n_edges=n, n_pruned=len(kept))
            out.append(circuit_hypothesis(graph, name, kept, facts))
    ends = (("empty", "none", ()), ("full", "all", tuple(str(e) for e in graph.edges)))
    for end, pattern, names in ends:
        out.append(Hypothesis(f"curve {ranking.name} {end}", pattern, facts=Facts(
            "circuit_curve", "circuit", ranking=ranking.name, n_edges=len(names),
            n_pruned=len(names), edges=names)))
    return out


# --- the EAP-IG / MIB graph format ----------------------------------------------------------


def _check_cfg(graph: Graph, cfg: Mapping, where: str) -> None:
    if not graph.has_mlp:
        raise PathPatchError(f"{where}: EAP-IG graphs always have MLP nodes; this model is "
                             "attention-only")
    want = {"n_layers": graph.n_layers, "n_heads": graph.n_heads,
            "parallel_attn_mlp": graph.parallel}
    for key, value in want.items():
        if key in cfg and cfg[key] != value:
            raise PathPatchError(f"{where}: cfg {key} = {cfg[key]!r}, but the model has {value!r}")


def read_eap_graph(graph: Graph, path: str | Path) -> tuple[dict[Edge, float], set[Edge]]:
    """(score per edge, edges in the circuit) of an EAP-IG graph file: its JSON (`cfg`,
    `nodes`, `edges` {name: {score, in_graph}}) or its `.pt` form (read with
    `weights_only=True`: no arbitrary objects are unpickled)."""
    path = Path(path)
    where = f"EAP-IG graph {str(path)!r}"
    if path.suffix.lower() == ".pt":
        import torch

        try:
            d = torch.load(path, weights_only=True)
        except Exception as err:  # noqa: BLE001 -- anything but plain tensors and containers
            raise PathPatchError(f"{where}: not a plain .pt graph ({err})") from None
        missing = {"cfg", "src_nodes", "dst_nodes", "edges_scores", "edges_in_graph"} - set(d)
        if missing:
            raise PathPatchError(f"{where}: missing keys {sorted(missing)}")
        _check_cfg(graph, d["cfg"], where)
        names = edge_names(graph)
        scores, in_graph = {}, set()
        for i, src in enumerate(d["src_nodes"]):
            for j, dst in enumerate(d["dst_nodes"]):
                edge = names.get(f"{src}->{dst}")  # dst names its channel: a1.h0<q>
                if edge is None:
                    continue  # not a real edge (e.g. m10->m2): EAP-IG's matrix holds zeros there
                scores[edge] = float(d["edges_scores"][i, j])
                if bool(d["edges_in_graph"][i, j]):
                    in_graph.add(edge)
    else:
        try:
            d = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise PathPatchError(f"{where}: not valid JSON ({err})") from None
        if not isinstance(d, dict) or "edges" not in d:
            raise PathPatchError(f"{where}: expected an object with 'cfg', 'nodes' and 'edges'")
        _check_cfg(graph, d.get("cfg", {}), where)
        scores, in_graph = {}, set()
        for name, info in d["edges"].items():
            edge = edge_of(graph, name, where)
            scores[edge] = float(info.get("score", 0.0) or 0.0)
            if info.get("in_graph"):
                in_graph.add(edge)
    missing = [e for e in graph.edges if e not in scores]
    if missing:
        raise PathPatchError(f"{where}: {len(missing):,} edges of the model are absent, e.g. "
                             f"{eap_name(missing[0])}")
    return scores, in_graph


def write_eap_json(graph: Graph, path: str | Path, scores: Mapping[Edge, float],
                   in_graph: Iterable[Edge], d_model: int) -> None:
    """An EAP-IG / MIB graph JSON of this model: every edge with its score and whether it is in
    the circuit; a node is in the graph when an edge of the circuit touches it."""
    kept = set(in_graph)
    touched = {n for e in kept for n in (e.sender, e.receiver)}
    nodes = {eap_node_name(n): {"in_graph": n in touched or n.kind is NodeKind.OUTPUT}
             for n in graph.nodes}
    edges = {eap_name(e): {"score": float(scores.get(e, 0.0)), "in_graph": e in kept}
             for e in graph.edges}
    cfg = {"n_layers": graph.n_layers, "n_heads": graph.n_heads,
           "parallel_attn_mlp": graph.parallel, "d_model": d_model}
    atomic_write_bytes(path, json.dumps({"cfg": cfg, "nodes": nodes, "edges": edges}).encode())
