"""A transformer as a DAG of nodes (input, heads, MLPs, output) joined by residual-stream edges.

A sender feeds a receiver's channel whenever it writes to the residual stream before the
receiver reads it. Biases are the same in every run, so they are constants, not senders.
Where a node's output lives in a model's runs is the adapter's business (`arch.py`).
"""

from __future__ import annotations

import bisect
import dataclasses
import enum
import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cached_property

from pathpatch.errors import PathPatchError


class NodeKind(enum.Enum):
    INPUT = "input"
    """Token + positional embedding (`in`)."""
    HEAD = "head"
    """One attention head (`a{layer}.{head}`); reads through channels q, k, v."""
    MLP = "mlp"
    """One MLP layer (`m{layer}`); reads the residual stream through one channel."""
    OUTPUT = "output"
    """The unembedding input (`out`), after the final LayerNorm's input."""
    HEADS_SUM = "heads_sum"
    """A layer's heads summed and normalized (`a{layer}`, Gemma-2's post-attention norm). Not a
    node of paths or hypotheses: only the evaluation graph (`Graph.evaluation`) has it, so
    that a receiver reads one normalized sum per combination of head copies."""


class Channel(enum.Enum):
    Q = "q"
    """Head query input: keeps the position i."""
    K = "k"
    """Head key input: at destination i, read from a source j <= i."""
    V = "v"
    """Head value input: at destination i, read from a source j <= i."""
    RESID = "resid"
    """The single input of an MLP or the output: keeps the position i."""

    @property
    def is_2d(self) -> bool:
        """Whether a step into this channel moves information between positions."""
        return self in (Channel.K, Channel.V)


HEAD_CHANNELS = (Channel.Q, Channel.K, Channel.V)
_CHANNELS = {c.value: c for c in Channel}


@dataclass(frozen=True, order=True)
class Node:
    """A graph node. `order` is its topological rank (senders always rank lower)."""

    order: int
    name: str
    kind: NodeKind
    layer: int
    head: int | None = None

    @property
    def channels(self) -> tuple[Channel, ...]:
        if self.kind is NodeKind.HEAD:
            return HEAD_CHANNELS
        if self.kind is NodeKind.INPUT:
            return ()
        return (Channel.RESID,)

    def __str__(self) -> str:
        return self.name


@dataclass(frozen=True, slots=True)  # a graph holds 10^6 of them: no __dict__
class Edge:
    """`sender -> receiver.channel`; prints as `a0.3->a1.5.k` (channel omitted for MLP/out)."""

    sender: Node
    receiver: Node
    channel: Channel

    def __str__(self) -> str:
        if self.channel is Channel.RESID:
            return f"{self.sender.name}->{self.receiver.name}"
        return f"{self.sender.name}->{self.receiver.name}.{self.channel.value}"


