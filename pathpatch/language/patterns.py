"""The hypothesis language: patterns over positional paths, parsed from text into a frozen AST.

A hypothesis never enumerates paths (there are (1 + 3*heads)^layers of them); it describes
them. Grammar (whitespace is free; full reference in docs/PATTERNS.md):

    pattern     := union
    union       := inter ('|' inter)*              paths in either
    inter       := unary ('&' unary)*              paths in both
    unary       := '~' unary | atom                '~p': every path not in p
    atom        := '(' pattern ')' | 'all' | 'none' | edgeset | chain
    edgeset     := ('circuit' | 'remove') '(' edge (',' edge)* ')'
                   circuit(E): paths whose every edge is in E; remove(R): circuit of all edges but R
    edge        := GLOB '->' GLOB ['.' ('q'|'k'|'v')]     e.g. a0.*->a1.2.k, in->m0
    chain       := step ('->' step)*               consecutive nodes somewhere along the path
    step        := '...' | GLOB ['[' ('q'|'k'|'v') ']'] restriction*
    restriction := '@prev' | '@offset=' INT | '@pos=' INTS | '@src=' INTS | '@mask=' NAME

A chain matches a path that contains its steps as consecutive nodes (`...` spans any number of
nodes, including none); `in` and `out` can only be first and last, so they anchor a chain.
A step `a1.*[k]` matches a head of layer 1 entered through its key input. Restrictions are
predicates on that step's own positions: dest i (the node's position) and, for k/v steps, the
source j <= i it reads from. `@prev` is `@offset=1` (j = i - 1); `@pos=` constrains i (negative
counts from the end); `@src=` constrains j; `@mask=NAME` reads the dataset's per-example mask
(1-D [batch, pos] for in/q/MLP/out steps, 2-D [batch, dest, src] for k/v steps).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

from pathpatch.errors import PathPatchError

CHANNEL_NAMES = ("q", "k", "v")


@dataclass(frozen=True)
class Restriction:
    """A predicate on one step's (dest i, src j) positions, possibly per example."""

    kind: str  # "offset" | "pos" | "src" | "mask"
    value: int | tuple[int, ...] | str

    def __str__(self) -> str:
        if self.kind == "offset":
            return "@prev" if self.value == 1 else f"@offset={self.value}"
        if self.kind in ("pos", "src"):
            return f"@{self.kind}=" + ",".join(str(v) for v in self.value)
        return f"@mask={self.value}"

    def positions(self, seq_len: int, two_d: bool) -> np.ndarray | None:
        """Where this restriction holds at `seq_len`, the same in every example: [pos], or
        [dest, src] for a step that reads across positions (k, v); None for `@mask=`, which
        each example holds (`mask_in`). The one definition the engine (on its device) and
        `explain` (without torch) evaluate restrictions by."""
        T = seq_len
        i = np.arange(T)
        if self.kind == "offset":
            return i[None, :] == (i[:, None] - self.value)  # [dest, src]
        if self.kind in ("pos", "src"):
            wanted = np.zeros(T, dtype=bool)
            for p in self.value:
                if -T <= p < T:
                    wanted[p] = True
            if not two_d:
                return wanted
            return np.broadcast_to(wanted[:, None] if self.kind == "pos" else wanted[None, :],
                                   (T, T))
        return None

    def mask_in(self, masks: Mapping[str, Any], two_d: bool) -> Any:
        """The dataset's mask this `@mask=` restriction reads ([batch, pos], or [batch, dest,
        src] for a k/v step; a torch tensor or numpy array, as given), checked by name and
        dimensions."""
        mask = masks.get(self.value)
        if mask is None:
            raise PathPatchError(
                f"restriction {self} names a mask the dataset lacks; it has: "
                f"{sorted(masks) or 'no masks'}"
            )
        if mask.ndim != (3 if two_d else 2):
            kind = "2-D [batch, dest, src] (k/v steps)" if two_d else "1-D [batch, pos]"
            raise PathPatchError(
                f"restriction {self} needs a {kind} mask but {self.value!r} has shape"
                f" {tuple(mask.shape)}"
            )
        return mask


@dataclass(frozen=True)
class Step:
    """One node of a chain: name glob, optional channel, restrictions (all must hold)."""

    glob: str
    channel: str | None = None
    restrictions: tuple[Restriction, ...] = ()

    def __str__(self) -> str:
        ch = f"[{self.channel}]" if self.channel else ""
        return self.glob + ch + "".join(str(r) for r in self.restrictions)


