"""Exact treeified evaluation G_H(x_r, x_c): compute only the mixed copies, read the rest from caches.

Per batch, the clean run G(x_r) and counterfactual run G(x_c) are cached once and shared by
every hypothesis. A mixed copy's channel input is the clean residual stream plus, for each
sender whose chosen copy is not clean, that copy's deviation from the clean sender output
(biases are constants and cancel). LayerNorm is recomputed on every mixed input. Where
restrictions split a channel, each input *version* is computed and picked per position (per
(dest, src) pair for keys and values). Head outputs are kept as z and multiplied by W_O only
where a deviation is needed; TransformerLens's materialized per-head results are never used.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from pathpatch.copies import CF, CLEAN, ChannelInput, Copy, CopyGraph
from pathpatch.errors import PathPatchError
from pathpatch.graph import Channel, Graph, Node, NodeKind
from pathpatch.patterns import Restriction


class Runs:
    """The clean and counterfactual runs of one batch: everything mixed copies read.

    Holds, per run, the residual stream where each receiver reads it, per-head z (not per-head
    results), MLP outputs, embeddings and logits.
    """

    def __init__(self, model, reference: torch.Tensor, counterfactual: torch.Tensor):
        self.model = model
        cfg = model.cfg
        names = {"hook_embed", f"blocks.{cfg.n_layers - 1}.hook_resid_post"}
        for layer in range(cfg.n_layers):
            names |= {f"blocks.{layer}.hook_resid_pre", f"blocks.{layer}.attn.hook_z"}
            if not cfg.attn_only:
                names |= {f"blocks.{layer}.hook_resid_mid", f"blocks.{layer}.hook_mlp_out"}
        self.logits: dict[str, torch.Tensor] = {}
        self.cache: dict[str, dict[str, torch.Tensor]] = {}
        for run, tokens in (("r", reference), ("c", counterfactual)):
            logits, cache = model.run_with_cache(tokens, names_filter=lambda n: n in names)
            self.logits[run] = logits
            self.cache[run] = dict(cache.items())
        self._cf_dev: dict[int, torch.Tensor] = {}

    def sender_output(self, node: Node, run: str) -> torch.Tensor:
        """[batch, pos, d_model] what `node` adds to the residual stream in `run` (+ constants)."""
        c = self.cache[run]
        if node.kind is NodeKind.INPUT:
            return c["hook_embed"]
        if node.kind is NodeKind.MLP:
            return c[f"blocks.{node.layer}.hook_mlp_out"]
        z = c[f"blocks.{node.layer}.attn.hook_z"][:, :, node.head]  # [batch, pos, d_head]
        return z @ self.model.blocks[node.layer].attn.W_O[node.head]

    def cf_deviation(self, node: Node) -> torch.Tensor:
        """[batch, pos, d_model] counterfactual minus clean output of `node` (cached)."""
        if node.order not in self._cf_dev:
            if node.kind is NodeKind.HEAD:
                key = f"blocks.{node.layer}.attn.hook_z"
                dz = self.cache["c"][key][:, :, node.head] - self.cache["r"][key][:, :, node.head]
                dev = dz @ self.model.blocks[node.layer].attn.W_O[node.head]
            else:
                dev = self.sender_output(node, "c") - self.sender_output(node, "r")
            self._cf_dev[node.order] = dev
        return self._cf_dev[node.order]

    def residual(self, receiver: Node, run: str) -> torch.Tensor:
        """[batch, pos, d_model] the residual stream as `receiver` reads it in `run`."""
        c = self.cache[run]
        if receiver.kind is NodeKind.HEAD:
            return c[f"blocks.{receiver.layer}.hook_resid_pre"]
        if receiver.kind is NodeKind.MLP:
            return c[f"blocks.{receiver.layer}.hook_resid_mid"]
        return c[f"blocks.{self.model.cfg.n_layers - 1}.hook_resid_post"]


@dataclass
class PositionContext:
    """Evaluates restrictions on one batch: 1-D [batch, pos] and 2-D [batch, dest, src] masks."""

    masks: dict[str, torch.Tensor]
    batch: int
    seq_len: int
    device: torch.device

    def holds(self, r: Restriction, two_d: bool) -> torch.Tensor:
        B, T = self.batch, self.seq_len
        i = torch.arange(T, device=self.device)
        if r.kind == "offset":
            out = i[None, :] == (i[:, None] - r.value)  # [dest, src]
        elif r.kind in ("pos", "src"):
            wanted = torch.zeros(T, dtype=torch.bool, device=self.device)
            for p in r.value:
                if -T <= p < T:
                    wanted[p] = True
            if not two_d:
                out = wanted
            else:
                out = wanted[:, None].expand(T, T) if r.kind == "pos" else wanted[None, :].expand(T, T)
        else:
            mask = self.masks.get(r.value)
            if mask is None:
                raise PathPatchError(
                    f"restriction {r} names a mask the dataset lacks; it has: "
                    f"{sorted(self.masks) or 'no masks'}"
                )
            want_dims = 3 if two_d else 2
            if mask.dim() != want_dims:
                kind = "2-D [batch, dest, src] (k/v steps)" if two_d else "1-D [batch, pos]"
                raise PathPatchError(
                    f"restriction {r} needs a {kind} mask but {r.value!r} has shape"
                    f" {tuple(mask.shape)}"
                )
            return mask.to(self.device, torch.bool)
        shape = (B, T, T) if two_d else (B, T)
        return out.expand(shape)

    def version_index(self, ci: ChannelInput) -> torch.Tensor | None:
        """Per position (or (dest, src) pair), which input version to read; None if only one."""
        if len(ci.versions) == 1:
            return None
        two_d = ci.channel is not None and ci.channel.is_2d
        relevant = sorted({r for atom in ci.atoms for r in atom}, key=str)
        holds = {r: self.holds(r, two_d) for r in relevant}
        shape = (self.batch, self.seq_len, self.seq_len) if two_d else (self.batch, self.seq_len)
        index = torch.zeros(shape, dtype=torch.long, device=self.device)
        all_r = set(relevant)
        for atom, version in zip(ci.atoms, ci.atom_version, strict=True):
            if version == 0:
                continue
            sel = torch.ones(shape, dtype=torch.bool, device=self.device)
            for r in all_r:
                sel &= holds[r] if r in atom else ~holds[r]
            index[sel] = version
        return index


def _norm(owner, name: str):
    """The LayerNorm module `owner.name`, or identity for models built without normalization."""
    return getattr(owner, name, None) or (lambda x: x)


def _pick(stack: list[torch.Tensor], index: torch.Tensor | None) -> torch.Tensor:
    """Per position, the version `index` names: [batch, pos, ...] from V tensors of that shape."""
    if index is None:
        return stack[0]
    out = stack[0].clone()
    for v in range(1, len(stack)):
        sel = index == v
        out[sel] = stack[v][sel]
    return out


class CopyEvaluator:
    """Computes one hypothesis's mixed copies on one batch and returns its output logits."""

    def __init__(self, model, graph: Graph, runs: Runs, positions: PositionContext):
        self.model = model
        self.graph = graph
        self.runs = runs
        self.positions = positions

    def logits(self, copy_graph: CopyGraph) -> torch.Tensor:
        """[batch, pos, d_vocab] G_H(x_r, x_c)."""
        if copy_graph.root == CLEAN:
            return self.runs.logits["r"]
        if copy_graph.root == CF:
            return self.runs.logits["c"]
        deviations: dict[int, torch.Tensor] = {}
        for copy in copy_graph.copies:
            if copy.node.kind is NodeKind.OUTPUT:
                x = self._channel_input(copy, copy.inputs[0], deviations)
                return self.model.unembed(_norm(self.model, "ln_final")(x))
            deviations[copy.id] = self._deviation(copy, deviations)
        raise AssertionError("copy graph without an output copy")

    def _version_input(self, receiver: Node, version: tuple[int, ...], devs) -> torch.Tensor:
        """Residual input for one version: the base run plus the senders that deviate from it."""
        senders = self.graph.senders(receiver)
        n_clean = sum(c == CLEAN for c in version)
        n_cf = sum(c == CF for c in version)
        base = "r" if n_clean >= n_cf else "c"
        x = self.runs.residual(receiver, base)
        for sender, child in zip(senders, version, strict=True):
            if child == CLEAN:
                if base == "c":
                    x = x - self.runs.cf_deviation(sender)
            elif child == CF:
                if base == "r":
                    x = x + self.runs.cf_deviation(sender)
            else:
                d = devs[child]
                x = x + (d if base == "r" else d - self.runs.cf_deviation(sender))
        return x

    def _channel_input(self, copy: Copy, ci: ChannelInput, devs) -> torch.Tensor:
        """[batch, pos, d_model] a 1-D channel's input, versions picked per position."""
        stack = [self._version_input(copy.node, v, devs) for v in ci.versions]
        return _pick(stack, self.positions.version_index(ci))

    def _deviation(self, copy: Copy, devs) -> torch.Tensor:
        """[batch, pos, d_model] this copy's output minus the clean output of its node."""
        node = copy.node
        if node.kind is NodeKind.INPUT:
            ci = copy.inputs[0]
            index = self.positions.version_index(ci)
            reads_cf = torch.as_tensor([v == (CF,) for v in ci.versions], device=index.device)
            return self.runs.cf_deviation(node) * reads_cf[index].unsqueeze(-1)
        block = self.model.blocks[node.layer]
        if node.kind is NodeKind.MLP:
            x = self._channel_input(copy, copy.inputs[0], devs)
            out = block.mlp(_norm(block, "ln2")(x))
            return out - self.runs.sender_output(node, "r")
        z = self._head_z(copy, block, devs)  # [batch, pos, d_head]
        z_clean = self.runs.cache["r"][f"blocks.{node.layer}.attn.hook_z"][:, :, node.head]
        return (z - z_clean) @ block.attn.W_O[node.head]

    def _head_z(self, copy: Copy, block, devs) -> torch.Tensor:
        node, attn, h = copy.node, block.attn, copy.node.head
        by_channel = {ci.channel: ci for ci in copy.inputs}
        ln1 = _norm(block, "ln1")
        q_in = self._channel_input(copy, by_channel[Channel.Q], devs)
        q = ln1(q_in) @ attn.W_Q[h] + attn.b_Q[h]  # [batch, pos, d_head]

        def project(channel: Channel, W: torch.Tensor, b: torch.Tensor):
            ci = by_channel[channel]
            xs = [self._version_input(node, v, devs) for v in ci.versions]
            return [ln1(x) @ W[h] + b[h] for x in xs], self.positions.version_index(ci)

        keys, k_index = project(Channel.K, attn.W_K, attn.b_K)  # V x [batch, pos, d_head]
        values, v_index = project(Channel.V, attn.W_V, attn.b_V)
        scores = _pick([q @ k.transpose(-1, -2) / attn.attn_scale for k in keys], k_index)
        T = q.shape[1]
        causal = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
        scores = scores.masked_fill(~causal, float("-inf"))  # [batch, dest, src]
        pattern = torch.softmax(scores, dim=-1)
        if v_index is None:
            return pattern @ values[0]
        return sum(
            (pattern * (v_index == i)) @ v for i, v in enumerate(values)
        )


