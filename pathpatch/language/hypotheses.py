"""Named hypotheses: a pattern with a name, generated families of them, and their TOML form.

A hypothesis is data (name + pattern text), frozen and picklable; compiling it against a
model's graph gives its automaton and its mixed copies.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import cached_property

from pathpatch.errors import PathPatchError
from pathpatch.language.automaton import EdgeSetLanguage, compile_pattern
from pathpatch.language.copies import CF, CLEAN, CopyGraph, build_copies, circuit_copies, single_copy_graph
from pathpatch.language.patterns import (
    Chain,
    Complement,
    Intersection,
    Pattern,
    Restriction,
    Step,
    Union,
    parse,
)
from pathpatch.model.graph import Channel, Graph, NodeKind


@dataclass(frozen=True)
class Hypothesis:
    """P as a pattern over paths (see `pathpatch.language.patterns` for the grammar)."""

    name: str
    pattern: str

    @cached_property
    def ast(self) -> Pattern:
        try:
            return parse(self.pattern)
        except PathPatchError as err:
            raise PathPatchError(f"hypothesis {self.name!r}: {err}") from None

    @property
    def canonical(self) -> str:
        """Normalized pattern text: equal for patterns that differ only in spacing/brackets."""
        return str(self.ast)

    def compile(self, graph: Graph, max_states: int = 200_000) -> CopyGraph:
        compiled = compile_pattern(self.ast, graph, where=f"hypothesis {self.name!r}")
        if isinstance(compiled.language, EdgeSetLanguage):  # circuit(E) / remove(R): no walk needed
            return circuit_copies(graph, compiled.language.edges)
        return build_copies(compiled, max_states=max_states)

    @property
    def restrictions(self) -> frozenset[Restriction]:
        """Every position restriction the pattern uses (read off the AST: no graph needed)."""
        found: set[Restriction] = set()
        todo = [self.ast]
        while todo:
            p = todo.pop()
            if isinstance(p, Chain):
                found.update(r for step in p.steps if isinstance(step, Step) for r in step.restrictions)
            elif isinstance(p, Union | Intersection):
                todo.extend(p.parts)
            elif isinstance(p, Complement):
                todo.append(p.inner)
        return frozenset(found)


@dataclass(frozen=True)
class StructuralHypothesis(Hypothesis):
    """A family member valid by construction, whose copies are built from the graph directly
    (`copies.single_copy_graph`): no parsing, no automaton walk, so families of 10^5 members
    compile in seconds.

    `pattern` is the equivalent free-form pattern, written in its canonical form, so identities,
    copies and results equal those of `Hypothesis(name, pattern)` (tested for every member).
    """

    kind: str = ""
    """"remove_edge" (target: an edge name), "remove_node" or "through_node" (a node name), or
    "circuit" (`edges`: the names of the edges kept)."""
    target: str = ""
    edges: frozenset[str] = frozenset()

    @property
    def canonical(self) -> str:
        return self.pattern

    @property
    def restrictions(self) -> frozenset[Restriction]:
        return frozenset()

    @property
    def shared_cost(self) -> tuple | None:
        """Members with equal keys have equal copy counts and costs: single-edge removals into
        one receiver channel differ only in which sender reads x_c (validation compiles one)."""
        if self.kind == "remove_edge":
            receiver = self.target.split("->")[1]
            return (self.kind, receiver)
        return None

    def compile(self, graph: Graph, max_states: int = 200_000) -> CopyGraph:
        if self.kind == "remove_edge":
            sender, receiver, channel = edge_parts(self.target)
            edge = graph.edges_by_name[(sender, receiver, channel)]
            cut = {(edge.receiver.order, edge.channel): frozenset([edge.sender.order])}
            return single_copy_graph(graph, cut=cut)
        if self.kind == "circuit":
            return circuit_copies(graph, frozenset((e.sender.order, e.receiver.order, e.channel)
                                                   for e in graph.edges if str(e) in self.edges))
        node = graph.node(self.target)
        if self.kind == "remove_node":
            return single_copy_graph(graph, forced={node.order: CF})
        if self.kind == "through_node":
            return single_copy_graph(graph, forced={node.order: CLEAN}, input_value=CF)
        raise ValueError(f"unknown structural hypothesis kind {self.kind!r}")


def edge_parts(name: str) -> tuple[str, str, str]:
    """'a0.3->a1.5.k' -> ('a0.3', 'a1.5', 'k'); 'a0.3->m1' -> ('a0.3', 'm1', 'resid')."""
    sender, receiver = name.split("->")
    if receiver.count(".") == 2:  # a head: a{L}.{H}.{channel}
        receiver, channel = receiver.rsplit(".", 1)
        return sender, receiver, channel
    return sender, receiver, Channel.RESID.value


def _node_names(graph: Graph, kinds=(NodeKind.HEAD, NodeKind.MLP)) -> list[str]:
    return [n.name for n in graph.nodes if n.kind in kinds]


def node_removal(graph: Graph) -> list[Hypothesis]:
    """Each node removed: P = every path avoiding it (its output patched from x_c)."""
    return [StructuralHypothesis(f"remove {n}", f"~{n}", "remove_node", n) for n in _node_names(graph)]


def through_node(graph: Graph) -> list[Hypothesis]:
    """Each node alone: P = every path through it."""
    return [StructuralHypothesis(f"through {n}", n, "through_node", n) for n in _node_names(graph)]


def edge_removal(graph: Graph) -> list[Hypothesis]:
    """Each edge removed: P = circuit of every edge but that one."""
    return [StructuralHypothesis(f"remove {e}", f"remove({e})", "remove_edge", str(e))
            for e in graph.edges]


def _alternatives(globs: Sequence[str], fmt: str) -> str:
    parts = [fmt.format(g) for g in globs]
    return parts[0] if len(parts) == 1 else "(" + " | ".join(parts) + ")"


def induction_initial(
    graph: Graph, prev_heads: Sequence[str], induction_heads: Sequence[str]
) -> list[Hypothesis]:
    """The paper's initial induction hypothesis and its three parts.

    direct-V: the induction heads' values read the embedding directly; direct-Q: so do their
    queries; previous-token-K: their keys read previous-token heads that read the embedding.
    Every path listed sees x_r; all others see x_c.
    """
    prev_heads = _globs("induction_initial", "prev_heads", prev_heads)
    induction_heads = _globs("induction_initial", "induction_heads", induction_heads)
    for glob in (*prev_heads, *induction_heads):
        compile_pattern(parse(glob), graph, where="induction_initial")
    ind = list(induction_heads)
    direct_v = _alternatives(ind, "in -> {}[v] -> out")
    direct_q = _alternatives(ind, "in -> {}[q] -> out")
    prev_k = _alternatives(
        [f"in -> {p} -> {i}[k] -> out" for p in prev_heads for i in ind], "{}"
    )
    return [
        Hypothesis("direct-V", direct_v),
        Hypothesis("direct-Q", direct_q),
        Hypothesis("previous-token-K", prev_k),
        Hypothesis("initial (V | Q | K)", f"{direct_v} | {direct_q} | {prev_k}"),
    ]


def induction_refined(
    graph: Graph, prev_heads: Sequence[str], induction_heads: Sequence[str]
) -> list[Hypothesis]:
    """Position-refined induction hypotheses (they read the induction task's masks).

    V: the induction heads' values read the embedding only at the source position right after
    the earlier occurrence of the current token (the token to be copied); Q: their queries read
    the embedding only where the repeat is; K: their keys read previous-token heads only at that
    same source position, and (strict) those heads carry the previous token through their values.
    The last two let the values arrive by any route (e.g. through layer-0 heads), still only
    from the copied token's position.
    """
    prev_heads = _globs("induction_refined", "prev_heads", prev_heads)
    induction_heads = _globs("induction_refined", "induction_heads", induction_heads)
    ind = list(induction_heads)
    after = "@mask=after_prev_occurrence"
    v = _alternatives(ind, "in -> {}[v]" + after + " -> out")
    q = _alternatives(ind, "in -> {}[q]@mask=repeat -> out")
    k = _alternatives([f"in -> {p} -> {i}[k]{after} -> out" for p in prev_heads for i in ind], "{}")
    k_strict = _alternatives(
        [f"in -> {p}[v]@prev -> {i}[k]{after} -> out" for p in prev_heads for i in ind], "{}"
    )
    v_any = _alternatives(ind, "... -> {}[v]" + after + " -> out")
    q_all = _alternatives(ind, "in -> {}[q] -> out")
    return [
        Hypothesis("V at copied token", v),
        Hypothesis("Q at repeat", q),
        Hypothesis("K at copied token", k),
        Hypothesis("K via previous-token V", k_strict),
        Hypothesis("refined (V | Q | K)", f"{v} | {q} | {k}"),
        Hypothesis("V by any route at copied token", v_any),
        Hypothesis("refined, V by any route (V* | Q | K)", f"{v_any} | {q_all} | {k}"),
    ]


def circuit_curve(graph: Graph, ranking: str, fractions: Sequence[float] | None = None,
                  orders: Sequence[str] = ("signed", "absolute")) -> list[Hypothesis]:
    """Circuits of the top k% of a ranking's edges, pruned, plus the empty circuit and the full
    model (`pathpatch.discovery.circuits`). `ranking`: a Parquet/CSV (edge, score) table or an EAP-IG
    graph file; a relative path is read from the spec's folder."""
    from pathpatch.discovery.circuits import MIB_FRACTIONS, Ranking
    from pathpatch.discovery.circuits import circuit_curve as curve

    return curve(graph, Ranking.load(graph, ranking), tuple(fractions or MIB_FRACTIONS),
                 tuple(orders))


FAMILIES = {
    "node_removal": node_removal,
    "edge_removal": edge_removal,
    "through_node": through_node,
    "induction_initial": induction_initial,
    "induction_refined": induction_refined,
    "circuit_curve": circuit_curve,
}


def expand_family(graph: Graph, family: str, **params) -> list[Hypothesis]:
    """Generate a named family of hypotheses for this graph."""
    if family not in FAMILIES:
        raise PathPatchError(f"unknown family {family!r}; known: {', '.join(sorted(FAMILIES))}")
    try:
        return FAMILIES[family](graph, **params)
    except TypeError as err:
        raise PathPatchError(f"family {family!r}: bad parameters {sorted(params)}: {err}") from None


def check_name(name: object, where: str) -> str:
    """A hypothesis name: a one-line printable string (it labels rows, SQL results, plots)."""
    if not isinstance(name, str) or not name.strip():
        raise PathPatchError(f"{where}: name = {name!r} must be a non-empty string")
    if len(name) > 200 or not name.isprintable():
        raise PathPatchError(f"{where}: name = {name!r} must be one line of printable "
                             "characters (no newline, tab or NUL), at most 200 long")
    return name


def _globs(family: str, key: str, value: object) -> list[str]:
    """A family's list-of-globs parameter (a bare string would be read letter by letter)."""
    if isinstance(value, str) or not isinstance(value, Sequence) or not value \
            or not all(isinstance(v, str) for v in value):
        raise PathPatchError(f"{family} needs {key} as a non-empty list of node globs, e.g. "
                             f"{key} = [\"a0.3\"]; got {value!r}")
    return list(value)


def load_hypotheses(entries: Iterable[dict], graph: Graph) -> list[Hypothesis]:
    """Hypotheses from TOML tables: `{name, pattern}` or `{family, ...params}`; names unique."""
    out: list[Hypothesis] = []
    for i, entry in enumerate(entries):
        where = f"hypotheses[{i}]"
        if not isinstance(entry, dict):
            raise PathPatchError(f"{where}: expected a table, got {entry!r}")
        if "family" in entry:
            params = {k: v for k, v in entry.items() if k != "family"}
            try:
                out.extend(expand_family(graph, entry["family"], **params))
            except PathPatchError as err:
                raise PathPatchError(f"{where}: {err}") from None
            continue
        unknown = set(entry) - {"name", "pattern"}
        if unknown or "pattern" not in entry or "name" not in entry:
            raise PathPatchError(
                f"{where}: a hypothesis is {{name = ..., pattern = ...}} or {{family = ..., ...}};"
                f" got keys {sorted(entry)}"
            )
        name, pattern = entry["name"], entry["pattern"]
        if not isinstance(pattern, str):
            raise PathPatchError(f"{where}: pattern = {pattern!r} must be a string")
        hyp = Hypothesis(check_name(name, where), pattern)
        hyp.compile(graph)  # parse + resolve names now, so errors point here
        out.append(hyp)
    seen: set[str] = set()
    for h in out:
        if h.name in seen:
            raise PathPatchError(f"duplicate hypothesis name {h.name!r}; names must be unique")
        seen.add(h.name)
    return out
