"""The distinct node copies of a treeified model, found without building the tree.

A node copy's value depends only on which prefixes complete its suffix into P: its *residual
language*. Reading paths backwards from `out`, the automaton state after a suffix determines
that language; two states may still share it, so copies are hash-consed bottom-up by what they
are made of (node, and for each channel and atom the tuple of sender copies). On a DAG that is
exactly residual-language equality up to atoms that never occur together. A copy whose inputs
are all clean is the clean run (CLEAN), all counterfactual the counterfactual run (CF); only the
rest ("mixed") are ever computed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from pathpatch.errors import PathPatchError
from pathpatch.language.automaton import CompiledPattern
from pathpatch.language.patterns import Restriction
from pathpatch.model.graph import Channel, Graph, Node, NodeKind

if TYPE_CHECKING:
    from pathpatch.model.costs import UnitCosts

CLEAN = -1
"""Copy id of a node copy equal to the clean run G(x_r): read from its cache."""
CF = -2
"""Copy id of a node copy equal to the counterfactual run G(x_c): read from its cache."""


@dataclass(frozen=True)
class ChannelInput:
    """How a mixed copy's channel reads its senders.

    `versions[v][s]` is the copy id of sender s in input version v; `atom_version[a]` says which
    version the positions where atom `atoms[a]` holds read. For `in`, `versions` is
    ((CLEAN,), (CF,)): atom a reads x_r where atom_version[a] == 0.
    """

    channel: Channel | None
    atoms: tuple[tuple[Restriction, ...], ...]
    versions: tuple[tuple[int, ...], ...]
    atom_version: tuple[int, ...]


@dataclass(frozen=True)
class Copy:
    id: int
    node: Node
    inputs: tuple[ChannelInput, ...]


@dataclass(frozen=True)
class CopyGraph:
    """The mixed copies of one hypothesis, senders before receivers; `root` is the out copy."""

    graph: Graph
    root: int
    copies: tuple[Copy, ...]

    @property
    def n_mixed(self) -> int:
        return len(self.copies)

    def by_id(self) -> dict[int, Copy]:
        return {c.id: c for c in self.copies}


def build_copies(compiled: CompiledPattern, max_states: int = 200_000) -> CopyGraph:
    """Walk (node, state) pairs from the output down, hash-consing copies by their make-up."""
    graph = compiled.graph
    lang = compiled.language
    memo: dict[tuple[int, object], int] = {}
    interned: dict[tuple, int] = {}
    copies: list[Copy] = []

    def intern(node: Node, inputs: tuple[ChannelInput, ...]) -> int:
        key = (node.order, tuple((ci.channel, ci.versions, ci.atom_version) for ci in inputs))
        if key not in interned:
            interned[key] = len(copies)
            copies.append(Copy(len(copies), node, inputs))
        return interned[key]

    def channel_input(node: Node, channel: Channel | None, state) -> ChannelInput:
        atoms = compiled.atoms(node, channel)
        versions: list[tuple[int, ...]] = []
        atom_version = []
        for atom in atoms:
            nxt = lang.step(state, (node, channel, atom))
            if node.kind is NodeKind.INPUT:
                version = (CLEAN,) if lang.accepts(nxt) else (CF,)
            else:
                version = tuple(copy_id(s, nxt) for s in graph.senders(node))
            if version not in versions:
                versions.append(version)
            atom_version.append(versions.index(version))
        return ChannelInput(channel, atoms, tuple(versions), tuple(atom_version))

    def copy_id(node: Node, state) -> int:
        state = lang.normalize(state, node)
        key = (node.order, state)
        if key in memo:
            return memo[key]
        if len(memo) >= max_states:
            raise PathPatchError(
                f"the pattern's automaton reached {max_states} (node, state) pairs; simplify it"
                " (fewer overlapping unions/complements of multi-step chains)"
            )
        channels = node.channels or (None,)
        inputs = tuple(channel_input(node, ch, state) for ch in channels)
        children = {c for ci in inputs for v in ci.versions for c in v}
        if children == {CLEAN}:
            cid = CLEAN
        elif children == {CF}:
            cid = CF
        else:
            cid = intern(node, inputs)
        memo[key] = cid
        return cid

    root = copy_id(graph.output, lang.start())
    return CopyGraph(graph, root, tuple(copies))


def single_copy_graph(graph: Graph, *, cut: dict[tuple[int, Channel], frozenset[int]] | None = None,
                      forced: dict[int, int] | None = None, input_value: int = CLEAN) -> CopyGraph:
    """The copies of a hypothesis in which every node has at most one copy, built from the
    graph directly: no pattern, no automaton walk (single-edge and node removals, through-node,
    circuits). Equal to what `build_copies` finds for the same paths (tested member by member).

    Each node's copy reads each sender's copy, except along `cut` edges ((receiver order,
    channel) -> sender orders), which read the counterfactual run (a circuit's edges outside
    it); `forced` sets a node's copy outright (node order -> CLEAN or CF: a removed node is CF,
    the node every path must cross is CLEAN over a CF input); `in` is `input_value`.
    A node whose senders are all CLEAN is CLEAN, all CF is CF; only the rest are copies.
    """
    cut, forced = cut or {}, forced or {}
    nodes = graph.nodes
    touched = [o for o, _ in cut] + list(forced)
    first = min(touched, default=len(nodes))
    value = [input_value] * len(nodes)  # before `first` every node reads `in`'s value only
    copies: list[Copy] = []
    for node in nodes[max(first, 1):]:
        if node.order in forced:
            value[node.order] = forced[node.order]
            continue
        senders, read = graph.senders(node), graph.sender_values[node.order]
        inputs, children = [], set()
        for channel in node.channels:
            removed = cut.get((node.order, channel))
            if removed:
                version = tuple(CF if s.order in removed else value[s.order] for s in senders)
            else:
                version = read(value)
            children.update(version)
            inputs.append(ChannelInput(channel, ((),), (version,), (0,)))
        if children == {CLEAN}:
            value[node.order] = CLEAN
        elif children == {CF}:
            value[node.order] = CF
        else:
            value[node.order] = len(copies)
            copies.append(Copy(len(copies), node, tuple(inputs)))
    return CopyGraph(graph, value[graph.output.order], tuple(copies))


def circuit_copies(graph: Graph, kept: frozenset[tuple[int, int, Channel]]) -> CopyGraph:
    """The copies of `circuit(E)`, E given as (sender order, receiver order, channel): every edge
    outside E reads the counterfactual run. What `build_copies` finds walking the circuit's
    automaton (tested), in one pass over the edges instead of one automaton step per symbol."""
    cut: dict[tuple[int, Channel], set[int]] = {}
    for e in graph.edges:
        if (e.sender.order, e.receiver.order, e.channel) not in kept:
            cut.setdefault((e.receiver.order, e.channel), set()).add(e.sender.order)
    return read_by_output(single_copy_graph(graph, cut={k: frozenset(v) for k, v in cut.items()}))


def read_by_output(copy_graph: CopyGraph) -> CopyGraph:
    """Only the copies the output reads, directly or not, renumbered in order: what the automaton
    walk from `out` finds. A circuit's edges that reach no output leave copies nobody reads;
    removals and through-node members never do, so only circuits pay for this pass."""
    live = {copy_graph.root}
    for copy in reversed(copy_graph.copies):  # receivers before senders
        if copy.id in live:
            live.update(c for ci in copy.inputs for v in ci.versions for c in v if c >= 0)
    if all(c.id in live for c in copy_graph.copies):
        return copy_graph
    new_id = {CLEAN: CLEAN, CF: CF}
    copies: list[Copy] = []
    for copy in copy_graph.copies:
        if copy.id not in live:
            continue
        new_id[copy.id] = len(copies)
        inputs = tuple(ChannelInput(ci.channel, ci.atoms,
                                    tuple(tuple(new_id[c] for c in v) for v in ci.versions),
                                    ci.atom_version) for ci in copy.inputs)
        copies.append(Copy(len(copies), copy.node, inputs))
    return CopyGraph(copy_graph.graph, new_id[copy_graph.root], tuple(copies))


def estimate_cost(copy_graph: CopyGraph, unit: UnitCosts) -> float:
    """Multiply-adds of computing the mixed copies, in plain forwards at the sequence length
    `unit` was made for (`costs.unit_costs`, once per model and length).

    Counted: each copy's recomputation (its q/k/v rows, attention per k and v version, W_O; its
    MLP; the unembedding) and the mixing, as the engine does it: per stage (a layer's heads, its
    MLP, the output), each distinct input row times every sender copy that any of them reads
    and that differs from the run the bank is relative to (counted against whichever of the two
    leaves fewer). A row that reads one cached run from every sender is that run's residual,
    read, not mixed: it adds no mixing; its projection is counted, though the engine computes
    it once for the hypotheses of a group that read it through the same heads and channels
    (`engine.stage_plan.CachedRows`): the estimate is a group of one's. Not counted:
    elementwise work, the cached runs, the metric.
    """
    evaluated = for_evaluation(copy_graph)
    work = 0.0
    stages: dict[tuple, tuple[set, set, set]] = {}  # (layer, kind) -> rows, sources vs CLEAN / CF
    cached = {CLEAN}, {CF}
    for copy in evaluated.copies:
        kind = copy.node.kind
        if kind is NodeKind.INPUT:
            continue  # the token embedding of x_r or x_c per position: no products
        rows, not_clean, not_cf = stages.setdefault((copy.node.layer, kind), (set(), set(), set()))
        for ci in copy.inputs:
            for version in ci.versions:
                if version in rows or set(version) in cached:  # no new row, or a cached run's
                    continue
                rows.add(version)
                not_clean.update((s, c) for s, c in enumerate(version) if c != CLEAN)
                not_cf.update((s, c) for s, c in enumerate(version) if c != CF)
        if kind is NodeKind.HEAD:
            q, k, v = (len(ci.versions) for ci in copy.inputs)
            work += ((q + k + v) * unit.projection + (k + v) * unit.attention[copy.node.layer]
                     + unit.head_output)
        elif kind is NodeKind.MLP:
            work += unit.mlp
        elif kind is NodeKind.OUTPUT:
            work += unit.unembed
    terms = min(sum(len(rows) * len(sources[i]) for rows, *sources in stages.values())
                for i in (0, 1))
    return (work + terms * unit.mixing_term) / unit.forward


def for_evaluation(copy_graph: CopyGraph) -> CopyGraph:
    """The copy graph on `graph.evaluation`: itself, or, where a norm acts on the sum of a
    layer's heads (Gemma-2), with one HEADS_SUM copy per distinct combination of that layer's
    head copies that some receiver's input version reads.

    A receiver's input then depends on the heads of a layer only through the normalized sum of
    the copies it reads, exactly as in the treeified model; a combination of clean (counterfactual)
    heads only is the clean (counterfactual) run's sum. Hash-consed per hypothesis: equal
    combinations are computed once.
    """
    graph = copy_graph.graph
    target = graph.evaluation
    if target is graph:
        return copy_graph
    nodes = target.by_name
    new_id: dict[int, int] = {CLEAN: CLEAN, CF: CF}
    sums: dict[tuple[int, tuple[int, ...]], int] = {}
    copies: list[Copy] = []

    def sum_of(layer: int, heads: tuple[int, ...]) -> int:
        if all(c == CLEAN for c in heads):
            return CLEAN
        if all(c == CF for c in heads):
            return CF
        key = (layer, heads)
        if key not in sums:
            sums[key] = len(copies)
            node = nodes[f"a{layer}"]
            copies.append(Copy(len(copies), node, (ChannelInput(Channel.RESID, ((),), (heads,), (0,)),)))
        return sums[key]

    # where each evaluation-graph sender's value comes from, per receiver node kind and layer
    layouts: dict[int, list[tuple[int | None, list[int]]]] = {}

    def layout(node: Node) -> list[tuple[int | None, list[int]]]:
        """Per evaluation sender: (sum layer or None, positions in the path graph's senders)."""
        if node.order not in layouts:
            path_senders = graph.senders(node)
            at = {s.name: i for i, s in enumerate(path_senders)}
            out = []
            for s in target.senders(nodes[node.name]):
                if s.kind is NodeKind.HEADS_SUM:
                    out.append((s.layer, [at[f"a{s.layer}.{h}"] for h in range(graph.n_heads)]))
                else:
                    out.append((None, [at[s.name]]))
            layouts[node.order] = out
        return layouts[node.order]

    for copy in copy_graph.copies:  # senders before receivers
        inputs = []
        for ci in copy.inputs:
            if copy.node.kind is NodeKind.INPUT:
                inputs.append(ci)
                continue
            versions = []
            for version in ci.versions:
                mapped = [new_id[c] for c in version]
                versions.append(tuple(
                    sum_of(layer, tuple(mapped[i] for i in where)) if layer is not None
                    else mapped[where[0]]
                    for layer, where in layout(copy.node)))
            inputs.append(ChannelInput(ci.channel, ci.atoms, tuple(versions), ci.atom_version))
        new_id[copy.id] = len(copies)
        copies.append(Copy(len(copies), nodes[copy.node.name], tuple(inputs)))
    return CopyGraph(target, new_id[copy_graph.root], tuple(copies))