def evaluate_logits(
    model, graph: Graph, copy_graphs: Sequence[CopyGraph], runs: Runs, positions: PositionContext
) -> list[torch.Tensor]:
    """G_H logits for each hypothesis on one cached batch."""
    evaluator = CopyEvaluator(model, graph, runs, positions)
    return [evaluator.logits(cg) for cg in copy_graphs]


DEFAULT_MAX_MIXED_COPIES = 4096


@dataclass(frozen=True)
class HypothesisCost:
    """What validation reports per hypothesis before any data is touched."""

    name: str
    mixed_copies: int
    est_cost: float
    """Estimated compute of its mixed copies, in plain forward passes (per batch)."""


def compile_all(
    graph: Graph, hypotheses: Sequence, max_mixed_copies: int = DEFAULT_MAX_MIXED_COPIES
) -> list[CopyGraph]:
    """Compile every hypothesis; reject any over `max_mixed_copies`, naming it."""
    out = []
    for h in hypotheses:
        cg = h.compile(graph)
        if cg.n_mixed > max_mixed_copies:
            raise PathPatchError(
                f"hypothesis {h.name!r} needs {cg.n_mixed} mixed copies, over max_mixed_copies ="
                f" {max_mixed_copies}; simplify it or raise max_mixed_copies"
            )
        out.append(cg)
    return out


