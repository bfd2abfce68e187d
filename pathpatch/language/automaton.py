"""Patterns compiled to lazy automata that read a path backwards, from the output to the input.

A path is read as a word of *symbols*, one per node from `out` back to `in`:
`(node, channel, atom)`, where `channel` is how the path enters that node (None for `in`) and
`atom` is the set of restrictions that hold at that step's positions. Only restrictions that
some step of the pattern could test at (node, channel) are *relevant* there, so a node has at
most 2^r atoms (r is almost always 0, 1 or 2). States are hashable values; the automata are
never built in full, only stepped on demand by `copies.py`.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import Protocol

from pathpatch.errors import PathPatchError
from pathpatch.language.patterns import (
    Chain,
    Complement,
    EdgeSet,
    Everything,
    Gap,
    Intersection,
    Pattern,
    Restriction,
    Step,
    Union,
)
from pathpatch.model.graph import Channel, Graph, Node, NodeKind

Atom = frozenset  # frozenset[Restriction]: the restrictions true at one step
Symbol = tuple  # (Node, Channel | None, Atom)
MAX_RELEVANT_RESTRICTIONS = 6


class Language(Protocol):
    """A set of paths as a deterministic automaton over reversed symbol words."""

    def start(self) -> object: ...

    def step(self, state: object, symbol: Symbol) -> object: ...

    def accepts(self, state: object) -> bool:
        """Whether the word read so far (ending with the `in` symbol) is in the set."""
        ...

    def normalize(self, state: object, node: Node) -> object:
        """A representative of `state` that steps identically on `node`'s symbols.

        Lets copies.py share work between states that differ only in what they no longer
        need to remember (for an edge set: which receiver a live path came from).
        """
        ...


def _resolve_glob(glob: str, graph: Graph, where: str) -> frozenset[int]:
    orders = frozenset(n.order for n in graph.nodes if fnmatchcase(n.name, glob))
    if not orders:
        raise PathPatchError(f"{where}: {glob!r} matches no node; {graph.describe_nodes()}")
    return orders


@dataclass(frozen=True)
class _StepMatcher:
    step: Step
    orders: frozenset[int]

    def matches_shape(self, node: Node, channel: Channel | None) -> bool:
        """Matches (node, channel) if its restrictions were to hold."""
        if node.order not in self.orders:
            return False
        if self.step.channel is None:
            return True
        return channel is not None and channel.value == self.step.channel

    def matches(self, symbol: Symbol) -> bool:
        node, channel, atom = symbol
        return self.matches_shape(node, channel) and all(r in atom for r in self.step.restrictions)


class ChainLanguage:
    """Paths containing the chain's steps as consecutive nodes; a reversed NFA, determinized lazily.

    State: frozenset of positions in the reversed element list (a Gap position loops).
    """

    def __init__(self, chain: Chain, graph: Graph, where: str):
        elements: list[Gap | _StepMatcher] = [Gap()]
        for step in chain.steps:
            if isinstance(step, Gap):
                elements.append(step)
            else:
                matcher = _StepMatcher(step, _resolve_glob(step.glob, graph, where))
                _check_step(matcher, graph, where)
                elements.append(matcher)
        elements.append(Gap())
        self.elements = tuple(reversed(elements))
        self.matchers = tuple(e for e in self.elements if isinstance(e, _StepMatcher))

    def _closure(self, positions) -> frozenset[int]:
        out = set()
        for k in positions:
            out.add(k)
            while k < len(self.elements) and isinstance(self.elements[k], Gap):
                k += 1
                out.add(k)
        return frozenset(out)

    def start(self) -> frozenset[int]:
        return self._closure([0])

    def step(self, state: frozenset[int], symbol: Symbol) -> frozenset[int]:
        nxt = []
        for k in state:
            if k == len(self.elements):
                continue
            element = self.elements[k]
            if isinstance(element, Gap):
                nxt.append(k)
            elif element.matches(symbol):
                nxt.append(k + 1)
        return self._closure(nxt)

    def accepts(self, state: frozenset[int]) -> bool:
        return len(self.elements) in state

    def normalize(self, state: frozenset[int], node: Node) -> frozenset[int]:
        return state


def _check_step(matcher: _StepMatcher, graph: Graph, where: str) -> None:
    """Reject steps that can never mean what the user wrote (channel/restriction mismatches)."""
    step = matcher.step
    nodes = [graph.nodes[o] for o in sorted(matcher.orders)]
    if step.channel is not None and not any(n.kind is NodeKind.HEAD for n in nodes):
        raise PathPatchError(
            f"{where}: step {step} gives channel [{step.channel}] but {step.glob!r} matches no"
            " attention head (only heads have q/k/v channels)"
        )
    for r in step.restrictions:
        if r.kind in ("offset", "src") and step.channel not in ("k", "v"):
            raise PathPatchError(
                f"{where}: restriction {r} in step {step} needs a [k] or [v] channel: it"
                " constrains the source position j, and only key/value steps have one"
            )
        if r.kind == "mask" and step.channel is None and any(
            n.kind is NodeKind.HEAD for n in nodes
        ):
            raise PathPatchError(
                f"{where}: mask restriction {r} in step {step} matches heads without a channel;"
                " write [q] (1-D mask) or [k]/[v] (2-D [dest, src] mask)"
            )


class EdgeSetLanguage:
    """Paths whose every edge is in a set (a circuit). State: the last (receiver, channel) read."""

    DEAD = ("dead",)

    def __init__(self, edge_set: EdgeSet, graph: Graph, where: str):
        chosen = set()
        for spec in edge_set.edges:
            channels = (spec.channel,) if spec.channel else ("q", "k", "v", "resid")
            found = [k for ch in channels if (k := graph.edge_key(spec.sender, spec.receiver, ch))]
            if found:  # a plain name (no glob is a name of an edge)
                chosen.update(found)
                continue
            senders = _resolve_glob(spec.sender, graph, where)
            receivers = _resolve_glob(spec.receiver, graph, where)
            found = {
                (e.sender.order, e.receiver.order, e.channel)
                for e in graph.edges
                if e.sender.order in senders
                and e.receiver.order in receivers
                and (spec.channel is None or e.channel.value == spec.channel)
            }
            if not found:
                wiring = ("; in this model an MLP reads its layer's input, beside the heads: "
                          "no a{L}.* -> m{L} edges" if graph.parallel else "")
                raise PathPatchError(
                    f"{where}: edge {spec} matches no edge of the graph (senders must come before"
                    f" receivers; only heads have .q/.k/.v{wiring}; `pathpatch graph MODEL` lists"
                    " edges)"
                )
            chosen |= found
        if not edge_set.keep:
            chosen = {(e.sender.order, e.receiver.order, e.channel) for e in graph.edges} - chosen
        self.edges = frozenset(chosen)
        self.output_order = graph.output.order

    LIVE = ("live",)

    def start(self) -> tuple:
        return ("start",)

    def normalize(self, state: tuple, node: Node) -> tuple:
        """LIVE if the edge into `node`'s receiver is kept (or `node` is the output), else DEAD."""
        if state == ("start",):
            return self.LIVE if node.order == self.output_order else self.DEAD
        if state in (self.DEAD, self.LIVE):
            return state
        _, receiver, receiver_channel = state
        return self.LIVE if (node.order, receiver, receiver_channel) in self.edges else self.DEAD

    def step(self, state: tuple, symbol: Symbol) -> tuple:
        node, channel, _ = symbol
        if self.normalize(state, node) == self.DEAD:
            return self.DEAD
        return ("at", node.order, channel)

    def accepts(self, state: tuple) -> bool:
        return state == ("at", 0, None)


