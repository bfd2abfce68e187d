"""What a hypothesis means on a model: |P| counted by dynamic programming, sample paths, copies, cost.

Counting never enumerates: the number of paths in P from a (node, state, position) is the sum
over its inputs of the counts of the sender states the automaton moves to, so one pass over the
reachable (node, state) pairs, vectorized over positions, gives |P| exactly (Python integers:
GPT-2 small has ~10^19 paths per position).

Reads a model's config, not its weights, and no torch (numpy evaluates the restrictions, as
`Restriction.positions` defines them), so `pathpatch explain` answers at once; only a dataset's
masks come as torch tensors.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from pathpatch.errors import PathPatchError
from pathpatch.language.automaton import CompiledPattern, ConstantLanguage, compile_pattern
from pathpatch.language.copies import estimate_cost
from pathpatch.model.config import ModelConfig
from pathpatch.model.costs import unit_costs
from pathpatch.model.graph import Channel, Graph, Node, NodeKind


@dataclass(frozen=True)
class Explanation:
    name: str
    pattern: str
    seq_len: int
    n_paths: int
    """|P|: positional paths in the hypothesis, summed over output positions."""
    n_all: int
    """Every positional path of the model at this length."""
    samples: tuple[str, ...]
    mixed_copies: int
    est_cost: float

    def __str__(self) -> str:
        share = self.n_paths / self.n_all if self.n_all else 0.0
        lines = [
            f"hypothesis {self.name!r}: {self.pattern}",
            f"  paths in P: {self.n_paths:,} of {self.n_all:,} ({share:.3%}) at sequence length"
            f" {self.seq_len}",
            f"  mixed copies: {self.mixed_copies}   estimated cost: {self.est_cost:.2f} forwards"
            " per batch (plus the two shared cached runs)",
        ]
        if self.samples:
            lines.append("  sample paths:")
            lines += [f"    {s}" for s in self.samples]
        return "\n".join(lines)


class _Counter:
    """Path counts per (node, state) as object arrays over positions, for one example's masks."""

    def __init__(self, compiled: CompiledPattern, seq_len: int, masks: Mapping[str, np.ndarray]):
        self.compiled = compiled
        self.lang = compiled.language
        self.graph = compiled.graph
        self.T = seq_len
        self.masks = masks  # one example's: [1, pos] or [1, dest, src]
        self.memo: dict = {}
        self.causal = np.tril(np.ones((self.T, self.T), dtype=bool))

    def holds(self, node: Node, channel: Channel | None, atom) -> np.ndarray:
        """[pos] or [dest, src] where exactly this atom's restrictions hold."""
        two_d = channel is not None and channel.is_2d
        selected = np.ones((self.T, self.T) if two_d else (self.T,), dtype=bool)
        for r in self.compiled.relevant(node, channel):
            holds = r.positions(self.T, two_d)
            if holds is None:
                holds = r.mask_in(self.masks, two_d)[0].astype(bool)
            selected &= holds if r in atom else ~holds
        return selected & self.causal if two_d else selected

    def inputs(self, node: Node, state):
        """(channel, atom mask, next state) for each way a path can enter `node` in `state`."""
        for channel in node.channels or (None,):
            for atom in self.compiled.atoms(node, channel):
                mask = self.holds(node, channel, atom)
                if mask.any():
                    yield channel, mask, self.lang.step(state, (node, channel, atom))

    def count(self, node: Node, state) -> np.ndarray:
        state = self.lang.normalize(state, node)
        key = (node.order, state)
        if key in self.memo:
            return self.memo[key]
        total = np.zeros(self.T, dtype=object)
        for _channel, mask, nxt in self.inputs(node, state):
            if node.kind is NodeKind.INPUT:
                if self.lang.accepts(nxt):
                    total = total + mask.astype(object)
                continue
            below = sum((self.count(s, nxt) for s in self.graph.senders(node)),
                        np.zeros(self.T, dtype=object))
            if mask.ndim == 2:
                total = total + mask.astype(object) @ below
            else:
                total = total + mask.astype(object) * below
        self.memo[key] = total
        return total

    def sample(self, rng: random.Random) -> str:
        """One path of P drawn uniformly, printed input first."""
        out = self.graph.output
        state = self.lang.start()
        counts = self.count(out, state)
        i = rng.choices(range(self.T), weights=[int(c) for c in counts])[0]
        steps, node = [], out
        while node.kind is not NodeKind.INPUT:
            options, weights = [], []
            for channel, mask, nxt in self.inputs(node, state):
                for s in self.graph.senders(node):
                    below = self.count(s, nxt)
                    for j in range(self.T):
                        ok = mask[i, j] if mask.ndim == 2 else (mask[i] and j == i)
                        if ok and below[j]:
                            options.append((channel, nxt, s, j))
                            weights.append(int(below[j]))
            channel, state, sender, j = rng.choices(options, weights=weights)[0]
            arrow = "->" if channel is Channel.RESID else f"-{channel.value}->"
            steps.append(f" {arrow} {node.name}@{i}")
            node, i = sender, j
        return f"in@{i}" + "".join(reversed(steps))


def _distinct_samples(counter: _Counter, rng: random.Random, n: int) -> tuple[str, ...]:
    """`n` different paths drawn uniformly (a path drawn twice is drawn again, a bounded number
    of times: with few paths in P, fewer may come back)."""
    found: dict[str, None] = {}
    for _ in range(20 * n):
        if len(found) == n:
            break
        found[counter.sample(rng)] = None
    return tuple(found)


def explain(model, hypothesis, *, seq_len: int = 8, dataset=None, example: int = 0,
            n_samples: int = 3, seed: int = 0) -> Explanation:
    """|P| (exact, by dynamic programming), `n_samples` different sample paths, mixed copies
    and estimated cost, on `model`: a `ModelConfig`, a model (its config is read), or a bare
    `Graph` (then the cost is NaN).

    Mask restrictions read example `example` of `dataset` (then its sequence length is used).
    """
    bare = isinstance(model, Graph)
    cfg = None if bare else model if isinstance(model, ModelConfig) else model.cfg
    graph = model if bare else Graph.from_config(cfg)
    compiled = compile_pattern(hypothesis.ast, graph, where=f"hypothesis {hypothesis.name!r}")
    masks = {}
    if dataset is not None:
        seq_len = dataset.seq_len
        masks = {k: v[example : example + 1].cpu().numpy() for k, v in dataset.masks.items()}
    elif any(r.kind == "mask" for r in compiled.restrictions):
        raise PathPatchError(
            f"hypothesis {hypothesis.name!r} uses mask restrictions: pass a dataset to count its paths"
        )
    counter = _Counter(compiled, seq_len, masks)
    n_paths = int(counter.count(graph.output, compiled.language.start()).sum())
    everything = CompiledPattern(ConstantLanguage(True), (), graph)
    n_all = int(_Counter(everything, seq_len, masks).count(graph.output, ()).sum())
    rng = random.Random(seed)
    samples = _distinct_samples(counter, rng, min(n_samples, n_paths))
    copy_graph = hypothesis.compile(graph)
    cost = float("nan") if bare else estimate_cost(copy_graph, unit_costs(cfg, seq_len))
    return Explanation(hypothesis.name, hypothesis.canonical, seq_len, n_paths, n_all, samples,
                       copy_graph.n_mixed, cost)
