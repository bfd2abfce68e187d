"""Many hypotheses evaluated together: one pass per layer stage over all their mixed copies.

A group's copies are sorted into stages (heads of layer L, MLP of layer L, output). Each stage
is one pass: every input *row* (a version of a channel of a copy) is the clean residual plus a
0/1 combination of sender deviations, computed as one matrix product per hypothesis over a
prefix of its deviation bank (senders always come earlier in topological order); then all rows
of all hypotheses go through LayerNorm, their projections and attention together, stacked along
a leading dimension. Stages with no mixed copy are never run: they are read from the caches.

The plan (rows, coefficient matrices) depends only on the hypotheses, so it is built once and
reused for every batch.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np
import torch

from pathpatch.copies import CF, CLEAN, Copy, CopyGraph
from pathpatch.graph import Graph, NodeKind
from pathpatch.positions import PositionContext
from pathpatch.runs import Runs


def _norm(owner, name: str):
    """The LayerNorm module `owner.name`, or identity for models built without normalization."""
    return getattr(owner, name, None) or (lambda x: x)


def _pick(stack: torch.Tensor, index: torch.Tensor | None) -> torch.Tensor:
    """[V, batch, pos, ...] versions -> [batch, pos, ...], version index[b, p(, q)] each place."""
    if index is None:
        return stack[0]
    out = stack[0].clone()
    for v in range(1, stack.shape[0]):
        sel = index == v
        out[sel] = stack[v][sel]
    return out


@dataclass
class _CopyRows:
    """Where one copy's input rows sit in its stage, channel by channel."""

    hypothesis: int
    copy: Copy
    rows: list[list[int]] = field(default_factory=list)  # per channel: row index per version


@dataclass
class _Stage:
    kind: NodeKind
    layer: int
    order: int  # receivers read senders of lower topological order only
    copies: list[_CopyRows] = field(default_factory=list)
    n_rows: int = 0
    # per hypothesis present: (row indices, coefficients over its mixed bank, over the CF bank)
    mixing: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = field(default_factory=dict)


class GroupPlan:
    """The data-independent schedule of a group of compiled hypotheses."""

    def __init__(self, graph: Graph, copy_graphs: list[CopyGraph]):
        self.graph = graph
        self.copy_graphs = copy_graphs
        # bank slot of each mixed copy: copies sorted by node order, so prefixes hold senders
        self.slot: list[dict[int, int]] = []
        self.bank_order: list[list[int]] = []  # node order of each slot
        stages: dict[tuple[int, int], _Stage] = {}
        for h, cg in enumerate(copy_graphs):
            ordered = sorted(cg.copies, key=lambda c: (c.node.order, c.id))
            self.slot.append({c.id: i for i, c in enumerate(ordered)})
            self.bank_order.append([c.node.order for c in ordered])
            for copy in ordered:
                node = copy.node
                rank = {NodeKind.INPUT: 0, NodeKind.HEAD: 1, NodeKind.MLP: 2, NodeKind.OUTPUT: 3}
                key = (node.layer, rank[node.kind])
                if key not in stages:
                    first = min(n.order for n in graph.nodes
                                if n.layer == node.layer and n.kind is node.kind)
                    stages[key] = _Stage(node.kind, node.layer, first)
                stages[key].copies.append(_CopyRows(h, copy))
        self.stages = [stages[k] for k in sorted(stages)]
        for stage in self.stages:
            if stage.kind is not NodeKind.INPUT:
                self._plan_rows(stage)

    def _plan_rows(self, stage: _Stage) -> None:
        """Number the rows and build each hypothesis's mixing matrices for this stage.

        Bank entries are stored relative to the counterfactual run (e = copy - G(x_c) output),
        and each row starts from whichever cached residual needs fewer terms:
          clean base: x = resid_r + sum_{CF or mixed} c_s + sum_{mixed} e_s
          cf base:    x = resid_c - sum_{CLEAN} c_s + sum_{mixed} e_s
        (c_s = counterfactual minus clean output of sender s). A circuit's rows then need one
        product over the senders' copies; a single-edge removal's only a few columns.
        """
        per_h: dict[int, list] = defaultdict(list)
        for cr in stage.copies:
            senders = np.array([s.order for s in self.graph.senders(cr.copy.node)])
            slot = self.slot[cr.hypothesis]
            for ci in cr.copy.inputs:
                rows = []
                for version in ci.versions:
                    rows.append(stage.n_rows)
                    per_h[cr.hypothesis].append((stage.n_rows, senders, np.array(version), slot))
                    stage.n_rows += 1
                cr.rows.append(rows)
        for h, entries in per_h.items():
            n_bank = sum(o < stage.order for o in self.bank_order[h])
            rows = torch.tensor([e[0] for e in entries])
            from_cf = torch.zeros(len(entries), dtype=torch.bool)
            cf_terms: dict[int, dict[int, float]] = {}
            mixed = torch.zeros(len(entries), n_bank)
            for r, (_, senders, children, slot) in enumerate(entries):
                n_clean, n_cf = int((children == CLEAN).sum()), int((children == CF).sum())
                n_mixed = len(children) - n_clean - n_cf
                use_cf = n_clean + n_mixed < n_cf + 2 * n_mixed
                from_cf[r] = use_cf
                if use_cf:
                    terms = {int(s): -1.0 for s in senders[children == CLEAN]}
                else:
                    terms = {int(s): 1.0 for s in senders[children != CLEAN]}
                cf_terms[r] = terms
                for child in children[children >= 0]:
                    mixed[r, slot[int(child)]] = 1.0
            columns = sorted({s for t in cf_terms.values() for s in t})
            cf = torch.zeros(len(entries), len(columns))
            position = {s: i for i, s in enumerate(columns)}
            for r, terms in cf_terms.items():
                for s, v in terms.items():
                    cf[r, position[s]] = v
            stage.mixing[h] = (rows, from_cf, torch.tensor(columns, dtype=torch.long), cf, mixed)

    @property
    def n_passes(self) -> int:
        """Layer-stage passes per batch (input copies need no pass: they are a masked select)."""
        return sum(s.kind is not NodeKind.INPUT for s in self.stages)