@dataclass
class CombinedLanguage:
    """Union / intersection of languages: the product automaton."""

    parts: tuple
    any_: bool  # True: union, False: intersection

    def start(self) -> tuple:
        return tuple(p.start() for p in self.parts)

    def step(self, state: tuple, symbol: Symbol) -> tuple:
        return tuple(p.step(s, symbol) for p, s in zip(self.parts, state, strict=True))

    def accepts(self, state: tuple) -> bool:
        results = (p.accepts(s) for p, s in zip(self.parts, state, strict=True))
        return any(results) if self.any_ else all(results)

    def normalize(self, state: tuple, node: Node) -> tuple:
        return tuple(p.normalize(s, node) for p, s in zip(self.parts, state, strict=True))


@dataclass
class ComplementLanguage:
    inner: object

    def start(self):
        return self.inner.start()

    def step(self, state, symbol):
        return self.inner.step(state, symbol)

    def accepts(self, state) -> bool:
        return not self.inner.accepts(state)

    def normalize(self, state, node: Node):
        return self.inner.normalize(state, node)


@dataclass
class ConstantLanguage:
    value: bool

    def start(self):
        return ()

    def step(self, state, symbol):
        return ()

    def accepts(self, state) -> bool:
        return self.value

    def normalize(self, state, node: Node):
        return state


@dataclass
class CompiledPattern:
    """A pattern bound to a graph: its automaton and the restrictions relevant at each step."""

    language: Language
    matchers: tuple[_StepMatcher, ...]
    graph: Graph
    _atoms: dict = field(default_factory=dict)

    def relevant(self, node: Node, channel: Channel | None) -> tuple[Restriction, ...]:
        found = {r for m in self.matchers if m.matches_shape(node, channel)
                 for r in m.step.restrictions}
        return tuple(sorted(found, key=str))

    def atoms(self, node: Node, channel: Channel | None) -> tuple[tuple[Restriction, ...], ...]:
        """Every assignment of the relevant restrictions, as the tuple of those that hold."""
        key = (node.order, channel)
        if key not in self._atoms:
            rel = self.relevant(node, channel)
            if len(rel) > MAX_RELEVANT_RESTRICTIONS:
                raise PathPatchError(
                    f"{len(rel)} different restrictions apply at {node.name}"
                    f"{'.' + channel.value if channel else ''}; at most"
                    f" {MAX_RELEVANT_RESTRICTIONS} are supported at one step"
                )
            subsets = itertools.product((False, True), repeat=len(rel))
            self._atoms[key] = tuple(
                tuple(r for r, on in zip(rel, bits, strict=True) if on) for bits in subsets
            )
        return self._atoms[key]

    @property
    def restrictions(self) -> frozenset[Restriction]:
        return frozenset(r for m in self.matchers for r in m.step.restrictions)


def compile_pattern(pattern: Pattern, graph: Graph, where: str = "pattern") -> CompiledPattern:
    """Bind a parsed pattern to a graph, resolving globs (unknown names are errors)."""
    matchers: list[_StepMatcher] = []

    def build(p: Pattern):
        if isinstance(p, Chain):
            lang = ChainLanguage(p, graph, where)
            matchers.extend(lang.matchers)
            return lang
        if isinstance(p, EdgeSet):
            return EdgeSetLanguage(p, graph, where)
        if isinstance(p, Union | Intersection):
            return CombinedLanguage(tuple(build(q) for q in p.parts), isinstance(p, Union))
        if isinstance(p, Complement):
            return ComplementLanguage(build(p.inner))
        if isinstance(p, Everything):
            return ConstantLanguage(p.value)
        raise TypeError(f"not a pattern: {p!r}")

    language = build(pattern)
    return CompiledPattern(language, tuple(matchers), graph)
