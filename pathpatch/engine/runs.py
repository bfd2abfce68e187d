"""The clean run G(x_r) and counterfactual run G(x_c) of one batch, cached once for every hypothesis
from one forward of both.

Only what mixed copies read is kept: the residual stream where each receiver reads it, per-head
z (never per-head results: W_O is applied where a deviation is needed), MLP outputs, the
embedding and the logits.
"""

from __future__ import annotations

import torch

from pathpatch.engine.kernels import bmm_into
from pathpatch.model.adapter import EMBED_HOOK, Adapter
from pathpatch.model.graph import Graph, NodeKind


class Runs:
    """Caches of both runs; `cf_bank()` gives every node's counterfactual-minus-clean output."""

    def __init__(self, model, reference: torch.Tensor, counterfactual: torch.Tensor):
        self.model = model
        self.graph = Graph.from_model(model)
        self.arch = Adapter.of(model)
        if reference.shape != counterfactual.shape:
            raise ValueError(f"x_r {tuple(reference.shape)} and x_c {tuple(counterfactual.shape)}"
                             " must have one shape")
        # both runs in one forward: each weight read once, products twice as tall (fewer
        # forwards' worth of time on CPU: docs/MEASUREMENTS.md); every example is computed on
        # its own, so each half is that run's forward
        logits, cache = self.arch.run(torch.cat([reference, counterfactual]))
        B = reference.shape[0]
        halves = {"r": slice(0, B), "c": slice(B, 2 * B)}
        self.logits = {run: logits[half] for run, half in halves.items()}
        self.cache = {run: {name: t[half] for name, t in cache.items()}
                      for run, half in halves.items()}
        self._cf_bank: torch.Tensor | None = None
        self._heads_sums: dict[tuple[int, str], torch.Tensor] = {}

    @classmethod
    def ablated(cls, model, reference: torch.Tensor, ablation) -> Runs:
        """The clean run G(x_r) and, as the "counterfactual" run, the fully ablated model: one
        forward of x_r with every node's output replaced by its ablation value (an `Ablation`,
        `ablation.py`). Its residual streams are then what every receiver reads when all its
        edges carry ablation values, its logits the model with every edge into `out` ablated."""
        arch = Adapter.of(model)
        logits_r, cache_r = arch.run(reference)
        with model.hooks(fwd_hooks=ablation.hooks()):
            logits_c, cache_c = arch.run(reference)
        return cls.from_caches(model, {"r": logits_r, "c": logits_c}, {"r": cache_r, "c": cache_c})

    @classmethod
    def from_caches(cls, model, logits: dict[str, torch.Tensor],
                    cache: dict[str, dict[str, torch.Tensor]]) -> Runs:
        """Runs made elsewhere (attribution's gradient pass at x_r is the clean run): `cache`
        holds, per run, at least what `cf_bank` reads (embedding, heads' z, MLP outputs)."""
        runs = cls.__new__(cls)
        runs.model, runs.graph, runs.arch = model, Graph.from_model(model), Adapter.of(model)
        runs.logits, runs.cache = logits, cache
        runs._cf_bank, runs._heads_sums = None, {}
        return runs

    def nbytes(self) -> int:
        """Bytes held: both runs' cached activations and logits, and the deviation bank."""
        tensors = [*self.logits.values(), *self._heads_sums.values()]
        tensors += [t for cache in self.cache.values() for t in cache.values()]
        if self._cf_bank is not None:
            tensors.append(self._cf_bank)
        return sum(t.numel() * t.element_size() for t in tensors)

    def z(self, layer: int, run: str = "r") -> torch.Tensor:
        """[batch, pos, head, d_head]"""
        return self.cache[run][self.arch.z_hook(layer)]

    def mlp_out(self, layer: int, run: str = "r") -> torch.Tensor:
        """[batch, pos, d_model]"""
        return self.cache[run][self.arch.mlp_out_hook(layer)]

    def attn_out(self, layer: int, run: str = "r") -> torch.Tensor:
        """[batch, pos, d_model] what the layer's attention adds to the residual stream."""
        return self.cache[run][self.arch.attn_out_hook(layer)]

    def residual_at(self, kind: NodeKind, layer: int, run: str = "r") -> torch.Tensor:
        """[batch, pos, d_model] the residual stream as a receiver of this kind reads it; for a
        HEADS_SUM, the sum of the layer's heads before their norm."""
        c, arch = self.cache[run], self.arch
        if kind is NodeKind.HEADS_SUM:
            if (layer, run) not in self._heads_sums:
                self._heads_sums[layer, run] = arch.heads_sum(layer, self.z(layer, run))
            return self._heads_sums[layer, run]
        if kind is NodeKind.HEAD:
            return c[arch.head_input_hook(layer)]
        if kind is NodeKind.MLP:
            return c[arch.mlp_input_hook(layer)]
        return c[arch.output_input_hook()]

    @torch.no_grad()  # a bank is data for the engine and attribution, never differentiated
    def cf_bank(self) -> torch.Tensor:
        """[batch, pos, node, d_model] G(x_c) minus G(x_r) output of every node of the
        evaluation graph, by node order (a head's before any norm of its layer's sum). Position
        major, as the engine's banks are: a mixing product is then one small product per
        position (`kernels.py`).

        Biases cancel; positional embeddings are equal in both runs (rotary models have none),
        so `in` is the token embedding difference. Computed once per batch, shared by every hypothesis.
        """
        if self._cf_bank is None:
            r, c = self.cache["r"], self.cache["c"]
            nodes = self.graph.evaluation.nodes
            B, T, d = r[EMBED_HOOK].shape
            # written slot by slot: stacking the parts would hold the bank twice
            bank = r[EMBED_HOOK].new_empty(B, T, len(nodes), d)
            torch.sub(c[EMBED_HOOK], r[EMBED_HOOK], out=bank[:, :, 0])
            for i, node in enumerate(nodes[1:], start=1):
                layer = node.layer
                if node.kind is NodeKind.HEAD and node.head == 0:  # the layer's heads, in order
                    dz = self.z(layer, "c") - self.z(layer, "r")  # [batch, pos, head, d_head]
                    W_O = self.arch.W_O(layer)  # [head, d_head, d_model]
                    bmm_into(bank.view(B * T, len(nodes), d)[:, i:i + dz.shape[2]],
                             dz.flatten(0, 1).transpose(0, 1), W_O)
                elif node.kind is NodeKind.HEADS_SUM:
                    torch.sub(self.attn_out(layer, "c"), self.attn_out(layer, "r"), out=bank[:, :, i])
                elif node.kind is NodeKind.MLP:
                    torch.sub(self.mlp_out(layer, "c"), self.mlp_out(layer, "r"), out=bank[:, :, i])
                elif node.kind is NodeKind.OUTPUT:
                    bank[:, :, i] = 0  # `out` sends nothing
            self._cf_bank = bank
        return self._cf_bank