class GroupEvaluator:
    """Runs a GroupPlan on one cached batch; counts the stage passes it makes."""

    def __init__(self, model, plan: GroupPlan, runs: Runs, positions: PositionContext):
        self.model = model
        self.plan = plan
        self.runs = runs
        self.positions = positions
        self.passes = 0

    def logits(self) -> list[torch.Tensor]:
        """[batch, pos, d_vocab] G_H(x_r, x_c) for each hypothesis of the group."""
        runs, plan = self.runs, self.plan
        cf_bank = runs.cf_bank()  # [node, batch, pos, d_model]
        B, T, d = cf_bank.shape[1:]
        banks = [cf_bank.new_zeros(len(order), B, T, d) for order in plan.bank_order]
        out: list[torch.Tensor | None] = [None] * len(plan.copy_graphs)
        for h, cg in enumerate(plan.copy_graphs):
            if cg.root in (CLEAN, CF):
                out[h] = runs.logits["r" if cg.root == CLEAN else "c"]
        for stage in plan.stages:
            if stage.kind is NodeKind.INPUT:
                self._input_stage(stage, banks)
                continue
            self.passes += 1
            x = self._mix(stage, banks, cf_bank)  # [row, batch, pos, d_model]
            if stage.kind is NodeKind.HEAD:
                self._head_stage(stage, x, banks)
            elif stage.kind is NodeKind.MLP:
                self._mlp_stage(stage, x, banks)
            else:
                logits = self._output_stage(stage, x)
                for cr, lg in zip(stage.copies, logits, strict=True):
                    out[cr.hypothesis] = lg
        return out

    def _mix(self, stage: _Stage, banks, cf_bank) -> torch.Tensor:
        """Each row's input: a cached residual plus its chosen sender terms (see `_plan_rows`)."""
        clean = self.runs.residual_at(stage.kind, stage.layer, "r")  # [batch, pos, d_model]
        cf_resid = self.runs.residual_at(stage.kind, stage.layer, "c")
        B, T, d = clean.shape
        x = clean.new_empty(stage.n_rows, B, T, d)
        for h, (rows, from_cf, columns, cf, mixed) in stage.mixing.items():
            rows = rows.to(x.device)
            part = torch.where(from_cf.to(x.device)[:, None, None, None], cf_resid, clean)
            flat = part.view(len(rows), -1)  # [row, batch*pos*d_model]
            if len(columns):
                terms = cf_bank[columns.to(x.device)].view(len(columns), -1)
                flat = torch.addmm(flat, cf.to(terms), terms)
            if mixed.shape[1]:
                bank = banks[h][: mixed.shape[1]].view(mixed.shape[1], -1)
                flat = torch.addmm(flat, mixed.to(bank), bank)
            x[rows] = flat.view(-1, B, T, d)
        return x

    def _input_stage(self, stage: _Stage, banks) -> None:
        in_dev = self.runs.cf_bank()[0]
        for cr in stage.copies:
            ci = cr.copy.inputs[0]
            index = self.positions.version_index(ci)
            reads_cf = torch.as_tensor([v == (CF,) for v in ci.versions], device=index.device)
            reads_clean = ~reads_cf[index].unsqueeze(-1)
            banks[cr.hypothesis][self.plan.slot[cr.hypothesis][cr.copy.id]] = -in_dev * reads_clean

    def _picked(self, x: torch.Tensor, cr: _CopyRows, channel: int) -> torch.Tensor:
        ci = cr.copy.inputs[channel]
        return _pick(x[cr.rows[channel]], self.positions.version_index(ci))

    def _head_stage(self, stage: _Stage, x: torch.Tensor, banks) -> None:
        block = self.model.blocks[stage.layer]
        attn = block.attn
        R, B, T, d = x.shape
        heads = torch.empty(R, dtype=torch.long)
        channels = torch.empty(R, dtype=torch.long)
        for cr in stage.copies:
            for c, rows in enumerate(cr.rows):
                heads[rows] = cr.copy.node.head
                channels[rows] = c
        W = torch.stack([attn.W_Q, attn.W_K, attn.W_V])[channels, heads]  # [row, d_model, d_head]
        b = torch.stack([attn.b_Q, attn.b_K, attn.b_V])[channels, heads]  # [row, d_head]
        xn = _norm(block, "ln1")(x)
        proj = torch.bmm(xn.view(R, B * T, d), W).view(R, B, T, -1) + b[:, None, None, :]
        causal = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
        simple = [cr for cr in stage.copies if all(len(rows) == 1 for rows in cr.rows)]
        split = [cr for cr in stage.copies if cr not in simple]
        zs: dict[int, torch.Tensor] = {}
        if simple:  # all copies reading one version per channel: attention in one batch
            q = proj[[cr.rows[0][0] for cr in simple]]  # [copy, batch, pos, d_head]
            k = proj[[cr.rows[1][0] for cr in simple]]
            v = proj[[cr.rows[2][0] for cr in simple]]
            scores = (q @ k.transpose(-1, -2) / attn.attn_scale).masked_fill(~causal, float("-inf"))
            z = torch.softmax(scores, dim=-1) @ v  # [copy, batch, pos, d_head]
            zs.update({id(cr): z[i] for i, cr in enumerate(simple)})
        for cr in split:  # versions picked per query position / per (dest, src) pair
            q = self._picked(proj, cr, 0)
            k_index = self.positions.version_index(cr.copy.inputs[1])
            v_index = self.positions.version_index(cr.copy.inputs[2])
            keys, values = proj[cr.rows[1]], proj[cr.rows[2]]
            scores = _pick(q @ keys.transpose(-1, -2) / attn.attn_scale, k_index)
            pattern = torch.softmax(scores.masked_fill(~causal, float("-inf")), dim=-1)
            if v_index is None:
                zs[id(cr)] = pattern @ values[0]
            else:
                zs[id(cr)] = sum((pattern * (v_index == i)) @ val for i, val in enumerate(values))
        z = torch.stack([zs[id(cr)] for cr in stage.copies])  # [copy, batch, pos, d_head]
        idx = [cr.copy.node.head for cr in stage.copies]
        z_cf = self.runs.z(stage.layer, "c")[:, :, idx].permute(2, 0, 1, 3)  # bank: relative to G(x_c)
        n = len(stage.copies)
        dev = torch.bmm((z - z_cf).reshape(n, B * T, -1), attn.W_O[idx]).view(n, B, T, d)
        for i, cr in enumerate(stage.copies):
            banks[cr.hypothesis][self.plan.slot[cr.hypothesis][cr.copy.id]] = dev[i]

    def _mlp_stage(self, stage: _Stage, x: torch.Tensor, banks) -> None:
        block = self.model.blocks[stage.layer]
        xs = torch.stack([self._picked(x, cr, 0) for cr in stage.copies])  # [copy, batch, pos, d]
        n, B, T, d = xs.shape
        out = block.mlp(_norm(block, "ln2")(xs.view(n * B, T, d))).view(n, B, T, d)
        dev = out - self.runs.mlp_out(stage.layer, "c")  # bank: relative to G(x_c)
        for i, cr in enumerate(stage.copies):
            banks[cr.hypothesis][self.plan.slot[cr.hypothesis][cr.copy.id]] = dev[i]

    def _output_stage(self, stage: _Stage, x: torch.Tensor) -> list[torch.Tensor]:
        xs = torch.stack([self._picked(x, cr, 0) for cr in stage.copies])
        n, B, T, d = xs.shape
        logits = self.model.unembed(_norm(self.model, "ln_final")(xs.view(n * B, T, d)))
        return list(logits.view(n, B, T, -1))


def evaluate_logits(
    model, graph: Graph, copy_graphs: list[CopyGraph], runs: Runs, positions: PositionContext,
    plan: GroupPlan | None = None,
) -> list[torch.Tensor]:
    """G_H logits for each hypothesis of a group on one cached batch."""
    plan = plan or GroupPlan(graph, list(copy_graphs))
    return GroupEvaluator(model, plan, runs, positions).logits()