@dataclass(frozen=True)
class Gap:
    """`...`: any number of nodes (including none)."""

    def __str__(self) -> str:
        return "..."


@dataclass(frozen=True)
class Chain:
    steps: tuple[Step | Gap, ...]

    def __str__(self) -> str:
        return " -> ".join(str(s) for s in self.steps)


@dataclass(frozen=True)
class EdgeSpec:
    """An edge glob in an edge set; channel None means every channel of the receiver."""

    sender: str
    receiver: str
    channel: str | None = None

    def __str__(self) -> str:
        return f"{self.sender}->{self.receiver}" + (f".{self.channel}" if self.channel else "")


@dataclass(frozen=True)
class EdgeSet:
    """circuit(E) (keep=True) or remove(R) (keep=False: every edge but R)."""

    edges: tuple[EdgeSpec, ...]
    keep: bool = True

    def __str__(self) -> str:
        return ("circuit(" if self.keep else "remove(") + ", ".join(map(str, self.edges)) + ")"


@dataclass(frozen=True)
class Union:
    parts: tuple[Pattern, ...]

    def __str__(self) -> str:
        return "(" + " | ".join(map(str, self.parts)) + ")"


@dataclass(frozen=True)
class Intersection:
    parts: tuple[Pattern, ...]

    def __str__(self) -> str:
        return "(" + " & ".join(map(str, self.parts)) + ")"


@dataclass(frozen=True)
class Complement:
    inner: Pattern

    def __str__(self) -> str:
        return f"~{self.inner}"


@dataclass(frozen=True)
class Everything:
    """`all` (or `none` when `value` is False)."""

    value: bool = True

    def __str__(self) -> str:
        return "all" if self.value else "none"


Pattern = Chain | EdgeSet | Union | Intersection | Complement | Everything

_TOKEN = re.compile(
    r"\s*(?:(?P<arrow>->)|(?P<gap>\.\.\.)|(?P<punct>[|&~(),\[\]@=])"
    r"|(?P<int>-?\d+)|(?P<name>[A-Za-z_*?][A-Za-z0-9_.*?]*)|(?P<bad>\S))"
)


class _Token(NamedTuple):
    kind: str
    text: str
    pos: int


def _tokenize(text: str) -> list[_Token]:
    # one comprehension: a circuit's pattern runs to ~260k tokens (trailing space matches nothing)
    tokens = [_Token(m.lastgroup, m.group(m.lastgroup), m.start(m.lastgroup)) for m in _TOKEN.finditer(text)]
    for tok in tokens:
        if tok.kind == "bad":
            raise _error(text, tok.pos, f"unexpected character {tok.text!r}")
    tokens.append(_Token("end", "", len(text)))
    return tokens


def _error(text: str, pos: int, message: str) -> PathPatchError:
    return PathPatchError(f"bad pattern: {message} at column {pos + 1}\n  {text}\n  {' ' * pos}^")


