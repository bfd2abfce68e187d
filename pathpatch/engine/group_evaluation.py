"""Running a group's stage plan on one cached batch: each stage's inputs, then the layer.

Each stage builds its inputs as `stage_plan.Mixing` says (one product per hypothesis over its
bases and banks; inputs that are a cached residual as it is are read from the cache), then runs
all rows of all hypotheses through LayerNorm (folded into the projections, `folding.py`; rows
of a cached residual once for the group, `stage_plan.CachedRows`), attention, MLPs and
unembedding together, stacked along a leading dimension, and writes each copy's output minus
the bank's reference run into its bank slot.
Stages with no mixed copy are never run: they are read from the caches. The unembedding runs
only at the positions a metric reads.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pathpatch.engine.folding import FoldedWeights
from pathpatch.engine.kernels import bmm_into, mix, mix_add_
from pathpatch.engine.positions import PositionContext
from pathpatch.engine.runs import Runs
from pathpatch.engine.stage_plan import (
    CachedRows,
    CopyRows,
    GroupPlan,
    PreviousInput,
    Projection,
    Residual,
    SharedInput,
    Singles,
    Stage,
)
from pathpatch.engine.workspace import Workspace
from pathpatch.language.copies import CF, CLEAN, CopyGraph
from pathpatch.model.adapter import Adapter
from pathpatch.model.graph import Graph, NodeKind

_NORM_CHUNK_BYTES = 64 * 2**20
"""The largest transient of OLMo-2's q/k norm over all heads (`GroupEvaluator._norm_over_heads`)."""


def _projection(cached: CachedRows) -> Projection:
    """Rows of a cached residual as the projection of a block holding that one input."""
    if cached.single:
        return Projection(singles=Singles(1, cached.rows, cached.keys))
    return Projection(shared=(SharedInput(0, cached.rows, cached.keys),))


def _pick(stack: torch.Tensor, index: torch.Tensor | None) -> torch.Tensor:
    """[V, batch, pos, ...] versions -> [batch, pos, ...], version index[b, p(, q)] each place."""
    if index is None:
        return stack[0]
    out = stack[0].clone()
    for v in range(1, stack.shape[0]):
        sel = index == v
        out[sel] = stack[v][sel]
    return out


class StageInputs:
    """A stage's distinct inputs: one block [batch * pos, inputs, d_model] per hypothesis, each
    its own mixing product's output (never copied into one shared tensor), and after each
    block's inputs its cached residuals, read as they are (`stage_plan.Mixing.cached`)."""

    def __init__(self, shape: tuple[int, int, int], residuals: dict[Residual, torch.Tensor]):
        self.shape = shape  # (batch, pos, d_model)
        self.residuals = residuals  # [batch * pos, 1, d_model] each, at this stage's input
        self.blocks: dict[int, torch.Tensor] = {}
        self.cached: dict[int, tuple[Residual, ...]] = {}

    def input(self, h: int, i: int) -> torch.Tensor:
        """Input i of hypothesis h: [batch, pos, d_model] (a view)."""
        return self.source(h, i).view(self.shape)

    def source(self, h: int, i: int) -> torch.Tensor:
        """Input i of hypothesis h as one source of a mixing product: [batch * pos, 1, d_model]
        (a view)."""
        block = self.blocks.get(h)
        n = 0 if block is None else block.shape[1]
        return block[:, i:i + 1] if i < n else self.residuals[self.cached[h][i - n]]