def _check_masks(hypotheses: Sequence, graph: Graph, dataset) -> None:
    for h in hypotheses:
        for r in h.restrictions(graph):
            if r.kind == "mask" and r.value not in dataset.masks:
                raise PathPatchError(
                    f"hypothesis {h.name!r} uses @mask={r.value} but the dataset has masks"
                    f" {sorted(dataset.masks) or '(none)'}"
                )


def check(
    graph_or_model,
    hypotheses: Sequence,
    *,
    max_mixed_copies: int = DEFAULT_MAX_MIXED_COPIES,
    dataset=None,
) -> list[HypothesisCost]:
    """Validate hypotheses against a model (and dataset masks); report copies and cost."""
    graph = graph_or_model if isinstance(graph_or_model, Graph) else Graph.from_model(graph_or_model)
    copy_graphs = compile_all(graph, hypotheses, max_mixed_copies)
    if dataset is not None:
        _check_masks(hypotheses, graph, dataset)
    cfg = getattr(graph_or_model, "cfg", None)
    from pathpatch.copies import estimate_cost

    return [
        HypothesisCost(h.name, cg.n_mixed, estimate_cost(cg, cfg) if cfg is not None else float("nan"))
        for h, cg in zip(hypotheses, copy_graphs, strict=True)
    ]