class _Parser:
    def __init__(self, text: str):
        self.text = text
        self.tokens = _tokenize(text)
        self.i = 0

    @property
    def tok(self) -> _Token:
        return self.tokens[self.i]

    def fail(self, message: str, tok: _Token | None = None) -> PathPatchError:
        return _error(self.text, (tok or self.tok).pos, message)

    def take(self, text: str | None = None, kind: str | None = None) -> _Token:
        tok = self.tok
        if (text is not None and tok.text != text) or (kind is not None and tok.kind != kind):
            want = repr(text) if text is not None else kind
            got = repr(tok.text) if tok.kind != "end" else "end of pattern"
            raise self.fail(f"expected {want}, found {got}")
        self.i += 1
        return tok

    def at(self, text: str) -> bool:
        return self.tok.text == text and self.tok.kind != "name"

    def parse(self) -> Pattern:
        if self.tok.kind == "end":
            raise self.fail("empty pattern (write `all` or `none` for the trivial ones)")
        pattern = self.union()
        if self.tok.kind != "end":
            raise self.fail(f"unexpected {self.tok.text!r} (join patterns with '|' or '&')")
        return pattern

    def union(self) -> Pattern:
        parts = [self.inter()]
        while self.at("|"):
            self.take("|")
            parts.append(self.inter())
        return parts[0] if len(parts) == 1 else Union(tuple(parts))

    def inter(self) -> Pattern:
        parts = [self.unary()]
        while self.at("&"):
            self.take("&")
            parts.append(self.unary())
        return parts[0] if len(parts) == 1 else Intersection(tuple(parts))

    def unary(self) -> Pattern:
        if self.at("~"):
            self.take("~")
            return Complement(self.unary())
        return self.atom()

    def atom(self) -> Pattern:
        tok = self.tok
        if self.at("("):
            self.take("(")
            inner = self.union()
            self.take(")")
            return inner
        if tok.kind == "name" and tok.text in ("all", "none"):
            self.take()
            return Everything(tok.text == "all")
        if tok.kind == "name" and tok.text in ("circuit", "remove"):
            nxt = self.tokens[self.i + 1]
            if nxt.text == "(":
                return self.edgeset()
        return self.chain()

    def edgeset(self) -> EdgeSet:
        keep = self.take(kind="name").text == "circuit"
        self.take("(")
        edges = [self.edge()]
        while self.at(","):
            self.take(",")
            edges.append(self.edge())
        self.take(")")
        return EdgeSet(tuple(edges), keep)

    def edge(self) -> EdgeSpec:
        sender = self.take(kind="name")
        if self.tok.kind != "arrow":
            raise self.fail(f"expected '->' after edge sender {sender.text!r}")
        self.take(kind="arrow")
        recv = self.take(kind="name")
        name, _, last = recv.text.rpartition(".")
        if name and last in CHANNEL_NAMES:
            return EdgeSpec(sender.text, name, last)
        return EdgeSpec(sender.text, recv.text, None)

    def chain(self) -> Chain:
        steps = [self.step()]
        while self.tok.kind == "arrow":
            self.take(kind="arrow")
            steps.append(self.step())
        return Chain(tuple(steps))

    def step(self) -> Step | Gap:
        tok = self.tok
        if tok.kind == "gap":
            self.take()
            return Gap()
        if tok.kind != "name":
            got = repr(tok.text) if tok.kind != "end" else "end of pattern"
            raise self.fail(f"expected a node glob (like a1.*, m0, in, out) or '...', found {got}")
        self.take()
        channel = None
        if self.at("["):
            self.take("[")
            ch = self.tok
            if ch.text not in CHANNEL_NAMES:
                raise self.fail(f"unknown channel {ch.text!r}: heads have channels q, k, v")
            self.take()
            self.take("]")
            channel = ch.text
        restrictions = []
        while self.at("@"):
            restrictions.append(self.restriction())
        return Step(tok.text, channel, tuple(restrictions))

    def restriction(self) -> Restriction:
        self.take("@")
        key = self.tok
        if key.kind != "name" or key.text not in ("prev", "offset", "pos", "src", "mask"):
            raise self.fail("unknown restriction: use @prev, @offset=N, @pos=I,J, @src=I,J or"
                            " @mask=NAME", key)
        self.take()
        if key.text == "prev":
            return Restriction("offset", 1)
        self.take("=")
        if key.text == "mask":
            return Restriction("mask", self.take(kind="name").text)
        values = [int(self.take(kind="int").text)]
        while key.text != "offset" and self.at(",") and self.tokens[self.i + 1].kind == "int":
            self.take(",")
            values.append(int(self.take(kind="int").text))
        if key.text == "offset":
            if values[0] < 0:
                raise self.fail("offset must be >= 0 (keys and values read from j = i - offset)",
                                key)
            return Restriction("offset", values[0])
        return Restriction(key.text, tuple(sorted(set(values))))


_NAME = r"[A-Za-z_*?][A-Za-z0-9_.*?]*"
_EDGE_SET = re.compile(r"\s*(circuit|remove)\s*\(([^()]*)\)\s*")
_EDGE = re.compile(rf"\s*({_NAME})\s*->\s*({_NAME})\s*")


def _edge_set(text: str) -> EdgeSet | None:
    """`circuit(...)` / `remove(...)` read with two regexes, or None for anything else (then the
    parser reads it and reports errors): a circuit of 10^5 edges is a list of names, and
    tokenizing it costs more than compiling it."""
    whole = _EDGE_SET.fullmatch(text)
    if whole is None:
        return None
    edges = []
    for piece in whole.group(2).split(","):
        edge = _EDGE.fullmatch(piece)
        if edge is None:
            return None
        sender, recv = edge.groups()
        name, _, last = recv.rpartition(".")
        edges.append(EdgeSpec(sender, name, last) if name and last in CHANNEL_NAMES
                     else EdgeSpec(sender, recv, None))
    return EdgeSet(tuple(edges), whole.group(1) == "circuit")


def parse(text: str) -> Pattern:
    """Parse pattern text; errors point at the offending column."""
    if not isinstance(text, str):
        raise PathPatchError(f"a pattern must be a string, got {text!r}")
    return _edge_set(text) or _Parser(text).parse()
