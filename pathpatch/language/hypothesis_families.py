"""Hypothesis families (a spec's `[[hypotheses]] family = ...`) and the TOML form of hypotheses.

A family generates its members from the model's graph: node and edge removals, paths through a
node, the paper's induction hypotheses, a ranking's circuit curve. Each member carries its
`Facts` (family, kind, target, ...): what the sweep's `hypotheses` table records.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable, Sequence

from pathpatch.errors import PathPatchError
from pathpatch.language import circuits
from pathpatch.language.automaton import compile_pattern
from pathpatch.language.hypotheses import Facts, Hypothesis, StructuralHypothesis
from pathpatch.language.patterns import parse
from pathpatch.model.graph import Graph, NodeKind


def _node_names(graph: Graph, kinds=(NodeKind.HEAD, NodeKind.MLP)) -> list[str]:
    return [n.name for n in graph.nodes if n.kind in kinds]


def node_removal(graph: Graph) -> list[Hypothesis]:
    """Each node removed: P = every path avoiding it (its output patched from x_c)."""
    return [StructuralHypothesis(f"remove {n}", f"~{n}", "remove_node", n,
                                 facts=Facts("node_removal", "remove_node", n))
            for n in _node_names(graph)]


def through_node(graph: Graph) -> list[Hypothesis]:
    """Each node alone: P = every path through it."""
    return [StructuralHypothesis(f"through {n}", n, "through_node", n,
                                 facts=Facts("through_node", "through_node", n))
            for n in _node_names(graph)]


def edge_removal(graph: Graph) -> list[Hypothesis]:
    """Each edge removed: P = circuit of every edge but that one."""
    return [StructuralHypothesis(f"remove {name}", f"remove({name})", "remove_edge", name,
                                 facts=Facts("edge_removal", "remove_edge", name))
            for name in graph.edge_names]


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
    facts = Facts("induction_initial")
    return [
        Hypothesis("direct-V", direct_v, facts=facts),
        Hypothesis("direct-Q", direct_q, facts=facts),
        Hypothesis("previous-token-K", prev_k, facts=facts),
        Hypothesis("initial (V | Q | K)", f"{direct_v} | {direct_q} | {prev_k}", facts=facts),
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
    members = [
        ("V at copied token", v),
        ("Q at repeat", q),
        ("K at copied token", k),
        ("K via previous-token V", k_strict),
        ("refined (V | Q | K)", f"{v} | {q} | {k}"),
        ("V by any route at copied token", v_any),
        ("refined, V by any route (V* | Q | K)", f"{v_any} | {q_all} | {k}"),
    ]
    facts = Facts("induction_refined")
    return [Hypothesis(name, pattern, facts=facts) for name, pattern in members]


def circuit_curve(graph: Graph, ranking: str, fractions: Sequence[float] | None = None,
                  orders: Sequence[str] = ("signed", "absolute")) -> list[Hypothesis]:
    """Circuits of the top k% of a ranking's edges, pruned, plus the empty circuit and the full
    model (`pathpatch.language.circuits`). `ranking`: a Parquet/CSV (edge, score) table or an EAP-IG
    graph file; a relative path is read from the spec's folder."""
    return circuits.circuit_curve(graph, circuits.Ranking.load(graph, ranking),
                                  tuple(fractions or circuits.MIB_FRACTIONS), tuple(orders))


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
    signature = inspect.signature(FAMILIES[family]).parameters
    accepted = [name for name in signature if name != "graph"]
    open_ended = any(p.kind is p.VAR_KEYWORD for p in signature.values())
    unknown = [] if open_ended else sorted(set(params) - set(accepted))
    if unknown:
        takes = (f"its parameters are {', '.join(accepted)}" if accepted
                 else "it takes no parameters")
        raise PathPatchError(f"family {family!r} has no parameter {', '.join(map(repr, unknown))}; "
                             f"{takes}")
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
        if "family" in entry and {"name", "pattern"} & set(entry):
            raise PathPatchError(
                f"{where}: has both family = {entry['family']!r} and "
                f"{' and '.join(k for k in ('name', 'pattern') if k in entry)}; an entry is either "
                "one named hypothesis {name = ..., pattern = ...} or a generated family "
                "{family = ..., its parameters}: split it into two [[hypotheses]] entries")
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