@dataclass(frozen=True)
class Graph:
    """The node/edge structure of one model shape (no weights): what hypotheses refer to."""

    n_layers: int
    n_heads: int
    has_mlp: bool
    parallel: bool = False
    """Each MLP reads its layer's input beside the heads (GPT-J, GPT-NeoX), not after them."""
    heads_normed: bool = False
    """A norm acts on the sum of each layer's heads before the residual stream (Gemma-2)."""
    sums: bool = False
    """The evaluation graph of a `heads_normed` model: each layer's heads feed one HEADS_SUM
    node, which every later receiver reads instead of the heads."""

    @classmethod
    def from_config(cls, cfg) -> Graph:
        """The graph of a `ModelConfig`, read without torch or weights (`pathpatch graph`,
        `explain`, `circuit`); refuses, by name, any feature the engine does not compute
        exactly (`support.check_supported`)."""
        from pathpatch.model.support import check_supported

        check_supported(cfg)
        return cls(n_layers=cfg.n_layers, n_heads=cfg.n_heads, has_mlp=cfg.has_mlp,
                   parallel=cfg.mlp_beside_heads, heads_normed=cfg.heads_normed)

    @classmethod
    def from_model(cls, model) -> Graph:
        """The graph of a pathpatch `Transformer` (`from_config` of its config), with no hooks
        left on it. Made and checked once per model: the model's adapter keeps it
        (`Adapter.of`); `engine.evaluate` checks for hooks attached since on every call
        (`support.check_no_hooks`)."""
        # deferred: the graph's vocabulary (Node, Edge, names) is read without torch, so the
        # command line's sql, status and report start in a fraction of a second
        from pathpatch.model.adapter import Adapter
        from pathpatch.model.support import check_no_hooks

        arch = Adapter.of(model)
        if arch.graph is None:
            check_no_hooks(model)
            arch.graph = cls.from_config(model.cfg)
        return arch.graph

    @cached_property
    def evaluation(self) -> Graph:
        """The graph mixed copies are computed on: this one, or with HEADS_SUM nodes where a
        norm acts on the sum of a layer's heads (paths and edge names stay those of `self`)."""
        if self.heads_normed and not self.sums:
            return dataclasses.replace(self, sums=True)
        return self

    @cached_property
    def nodes(self) -> tuple[Node, ...]:
        nodes = [Node(0, "in", NodeKind.INPUT, -1)]
        for layer in range(self.n_layers):
            for head in range(self.n_heads):
                nodes.append(Node(len(nodes), f"a{layer}.{head}", NodeKind.HEAD, layer, head))
            if self.sums:
                nodes.append(Node(len(nodes), f"a{layer}", NodeKind.HEADS_SUM, layer))
            if self.has_mlp:
                nodes.append(Node(len(nodes), f"m{layer}", NodeKind.MLP, layer))
        nodes.append(Node(len(nodes), "out", NodeKind.OUTPUT, self.n_layers))
        return tuple(nodes)

    @cached_property
    def by_name(self) -> dict[str, Node]:
        return {n.name: n for n in self.nodes}

    @property
    def input(self) -> Node:
        return self.nodes[0]

    @property
    def output(self) -> Node:
        return self.nodes[-1]

    def node(self, name: str) -> Node:
        try:
            return self.by_name[name]
        except KeyError:
            raise PathPatchError(f"unknown node {name!r}: {self.describe_nodes()}") from None

    def describe_nodes(self) -> str:
        mlp = f", MLPs m0..m{self.n_layers - 1}" if self.has_mlp else " (no MLPs)"
        return (
            f"the model has nodes in, out, heads a0.0..a{self.n_layers - 1}.{self.n_heads - 1}"
            f" (layers 0-{self.n_layers - 1}, heads 0-{self.n_heads - 1}){mlp}; "
            "`pathpatch graph MODEL` lists them"
        )

    def senders(self, receiver: Node) -> tuple[Node, ...]:
        """Nodes writing to the residual stream before `receiver` reads it, in topological order."""
        return self._senders[receiver.order]

    @cached_property
    def sender_values(self) -> tuple[Callable[[Sequence], tuple], ...]:
        """Per receiver order, a function of a per-node sequence (indexed by node order) giving
        its senders' entries as a tuple, in `senders` order: what building each receiver's
        input version reads, at C speed (a graph of Llama-3.1-8B's size has 10^6 such reads)."""
        def getter(orders: tuple[int, ...]) -> Callable[[Sequence], tuple]:
            if len(orders) == 1:
                only = orders[0]
                return lambda values: (values[only],)
            return operator.itemgetter(*orders) if orders else lambda values: ()
        return tuple(getter(tuple(s.order for s in senders)) for senders in self._senders)

    @cached_property
    def edge_names(self) -> tuple[str, ...]:
        """Every edge's name (`str(edge)`), in `edges` order, each receiver channel's suffix
        built once: a scan of 1.6 million edges names them in a second."""
        names = []
        for r in self.nodes:
            for c in r.channels:
                into = f"->{r.name}" if c is Channel.RESID else f"->{r.name}.{c.value}"
                names.extend(s.name + into for s in self.senders(r))
        return tuple(names)

    @cached_property
    def _senders(self) -> tuple[tuple[Node, ...], ...]:
        out = []
        # in the evaluation graph of a `heads_normed` model the heads write only to their sum
        writers = [n for n in self.nodes if not (self.sums and n.kind is NodeKind.HEAD)]
        for r in self.nodes:
            if r.kind is NodeKind.INPUT:
                out.append(())
            elif r.kind is NodeKind.HEADS_SUM:
                out.append(tuple(n for n in self.nodes if n.kind is NodeKind.HEAD and n.layer == r.layer))
            elif r.kind is NodeKind.HEAD or (r.kind is NodeKind.MLP and self.parallel):
                out.append(tuple(n for n in writers if n.order < r.order and n.layer < r.layer))
            else:  # MLP reads after its own layer's heads; out reads everything
                out.append(tuple(n for n in writers if n.order < r.order))
        return tuple(out)

    @cached_property
    def edges(self) -> tuple[Edge, ...]:
        return tuple(
            Edge(s, r, c) for r in self.nodes for c in r.channels for s in self.senders(r)
        )

    def edge(self, sender: str, receiver: str, channel: str) -> Edge | None:
        """The edge `sender -> receiver.channel` by names, or None where the graph has none:
        looked up through the nodes, with no table of every edge (Llama-3.1-8B has 1.6
        million)."""
        key = self.edge_key(sender, receiver, channel)
        return None if key is None else Edge(self.nodes[key[0]], self.nodes[key[1]], key[2])

    def edge_key(self, sender: str, receiver: str, channel: str
                 ) -> tuple[int, int, Channel] | None:
        """(sender order, receiver order, channel) of the edge of these names, or None: what a
        written circuit's hundreds of thousands of edges are looked up by (`edge` without
        making the `Edge`)."""
        s, r = self.by_name.get(sender), self.by_name.get(receiver)
        c = _CHANNELS.get(channel)
        if s is None or r is None or c is None or c not in r.channels:
            return None
        orders = self._sender_orders[r.order]
        at = bisect.bisect_left(orders, s.order)
        if at == len(orders) or orders[at] != s.order:
            return None
        return s.order, r.order, c

    @cached_property
    def _sender_orders(self) -> tuple[tuple[int, ...], ...]:
        """Per receiver order, its senders' orders, ascending (`senders` is in node order)."""
        return tuple(tuple(s.order for s in senders) for senders in self._senders)

    def n_paths(self) -> int:
        """Number of input->output paths, ignoring positions (exact, by dynamic programming)."""
        count = {0: 1}
        for r in self.nodes[1:]:
            count[r.order] = len(r.channels) * sum(count[s.order] for s in self.senders(r))
        return count[self.output.order]


def describe(graph: Graph, *, edges: bool = False) -> str:
    """Readable summary: nodes by layer, edge and path counts (every edge on request)."""
    mlps = (" + MLPs (parallel: each reads its layer's input)" if graph.parallel else " + MLPs")
    lines = [f"{graph.n_layers} layers x {graph.n_heads} heads" + (mlps if graph.has_mlp else ""),
             "nodes:", "  in"]
    for layer in range(graph.n_layers):
        heads = " ".join(n.name for n in graph.nodes if n.layer == layer and n.kind is NodeKind.HEAD)
        mlp = f"  m{layer}" if graph.has_mlp else ""
        lines.append(f"  layer {layer}: {heads}{mlp}")
    lines.append("  out")
    lines.append(f"edges: {len(graph.edges):,} (sender -> receiver.channel; channels q, k, v for heads)")
    lines.append(f"paths (positions ignored): {graph.n_paths():,}")
    if edges:
        lines += [f"  {e}" for e in graph.edges]
    return "\n".join(lines)
