"""Named hypotheses: a pattern with a name, and the structural members families build.

A hypothesis is data (name + pattern text), frozen and picklable; compiling it against a
model's graph gives its automaton and its mixed copies.
"""

from __future__ import annotations

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
from pathpatch.model.graph import Channel, Graph


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