@torch.inference_mode()
def evaluate(
    model,
    dataset,
    hypotheses: Sequence,
    metric="kl",
    *,
    batch_size: int | None = None,
    memory_budget: int | None = None,
    max_mixed_copies: int = DEFAULT_MAX_MIXED_COPIES,
):
    """Per-example unexplained and total effects of each hypothesis.

    Args:
        model: a TransformerLens HookedTransformer (see `pathpatch.models.load_model`).
        dataset: a `PairDataset`; delta is read at its `scored` positions.
        hypotheses: `Hypothesis` objects (names unique).
        metric: "kl" (default), "loss", "logit_diff", "module:function" or a `Metric`.
        batch_size: examples per pass (default: all, or what `memory_budget` allows).
        memory_budget: bytes; shrinks batches so caches fit (never approximates).

    Returns:
        pyarrow.Table with one row per (hypothesis, example): `hypothesis`, `example`, `ue`
        (delta(G(x_r), G_H)), `te` (delta(G(x_r), G(x_c))), ordered by hypothesis then example.
    """
    import pyarrow as pa

    from pathpatch.metrics import get_metric

    metric = get_metric(metric)
    graph = Graph.from_model(model)
    names = [h.name for h in hypotheses]
    if len(set(names)) != len(names):
        raise PathPatchError(f"hypothesis names must be unique, got {names}")
    copy_graphs = compile_all(graph, hypotheses, max_mixed_copies)
    _check_masks(hypotheses, graph, dataset)
    dataset.validate(model.cfg.d_vocab)
    n = len(dataset)
    batch_size = batch_size or _batch_size_for(model, dataset, memory_budget)
    device = next(model.parameters()).device
    ue = torch.zeros(len(hypotheses), n, dtype=torch.float64)
    te = torch.zeros(n, dtype=torch.float64)
    for start in range(0, n, batch_size):
        batch = dataset.select(slice(start, start + batch_size))
        runs = Runs(model, batch.reference.to(device), batch.counterfactual.to(device))
        positions = PositionContext(
            {k: v.to(device) for k, v in batch.masks.items()}, len(batch), batch.seq_len, device
        )
        clean = runs.logits["r"]
        te[start : start + len(batch)] = metric.per_example(clean, runs.logits["c"], batch).cpu()
        for i, logits in enumerate(evaluate_logits(model, graph, copy_graphs, runs, positions)):
            ue[i, start : start + len(batch)] = metric.per_example(clean, logits, batch).cpu()
    examples = dataset.example_ids.to(torch.int64)
    return pa.table(
        {
            "hypothesis": pa.array([n_ for n_ in names for _ in range(n)], pa.string()),
            "example": pa.array(examples.repeat(len(hypotheses)).numpy(), pa.int64()),
            "ue": pa.array(ue.reshape(-1).numpy(), pa.float64()),
            "te": pa.array(te.repeat(len(hypotheses)).numpy(), pa.float64()),
        }
    )


def _batch_size_for(model, dataset, memory_budget: int | None) -> int:
    """Largest batch whose two cached runs fit the budget (caches dominate memory)."""
    if memory_budget is None:
        return min(len(dataset), 64)
    cfg = model.cfg
    T = dataset.seq_len
    itemsize = next(model.parameters()).element_size()
    per_run = T * (cfg.n_layers * (2 * cfg.d_model + cfg.n_heads * cfg.d_head) + 2 * cfg.d_vocab)
    per_example = 4 * per_run * itemsize  # two runs + working copies
    size = int(memory_budget // per_example)
    if size < 1:
        raise PathPatchError(
            f"memory_budget={memory_budget} bytes cannot hold even one example"
            f" (~{per_example} bytes each); raise it"
        )
    return min(size, len(dataset))
