"""Node and edge names, pathpatch's and EAP-IG's: one codec, both directions.

pathpatch names an edge `in->a0.3.q`, `a0.3->a1.5.k`, `m11->out`; EAP-IG and MIB name the same
edges `input->a0.h3<q>`, `a0.h3->a1.h5<k>`, `m11->logits`. An EAP-IG name is built from the
node's kind, layer and head (never from its pathpatch name); a name read from a file is turned
into an edge by looking it up among the graph's own edges (`edge_of`), and a bare text is
converted by `pathpatch_name`. Where no graph is at hand (a sweep's `hypotheses` table, a
figure's layout), `edge_parts` and `node_parts` take a pathpatch name apart: nothing else
splits a name.
"""

from __future__ import annotations

import functools
import re

from pathpatch.errors import PathPatchError
from pathpatch.model.graph import Channel, Edge, Graph, Node, NodeKind

_EAP_HEAD = re.compile(r"^a(\d+)\.h(\d+)$")
_HEAD = re.compile(r"^a(\d+)\.(\d+)$")
_MLP = re.compile(r"^m(\d+)$")


def edge_parts(name: str) -> tuple[str, str, str]:
    """A pathpatch edge name's (sender, receiver, channel), by its text alone (no graph: whether
    the edge exists is `edge_of`'s check): 'a0.3->a1.5.k' -> ('a0.3', 'a1.5', 'k');
    'a0.3->m1' -> ('a0.3', 'm1', 'resid').

    Raises:
        PathPatchError: the text is not `sender->receiver[.channel]`.
    """
    sender, arrow, receiver = name.partition("->")
    if not arrow or not sender or not receiver or "->" in receiver:
        raise PathPatchError(f"edge name {name!r}: expected sender->receiver, e.g. a0.3->a1.5.k "
                             "or a0.3->m1")
    if receiver.count(".") == 2:  # a head's channel: a{L}.{H}.{q|k|v}
        receiver, channel = receiver.rsplit(".", 1)
        return sender, receiver, channel
    return sender, receiver, Channel.RESID.value


@functools.lru_cache(maxsize=1 << 16)  # a scan asks for the same few thousand names 10^6 times
def node_parts(name: str) -> tuple[NodeKind, int | None, int | None]:
    """A pathpatch node name's (kind, layer, head), by its text alone: 'a1.2' -> (HEAD, 1, 2),
    'm3' -> (MLP, 3, None), 'in' and 'out' -> (INPUT | OUTPUT, None, None) (their layer is the
    graph's business).

    Raises:
        PathPatchError: the text is no node name (`in`, `a{L}.{H}`, `m{L}`, `out`).
    """
    if name == "in":
        return NodeKind.INPUT, None, None
    if name == "out":
        return NodeKind.OUTPUT, None, None
    found = _HEAD.match(name)
    if found:
        return NodeKind.HEAD, int(found[1]), int(found[2])
    found = _MLP.match(name)
    if found:
        return NodeKind.MLP, int(found[1]), None
    raise PathPatchError(f"node name {name!r}: expected in, a{{layer}}.{{head}}, m{{layer}} "
                         "or out")


def eap_node_name(node: Node) -> str:
    """`input`, `a{L}.h{H}`, `m{L}` or `logits`."""
    if node.kind is NodeKind.INPUT:
        return "input"
    if node.kind is NodeKind.OUTPUT:
        return "logits"
    if node.kind is NodeKind.HEAD:
        return f"a{node.layer}.h{node.head}"
    return f"m{node.layer}"


def eap_name(edge: Edge) -> str:
    """The EAP-IG name of an edge: `a0.h3->a1.h5<k>`, `input->m0`, `m11->logits`."""
    sender, receiver = eap_node_name(edge.sender), eap_node_name(edge.receiver)
    if edge.channel is Channel.RESID:
        return f"{sender}->{receiver}"
    return f"{sender}->{receiver}<{edge.channel.value}>"


def pathpatch_name(name: str) -> str:
    """An edge name in pathpatch's naming, from either naming, by its text alone (no graph:
    whether the edge exists is `edge_of`'s check): `a0.h3->a1.h5<k>` -> `a0.3->a1.5.k`."""
    name = name.strip()
    channel = ""
    if name.endswith(">") and "<" in name:
        name, channel = name[:-1].split("<", 1)
        channel = "." + channel
    sender, _, receiver = name.partition("->")
    nodes = {"input": "in", "logits": "out"}

    def node(n: str) -> str:
        return _EAP_HEAD.sub(r"a\1.\2", nodes.get(n, n))

    return f"{node(sender)}->{node(receiver)}{channel}"


def edge_of(graph: Graph, name: str, where: str = "ranking") -> Edge:
    """The edge a name in either naming denotes, or an error naming it."""
    found = edge_names(graph).get(name.strip())
    if found is None:
        raise PathPatchError(
            f"{where}: edge {name!r} is not an edge of this model ({len(graph.edges):,} edges, "
            f"named like {graph.edges[0]} or {eap_name(graph.edges[0])}); "
            f"{graph.describe_nodes()}")
    return found


@functools.lru_cache(maxsize=8)
def edge_names(graph: Graph) -> dict[str, Edge]:
    """Both names of every edge -> the edge (built once per graph shape)."""
    return {name: e for e in graph.edges for name in (str(e), eap_name(e))}
