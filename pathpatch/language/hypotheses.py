"""Named hypotheses: a pattern with a name, and the structural members families build.

A hypothesis is data (name + pattern text), frozen and picklable; compiling it against a
model's graph gives its automaton and its mixed copies. What a family knows about a member
(which edge it removes, which ranking and k it comes from) travels beside it as `Facts`: the
name is a label, never read back.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

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
from pathpatch.model.graph import Graph
from pathpatch.model.names import edge_parts, node_parts

__all__ = ["Facts", "Hypothesis", "StructuralHypothesis"]


@dataclass(frozen=True, slots=True)  # one per hypothesis: no __dict__
class Facts:
    """What a hypothesis is, as its family knew it when it built it: the columns of a sweep's
    `hypotheses` table (`pipeline.store.HYPOTHESES_SCHEMA`), which the views join on.

    A free-form hypothesis knows nothing (every field None); a family fills what applies.
    """

    family: str | None = None
    """The family that generated it (`hypothesis_families.FAMILIES`' key, e.g. "edge_removal")."""
    kind: str | None = None
    """"remove_edge", "remove_node", "through_node" or "circuit" (a curve's member, `none`
    and `all` included); None for a family whose members are free patterns (induction_*)."""
    target: str | None = None
    """The edge (remove_edge) or node (remove_node, through_node) it acts on."""
    ranking: str | None = None
    """circuit_curve: the ranking's name (its file's stem)."""
    ordering: str | None = None
    """circuit_curve: "signed" or "absolute" (by |score|); None for the curve's empty and full
    ends, which no ranking chose."""
    k: float | None = None
    """circuit_curve: the fraction of the graph's edges taken from the ranking."""
    n_edges: int | None = None
    """circuit_curve: edges taken from the ranking (⌊k·|E|⌋), before pruning."""
    n_pruned: int | None = None
    """circuit_curve: edges in the circuit, after pruning (`len(edges)`)."""
    edges: tuple[str, ...] | None = None
    """circuit: the circuit's edge names, in the graph's edge order."""


FREE_FORM = Facts()
"""The facts of a hypothesis no family made: none."""


@dataclass(frozen=True, slots=True)  # a scan holds 10^6 of them: no __dict__
class Hypothesis:
    """P as a pattern over paths (see `pathpatch.language.patterns` for the grammar).

    `facts` (keyword only) records what its family knew; it is no part of the hypothesis's
    identity (equality, hashing, a work item's hash all see name and pattern only).
    """

    name: str
    pattern: str
    facts: Facts = field(default=FREE_FORM, compare=False, repr=False, kw_only=True)
    _parsed: Pattern | None = field(default=None, init=False, compare=False, repr=False)

    @property
    def ast(self) -> Pattern:
        """The parsed pattern, parsed on first use and kept."""
        if self._parsed is None:
            try:
                parsed = parse(self.pattern)
            except PathPatchError as err:
                raise PathPatchError(f"hypothesis {self.name!r}: {err}") from None
            object.__setattr__(self, "_parsed", parsed)
        return self._parsed

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


@dataclass(frozen=True, slots=True)
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
        return _NO_RESTRICTIONS

    def shared_cost(self, graph: Graph) -> tuple | None:
        """Members with equal keys have equal copy counts and costs on `graph` (validation
        compiles one): single-edge removals into one receiver channel differ only in which
        sender reads x_c, and the heads of one layer are interchangeable in the graph (the same
        senders and receivers), so the key is the receiver's kind and layer and the channel:
        129 keys for Llama-3.1-8B's 1.6 million edges. Where a norm reads each layer's heads'
        sum (`graph.heads_normed`), a head sender's sum is recomputed too: the sender's kind
        joins the key (its layer does not change the cost: tested member by member)."""
        if self.kind != "remove_edge":
            return None
        sender, _, into = self.target.partition("->")
        key = _removal_class(into)
        return key + (node_parts(sender)[0].value,) if graph.heads_normed else key

    def compile(self, graph: Graph, max_states: int = 200_000) -> CopyGraph:
        if self.kind == "remove_edge":
            sender, receiver, channel = edge_parts(self.target)
            edge = graph.edge(sender, receiver, channel)
            if edge is None:
                raise PathPatchError(f"hypothesis {self.name!r}: the graph has no edge "
                                     f"{self.target!r}")
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



_NO_RESTRICTIONS: frozenset[Restriction] = frozenset()


@functools.lru_cache(maxsize=1 << 16)  # a scan's 10^6 removals have a few thousand receivers
def _removal_class(into: str) -> tuple:
    """("remove_edge", the receiver's kind, its layer, the channel) of a removal whose edge
    name ends in `->into`."""
    _, receiver, channel = edge_parts("in->" + into)
    kind, layer, _ = node_parts(receiver)
    return ("remove_edge", kind.value, layer, channel)