class GroupEvaluator:
    """Runs a GroupPlan on one cached batch; counts the stage passes it makes."""

    def __init__(self, model, plan: GroupPlan, runs: Runs, positions: PositionContext,
                 folded: FoldedWeights | None = None, read: torch.Tensor | None = None,
                 workspace: Workspace | None = None):
        """`read`: [batch, pos] bool, the only positions whose logits are used (a metric's
        scored positions); the others are not unembedded and come back NaN. `folded` and
        `workspace`: share one of each across the groups of an evaluation."""
        self.arch = Adapter.of(model)
        self.plan = plan
        self.runs = runs
        self.positions = positions
        self.folded = folded or FoldedWeights(model)  # share one across groups: folded once
        self.workspace = workspace or Workspace()  # banks, mixing sources and outputs
        self.read = read
        self.passes = 0

    @torch.no_grad()
    def logits(self) -> list[torch.Tensor]:
        """[batch, pos, d_vocab] G_H(x_r, x_c) for each hypothesis of the group."""
        runs, plan = self.runs, self.plan
        B, T, nodes, d = runs.cf_bank().shape
        cf_bank = runs.cf_bank().view(B * T, nodes, d)
        # position-major like the cf bank: [batch * pos, slot, d_model]; every slot is written by
        # its stage before any later stage reads it
        storage = [self.workspace.empty((B * T, bank.scratch + len(bank.orders), d), cf_bank)
                   for bank in plan.banks]
        banks = [st[:, bank.scratch:] for bank, st in zip(plan.banks, storage, strict=True)]
        out: list[torch.Tensor | None] = [None] * len(plan.copy_graphs)
        for h, cg in enumerate(plan.copy_graphs):
            if cg.root in (CLEAN, CF):
                out[h] = runs.logits["r" if cg.root == CLEAN else "c"]
        previous: tuple[Stage, StageInputs] | None = None
        # per hypothesis: the output of the head-stage product whose rows later head stages
        # add (`stage_plan.share_heads_products`), held until the last of them has
        shared_products: list[torch.Tensor | None] = [None] * len(plan.copy_graphs)
        for stage in plan.stages:
            if stage.kind is NodeKind.INPUT:
                self._input_stage(stage, banks)
                continue
            self.passes += 1
            x = self._mix(stage, storage, cf_bank, previous, shared_products)
            previous = (stage, x)
            if stage.kind is NodeKind.HEAD:
                self._head_stage(stage, x, banks)
            elif stage.kind is NodeKind.MLP:
                self._mlp_stage(stage, x, banks)
            elif stage.kind is NodeKind.HEADS_SUM:
                self._heads_sum_stage(stage, x, banks)
            else:
                logits = self._output_stage(stage, x)
                for cr, lg in zip(stage.copies, logits, strict=True):
                    out[cr.hypothesis] = lg
        return out

    def _mix(self, stage: Stage, storage, cf_bank, previous: tuple[Stage, StageInputs] | None,
             shared_products: list[torch.Tensor | None]) -> StageInputs:
        """Each input: its base plus its remaining terms (`stage_plan.Mixing`), plus the rows an
        earlier head stage's product computed for it (`Mixing.earlier`); the cached residuals
        among them are read as they are (`Mixing.cached`)."""
        clean = self.runs.residual_at(stage.kind, stage.layer, "r")  # [batch, pos, d_model]
        B, T, d = clean.shape
        residuals = {Residual.CLEAN: clean,
                     Residual.COUNTERFACTUAL: self.runs.residual_at(stage.kind, stage.layer, "c")}
        if stage.uses_previous:
            prev_stage, prev_x = previous
            residuals[Residual.BETWEEN] = clean - self.runs.residual_at(prev_stage.kind,
                                                                        prev_stage.layer, "r")
        residuals = {k: v.reshape(B * T, 1, d) for k, v in residuals.items()}  # one source row
        x = StageInputs((B, T, d), residuals)
        for h, mixing in stage.mixing.items():
            x.cached[h] = mixing.cached
            if not mixing.n_inputs:
                continue  # every input a cached residual
            parts = [prev_x.source(h, base.index) if isinstance(base, PreviousInput)
                     else residuals[base] for base in mixing.bases]
            scratch = self.plan.banks[h].scratch
            bank = storage[h][:, scratch:]
            for entries, source in ((mixing.cf, cf_bank), (mixing.gathered, bank)):
                if entries is not None:
                    entries = entries if isinstance(entries, slice) else entries.to(clean.device)
                    parts.append(source[:, entries])
            if mixing.in_place:  # sources copied just before the bank: one product reads all
                first = scratch - mixing.n_sources
                for part in parts:
                    storage[h][:, first:first + part.shape[1]] = part
                    first += part.shape[1]
                source = storage[h][:, scratch - mixing.n_sources:scratch + mixing.in_place]
            elif len(parts) > 1:
                width = sum(part.shape[1] for part in parts)
                source = torch.cat(parts, dim=1, out=self.workspace.empty((B * T, width, d), bank))
            else:
                source = parts[0]
            block = mix(mixing.coef.to(source), source,
                        out=self.workspace.empty((B * T, len(mixing.coef), d), source))
            if mixing.sliced is not None:
                mix_add_(block, mixing.sliced_coef.to(bank), bank[:, mixing.sliced])
            if mixing.earlier is not None:  # a strided view: added once, not a product's output
                block.add_(shared_products[h][:, mixing.earlier.rows])
                if mixing.earlier.last:
                    shared_products[h] = None
            if mixing.later_rows:  # the rows after its own inputs are later stages' terms
                shared_products[h] = block
                block = block[:, :mixing.n_inputs]
            x.blocks[h] = block
        return x

    def _input_stage(self, stage: Stage, banks) -> None:
        in_dev = self.runs.cf_bank()[:, :, 0]  # [batch, pos, d_model]
        for cr in stage.copies:
            ci = cr.copy.inputs[0]
            index = self.positions.version_index(ci)
            reads_cf = torch.as_tensor([v == (CF,) for v in ci.versions], device=index.device)[index]
            bank = self.plan.banks[cr.hypothesis]
            if bank.reference == CF:  # copy - G(x_c): -(c_in) where it reads x_r
                entry = -in_dev * (~reads_cf).unsqueeze(-1)
            else:  # copy - G(x_r): c_in where it reads x_c
                entry = in_dev * reads_cf.unsqueeze(-1)
            banks[cr.hypothesis][:, bank.slots[cr.copy.id]] = entry.flatten(0, 1)

    def _picked(self, x: StageInputs, cr: CopyRows, channel: int) -> torch.Tensor:
        """[batch, pos, d_model] the input copy `cr` reads on `channel`, its versions picked."""
        inputs = cr.inputs[channel]
        if len(inputs) == 1:
            return x.input(cr.hypothesis, inputs[0])
        return _pick(torch.stack([x.input(cr.hypothesis, i) for i in inputs]),
                     self.positions.version_index(cr.copy.inputs[channel]))

    def _project(self, stage: Stage, x: StageInputs, shape: tuple[int, int, int]) -> torch.Tensor:
        """[row, batch*pos, d_head]: each row's q, k or v, LayerNorm folded in (`folding.py`)."""
        B, T, _ = shape
        fold = self.folded.qkv(stage.layer)
        proj = fold.rows.new_empty(stage.n_rows, B * T, fold.rows.shape[-1])
        for h, plan in stage.projection.items():
            if plan.singles is None and not plan.shared:
                continue  # only partial inputs (or cached residuals, below)
            flat = x.blocks[h].transpose(0, 1)  # [inputs, batch * pos, d_model], a view
            self._project_rows(stage.layer, proj, plan, flat)
        for cached in stage.cached_rows:  # once for every hypothesis reading them
            flat = x.residuals[cached.run].transpose(0, 1)  # [1, batch * pos, d_model]
            self._project_rows(stage.layer, proj, _projection(cached), flat)
        return proj

    def _project_rows(self, layer: int, proj: torch.Tensor, plan: Projection, flat: torch.Tensor
                      ) -> None:
        """The rows `plan` says into `proj`, from inputs flat [inputs, batch * pos, d_model]."""
        fold = self.folded.qkv(layer)
        if fold.normalize_first:
            flat = self.arch.norm_before_heads(layer, flat)
        if plan.singles is not None:
            n, rows, keys = plan.singles.n, plan.singles.rows, plan.singles.keys
            proj[rows] = fold.project_rows(flat[:n], keys)
            if self.arch.qk_norm_over_heads:
                self._norm_over_heads(layer, proj, rows, keys, flat[:n])
        for shared in plan.shared:
            i, rows, keys = shared.input, shared.rows, shared.keys
            p = fold.project(flat[i], keys)  # keys None: every head and channel reads it
            keys = slice(0, fold.n_keys) if keys is None else keys
            proj[rows] = fold.finish(p, keys, *fold.stats(flat[i]))
            if self.arch.qk_norm_over_heads:
                self._norm_over_heads(layer, proj, rows, keys, flat[i])

    def _norm_over_heads(self, layer: int, proj: torch.Tensor, rows, keys, inputs: torch.Tensor
                         ) -> None:
        """OLMo-2's q/k norm over all heads, in place on the q and k rows just projected: `rows`
        and `keys` (slices or index tensors) as `Singles` / `SharedInput` give them; `inputs`
        [rows, tokens, d_model] one per row, or [tokens, d_model] shared by all of them."""
        rows = torch.arange(proj.shape[0])[rows] if isinstance(rows, slice) else rows.cpu()
        keys = torch.arange(3 * self.arch.n_heads)[keys] if isinstance(keys, slice) else keys.cpu()
        # each row's full projection is a transient [rows, tokens, heads * d_head]: a few rows
        # at a time, so that it stays under _NORM_CHUNK_BYTES
        full_row = proj.shape[1] * self.arch.n_heads * proj.shape[2] * proj.element_size()
        step = max(1, _NORM_CHUNK_BYTES // full_row)
        for channel, name in ((0, "q"), (1, "k")):
            picked = (keys % 3 == channel).nonzero().flatten()
            for pick in picked.split(step):
                x = inputs[pick.to(inputs.device)] if inputs.dim() == 3 else inputs
                if not self.folded.qkv(layer).normalize_first:  # the projection reads normed rows
                    x = self.arch.norm_before_heads(layer, x)
                target = rows[pick].to(proj.device)
                proj[target] = self.arch.norm_over_heads(layer, proj[target], x, name,
                                                         keys[pick] // 3)

    def _head_stage(self, stage: Stage, x: StageInputs, banks) -> None:
        arch, layer = self.arch, stage.layer
        scale = arch.attn_scale(layer)
        B, T, d = self.runs.residual_at(stage.kind, layer).shape
        proj = self._project(stage, x, (B, T, d)).view(stage.n_rows, B, T, -1)
        if arch.transforms_qk:  # q/k norms and rotation by position, before any version picking
            for channel, name in ((0, "q"), (1, "k")):
                # each row once: a cached residual's rows may be several copies'
                rows = sorted({r for cr in stage.copies for r in cr.rows[channel]})
                proj[rows] = arch.finish_qk(layer, proj[rows], name)
        simple = [cr for cr in stage.copies if all(len(rows) == 1 for rows in cr.rows)]
        split = [cr for cr in stage.copies if cr not in simple]
        allowed = arch.allowed_keys(layer, T, proj.device)  # None: plain causal
        zs: dict[int, torch.Tensor] = {}
        if simple:  # all copies reading one version per channel: attention in one batch
            q = proj[[cr.rows[0][0] for cr in simple]]  # [copy, batch, pos, d_head]
            k = proj[[cr.rows[1][0] for cr in simple]]
            v = proj[[cr.rows[2][0] for cr in simple]]
            if arch.caps_scores:  # the cap acts on the scores: they are written out
                scores = arch.cap_scores(q @ k.transpose(-1, -2) / scale)
                pattern = torch.softmax(scores.masked_fill(self._hidden(allowed, T, proj.device),
                                                           float("-inf")), dim=-1)
                z = pattern @ v
            else:
                # torch's fused causal attention: no [pos, pos] scores written out and masked
                # (the same numbers up to rounding)
                z = F.scaled_dot_product_attention(q, k, v, is_causal=allowed is None,
                                                   attn_mask=allowed, scale=1 / scale)
            zs.update({id(cr): z[i] for i, cr in enumerate(simple)})
        if split:  # keys a query may not see (after it, or outside its window)
            future = self._hidden(allowed, T, proj.device)
        for cr in split:  # versions picked per query position / per (dest, src) pair
            q = _pick(proj[list(cr.rows[0])], self.positions.version_index(cr.copy.inputs[0]))
            k_index = self.positions.version_index(cr.copy.inputs[1])
            v_index = self.positions.version_index(cr.copy.inputs[2])
            keys, values = proj[list(cr.rows[1])], proj[list(cr.rows[2])]
            scores = arch.cap_scores(_pick(q @ keys.transpose(-1, -2) / scale, k_index))
            pattern = torch.softmax(scores.masked_fill(future, float("-inf")), dim=-1)
            if v_index is None:
                zs[id(cr)] = pattern @ values[0]
            else:
                zs[id(cr)] = sum((pattern * (v_index == i)) @ val for i, val in enumerate(values))
        z = torch.stack([zs[id(cr)] for cr in stage.copies])  # [copy, batch, pos, d_head]
        for span in stage.spans:  # bank entry: W_O (z - z_ref)
            start, stop, n = span.start, span.stop, span.stop - span.start
            heads = [cr.copy.node.head for cr in stage.copies[start:stop]]
            ref = self.runs.z(layer, self.plan.banks[span.hypothesis].run)
            z_ref = ref[:, :, heads].permute(2, 0, 1, 3)
            bmm_into(banks[span.hypothesis][:, span.slot:span.slot + n],
                     (z[start:stop] - z_ref).reshape(n, B * T, -1), arch.W_O(layer)[heads])

    @staticmethod
    def _hidden(allowed: torch.Tensor | None, T: int, device) -> torch.Tensor:
        """[dest, src] the keys a query may not see: after it, or outside its window."""
        if allowed is None:
            return torch.ones(T, T, dtype=torch.bool, device=device).triu(1)
        return ~allowed

    def _mlp_stage(self, stage: Stage, x: StageInputs, banks) -> None:
        xs = torch.stack([self._picked(x, cr, 0) for cr in stage.copies])  # [copy, batch, pos, d]
        n, B, T, d = xs.shape
        out = self.arch.mlp(stage.layer, xs.view(n * B, T, d)).view(n, B, T, d)
        self._write_entries(stage, out, banks, self.runs.mlp_out)

    def _heads_sum_stage(self, stage: Stage, x: StageInputs, banks) -> None:
        """Each combination of head copies, summed, through the layer's post-attention norm."""
        xs = torch.stack([self._picked(x, cr, 0) for cr in stage.copies])
        out = self.arch.norm_heads_sum(stage.layer, xs)  # [copy, batch, pos, d_model]
        self._write_entries(stage, out, banks, self.runs.attn_out)

    def _write_entries(self, stage: Stage, out: torch.Tensor, banks, cached) -> None:
        """Bank entries of one node per copy: out [copy, batch, pos, d_model] minus the cached
        run (`cached(layer, run)`) each hypothesis's bank is relative to."""
        for span in stage.spans:
            ref = cached(stage.layer, self.plan.banks[span.hypothesis].run)
            n = span.stop - span.start
            torch.sub(out[span.start:span.stop].flatten(1, 2).transpose(0, 1), ref.flatten(0, 1)[:, None],
                      out=banks[span.hypothesis][:, span.slot:span.slot + n])

    def _output_stage(self, stage: Stage, x: StageInputs) -> list[torch.Tensor]:
        xs = torch.stack([self._picked(x, cr, 0) for cr in stage.copies])
        n, B, T, d = xs.shape
        rows = xs.view(n, B * T, d)
        if self.read is not None:  # the unembedding is a third of a GPT-2 forward: only read rows
            where = self.read.reshape(-1).nonzero().squeeze(1)  # [k] flat positions
            rows = rows[:, where]  # [n, k, d]
        vocab = self.arch.d_vocab_out
        # the logits are the largest tensors of a group: from the workspace, whose buffers are
        # warm pages once the caller has dropped the previous group's logits
        if self.read is None:
            logits = self.workspace.empty((n * B * T, vocab), rows)
            self.arch.unembed(rows.reshape(-1, d), out=logits)
            return list(logits.view(n, B, T, vocab))
        logits = self.arch.unembed(rows.reshape(-1, d))  # [n * rows, vocab]
        full = self.workspace.empty((n, B * T, vocab), rows).fill_(float("nan"))  # unread: NaN
        full[:, where] = logits.view(n, len(where), -1)
        return list(full.view(n, B, T, vocab))


def evaluate_logits(
    model, graph: Graph, copy_graphs: list[CopyGraph], runs: Runs, positions: PositionContext,
    plan: GroupPlan | None = None,
) -> list[torch.Tensor]:
    """G_H logits for each hypothesis of a group on one cached batch."""
    plan = plan or GroupPlan(graph, list(copy_graphs))
    return GroupEvaluator(model, plan, runs, positions).logits()
