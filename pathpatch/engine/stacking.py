"""Many hypotheses evaluated together: one pass per layer stage over all their mixed copies.

A group's copies are sorted into stages (heads of layer L, the normalized sums of those heads
where the model has a norm after attention, MLP of layer L, output). Each stage is one pass:
every input *row* (a version of a channel of a copy) is a residual stream (for a heads' sum, a
sum of heads) made of cached runs and sender deviations; rows that come out equal are built once
(a single-edge removal's downstream heads all read one row per layer, as in a forward). Each
distinct input is built from whichever base needs the fewest terms: the clean residual, the
counterfactual one, or one of the previous stage's inputs (a residual stream carried forward);
the terms are one matrix product per hypothesis over a slice of its deviation bank (banks and
inputs are position-major, [batch * pos, slot, d_model]: `kernels.py` says why). Then all
rows of all hypotheses go through LayerNorm (folded into the projections, `folding.py`),
attention, MLPs and unembedding together, stacked along a leading dimension. Stages with no
mixed copy are never run: they are read from the caches.

The plan (inputs, coefficient matrices) depends only on the hypotheses, so it is built once and
reused for every batch.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from pathpatch.engine.folding import FoldedWeights
from pathpatch.engine.kernels import bmm_into, mix, mix_add_
from pathpatch.engine.positions import PositionContext
from pathpatch.engine.runs import Runs
from pathpatch.engine.workspace import Workspace
from pathpatch.language.copies import CF, CLEAN, Copy, CopyGraph, for_evaluation
from pathpatch.model.adapter import Adapter
from pathpatch.model.graph import Graph, NodeKind

_NORM_CHUNK_BYTES = 64 * 2**20
"""The largest transient of OLMo-2's q/k norm over all heads (`GroupEvaluator._norm_over_heads`)."""

_RANK = {NodeKind.INPUT: 0, NodeKind.HEAD: 1, NodeKind.HEADS_SUM: 2, NodeKind.MLP: 3, NodeKind.OUTPUT: 4}
_RESIDUAL = (NodeKind.HEAD, NodeKind.MLP, NodeKind.OUTPUT)
"""Stages whose inputs are residual streams (a HEADS_SUM's input is a sum of heads)."""
_MAX_COMPARISONS = 4_000_000  # previous-stage bases are searched only up to this much work
SHARED_HEADS_PRODUCTS = 3
"""Head stages whose mixing products over the bank entries they all read are one product
(`GroupPlan._share_heads_products`)."""


def _pick(stack: torch.Tensor, index: torch.Tensor | None) -> torch.Tensor:
    """[V, batch, pos, ...] versions -> [batch, pos, ...], version index[b, p(, q)] each place."""
    if index is None:
        return stack[0]
    out = stack[0].clone()
    for v in range(1, stack.shape[0]):
        sel = index == v
        out[sel] = stack[v][sel]
    return out


def _span(indices: np.ndarray) -> slice | torch.Tensor:
    """A slice when `indices` are consecutive (a view, no copy), else an index tensor."""
    if len(indices) and np.all(np.diff(indices) == 1):
        return slice(int(indices[0]), int(indices[-1]) + 1)
    return torch.as_tensor(indices, dtype=torch.long)


@dataclass(frozen=True)
class _Carry:
    """Rows a head stage's product computes for a later head stage (`_Mixing.carries`)."""

    stage: int  # the later stage's position in the plan
    first: int  # its rows' first row in this product's output
    rows: int


@dataclass
class _Mixing:
    """How one hypothesis's distinct inputs of a stage are built, in one product and maybe two.

    Main product: coef @ [base rows; counterfactual deviations c_s; gathered bank entries], the
    base rows being resid_r ("r"), resid_c ("c"), the clean residual between the previous stage
    and this one ("between") and previous-stage inputs (their indices). It writes the inputs
    once. A dense run of bank entries is read in place: when it starts at the bank's first
    entry, the main sources are copied into scratch rows just before the bank, so one product
    reads both (`in_place` entries); otherwise by a second product. A head stage's in-place
    product may also compute later head stages' rows over its entries (`carries`); those stages
    then add the rows once to their own products' output (`carried`).
    """

    start: int  # its inputs' positions in the stage's input tensor
    stop: int
    bases: list[str | int]
    cf: slice | torch.Tensor | None  # entries of the G(x_c) - G(x_r) bank
    gathered: slice | torch.Tensor | None  # entries of its own bank, copied into the main product
    coef: torch.Tensor  # [inputs, bases + cf + gathered]
    sliced: slice | None = None  # entries of its own bank read in place, second product
    sliced_coef: torch.Tensor | None = None
    in_place: int = 0  # own-bank entries [0, in_place) read by the main product, after scratch
    carries: list[_Carry] = field(default_factory=list)  # rows it computes for later head stages
    carried: bool = False  # its inputs were begun by an earlier stage's product (`carries`)

    @property
    def n_sources(self) -> int:
        """Rows of the main product's source that are copied (into scratch when `in_place`)."""
        return self.coef.shape[1] - self.in_place

    @staticmethod
    def plan(start: int, base_coef: np.ndarray, bases: list, delta_a: np.ndarray,
             delta_b: np.ndarray) -> _Mixing:
        blocks, cf, gathered, sliced, sliced_coef, in_place = [base_coef], None, None, None, None, 0
        used = np.flatnonzero(np.abs(delta_a).sum(axis=0))
        if len(used):
            cf = _span(used)
            blocks.append(delta_a[:, used])
        used = np.flatnonzero(np.abs(delta_b).sum(axis=0))
        if len(used):
            lo, hi = int(used[0]), int(used[-1]) + 1
            # reading in place costs (hi - lo) entry reads plus the zeros' FLOPs; gathering costs
            # a copy (read, write, read again) of the used entries; a row's FLOPs per entry
            # weigh as a fraction of an entry read (docs/MEASUREMENTS.md)
            flops = 0.12 * len(base_coef)
            read_in_place = (hi - lo) * (1 + flops) <= len(used) * (3 + flops)
            if read_in_place and 8 * lo <= hi:
                in_place = hi  # the few zero columns before lo cost less than a second pass
            elif read_in_place:
                sliced, sliced_coef = slice(lo, hi), torch.from_numpy(delta_b[:, lo:hi].copy())
            else:
                gathered = _span(used)
                blocks.append(delta_b[:, used])
        if in_place:
            blocks.append(delta_b[:, :in_place])
        coef = torch.from_numpy(np.concatenate(blocks, axis=1).astype(np.float32))
        return _Mixing(start, start + len(base_coef), bases, cf, gathered, coef, sliced, sliced_coef,
                       in_place)


@dataclass(frozen=True)
class _Singles:
    """The block's first `n` inputs, read by one row each: one batched product."""

    n: int
    rows: torch.Tensor | slice  # the row each input feeds
    keys: torch.Tensor | slice  # its (head, channel) key, `head * 3 + channel`


@dataclass(frozen=True)
class _Shared:
    """One input read by several rows (q, k and v of many heads reading one residual)."""

    input: int  # within the hypothesis's block
    rows: torch.Tensor
    keys: torch.Tensor | None  # None: every head and channel, in key order


@dataclass
class _Projection:
    """One hypothesis's rows of a head stage: rows reading one distinct input each go through one
    batched product; rows sharing an input through one wide product each."""

    singles: _Singles | None = None
    shared: list[_Shared] = field(default_factory=list)


@dataclass
class _Distinct:
    """While planning: one hypothesis's distinct inputs of a stage, as coefficient vectors over
    the clean-run senders (a) and its bank entries (b), with the rows reading each."""

    found: dict = field(default_factory=dict)  # (a bytes, b bytes) -> index
    a: list = field(default_factory=list)
    b: list = field(default_factory=list)
    readers: list = field(default_factory=list)

    def add(self, a: np.ndarray, b: np.ndarray) -> int:
        """The index of input (a, b), added when new."""
        key = (a.tobytes(), b.tobytes())
        if key not in self.found:
            self.found[key] = len(self.a)
            self.a.append(a)
            self.b.append(b)
            self.readers.append([])
        return self.found[key]


@dataclass(frozen=True)
class _Vectors:
    """A hypothesis's final distinct inputs of a stage, which the next stage may take bases from."""

    a: np.ndarray
    b: np.ndarray
    start: int  # index of the first in the stage's numbering


@dataclass
class _Span:
    """A hypothesis's copies `stage.copies[start:stop]`, filling consecutive bank slots."""

    hypothesis: int
    start: int
    stop: int
    slot: int  # the first bank slot they fill


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
    n_inputs: int = 0
    row_input: list[int] = field(default_factory=list)  # distinct input each row reads
    input_owner: list[tuple[int, int]] = field(default_factory=list)  # (hypothesis, index in its block)
    mixing: dict[int, _Mixing] = field(default_factory=dict)
    projection: dict[int, _Projection] = field(default_factory=dict)  # by hypothesis
    uses_previous: bool = False
    # while planning: per hypothesis its distinct inputs, then their final vectors
    distinct: dict[int, _Distinct] = field(default_factory=dict)
    vectors: dict[int, _Vectors] = field(default_factory=dict)
    senders: np.ndarray | None = None
    spans: list[_Span] = field(default_factory=list)


class GroupPlan:
    """The data-independent schedule of a group of compiled hypotheses."""

    def __init__(self, graph: Graph, copy_graphs: list[CopyGraph]):
        self.graph = graph = graph.evaluation
        self.copy_graphs = copy_graphs = [for_evaluation(cg) for cg in copy_graphs]
        # bank slot of each mixed copy: copies sorted by node order, so prefixes hold senders
        self.slot: list[dict[int, int]] = []
        self.bank_order: list[list[int]] = []  # node order of each slot
        # each bank stores copy minus the run it is closest to (fewer terms to add back)
        self.reference: list[int] = []
        stages: dict[tuple[int, int], _Stage] = {}
        for h, cg in enumerate(copy_graphs):
            ordered = sorted(cg.copies, key=lambda c: (c.node.order, c.id))
            self.slot.append({c.id: i for i, c in enumerate(ordered)})
            self.bank_order.append([c.node.order for c in ordered])
            children = [c for copy in ordered for ci in copy.inputs for v in ci.versions for c in v]
            self.reference.append(CLEAN if children.count(CLEAN) > children.count(CF) else CF)
            for copy in ordered:
                node = copy.node
                key = (node.layer, _RANK[node.kind])
                if key not in stages:
                    first = min(n.order for n in graph.nodes
                                if n.layer == node.layer and n.kind is node.kind)
                    stages[key] = _Stage(node.kind, node.layer, first)
                stages[key].copies.append(_CopyRows(h, copy))
        self.stages = [stages[k] for k in sorted(stages)]
        for stage in self.stages:  # a hypothesis's copies of a stage fill consecutive bank slots
            for i, cr in enumerate(stage.copies):
                first = self.slot[cr.hypothesis][cr.copy.id]
                span = stage.spans[-1] if stage.spans else None
                if span is not None and span.hypothesis == cr.hypothesis:
                    assert first == span.slot + i - span.start
                    span.stop = i + 1
                else:
                    stage.spans.append(_Span(cr.hypothesis, i, i + 1, first))
        mixed_stages = [s for s in self.stages if s.kind is not NodeKind.INPUT]
        for stage in mixed_stages:
            self._distinct_inputs(stage)
        for previous, stage in zip(mixed_stages, mixed_stages[1:]):
            if previous.kind is NodeKind.HEAD and stage.kind in (NodeKind.MLP, NodeKind.OUTPUT):
                self._carry_partial_inputs(previous, stage)
        previous = None
        for stage in mixed_stages:
            # a previous stage's inputs are bases only when both are residual streams
            residual = previous is not None and {previous.kind, stage.kind} <= set(_RESIDUAL)
            for h in stage.distinct:
                self._plan_mixing(stage, previous if residual else None, h)
            if stage.kind is NodeKind.HEAD:
                self._plan_projection(stage)
            previous = stage
        for stage in self.stages:
            stage.vectors, stage.distinct = {}, {}  # only needed while planning
        self._share_heads_products()
        # scratch rows before each bank: the most main-product sources a fused product copies
        self.scratch = [0] * len(copy_graphs)
        for stage in mixed_stages:
            for h, mixing in stage.mixing.items():
                if mixing.in_place:
                    self.scratch[h] = max(self.scratch[h], mixing.n_sources)

    def _share_heads_products(self) -> None:
        """Build head stages' inputs `SHARED_HEADS_PRODUCTS` stages at a time: the first stage's
        product also computes the later stages' terms over the bank entries it reads in place
        anyway, and each later stage adds only its bases and newer entries to those rows. The
        same terms, regrouped: one product of a few dozen more rows over the same entries, which
        runs at up to 1.5x the FLOP rate of a thin one on CPU (docs/MEASUREMENTS.md)."""
        heads = [i for i, stage in enumerate(self.stages) if stage.kind is NodeKind.HEAD]
        for b in range(0, len(heads), SHARED_HEADS_PRODUCTS):
            first = self.stages[heads[b]]
            for h, ms in first.mixing.items():
                if not ms.in_place:
                    continue
                extra, n_rows = [], ms.stop - ms.start
                for t in heads[b + 1:b + SHARED_HEADS_PRODUCTS]:
                    mt = self.stages[t].mixing.get(h)
                    if mt is None or not mt.in_place:
                        continue
                    upto, n_src = min(ms.in_place, mt.in_place), mt.n_sources
                    rows = ms.coef.new_zeros(mt.stop - mt.start, ms.coef.shape[1])
                    rows[:, ms.n_sources:ms.n_sources + upto] = mt.coef[:, n_src:n_src + upto]
                    ms.carries.append(_Carry(t, n_rows, len(rows)))
                    extra.append(rows)
                    n_rows += len(rows)
                    if upto < mt.in_place:
                        mt.sliced = slice(upto, mt.in_place)
                        mt.sliced_coef = mt.coef[:, n_src + upto:n_src + mt.in_place].contiguous()
                    mt.coef, mt.in_place, mt.carried = mt.coef[:, :n_src].contiguous(), 0, True
                if extra:
                    ms.coef = torch.cat([ms.coef, *extra])

    def _distinct_inputs(self, stage: _Stage) -> None:
        """Number the rows and merge equal ones into distinct inputs, per hypothesis.

        An input is described relative to the clean run: x = resid_r + sum_s a_s c_s +
        sum_m b_m e_m, with c_s = G(x_c) - G(x_r) output of sender s and e_m the bank entry of
        mixed copy m (its output minus the bank's reference run).
        """
        senders = np.array([s.order for s in self.graph.senders(stage.copies[0].copy.node)])
        stage.senders = senders
        for cr in stage.copies:
            slot, ref = self.slot[cr.hypothesis], self.reference[cr.hypothesis]
            n_bank = sum(o < stage.order for o in self.bank_order[cr.hypothesis])
            distinct = stage.distinct.setdefault(cr.hypothesis, _Distinct())
            for ci in cr.copy.inputs:
                rows = []
                for version in ci.versions:
                    children = np.array(version)
                    a = np.zeros(stage.order, dtype=np.float32)
                    b = np.zeros(n_bank, dtype=np.float32)
                    mixed = children >= 0
                    a[senders[children == CF]] = 1
                    if ref == CF:
                        a[senders[mixed]] = 1
                    b[[slot[int(c)] for c in children[mixed]]] = 1
                    distinct.readers[distinct.add(a, b)].append(stage.n_rows)
                    rows.append(stage.n_rows)
                    stage.n_rows += 1
                cr.rows.append(rows)
        stage.row_input = [0] * stage.n_rows

    def _carry_partial_inputs(self, heads: _Stage, stage: _Stage) -> None:
        """Compute a following MLP/output input's part over the senders before `heads` inside
        the heads' product, which reads those bank entries anyway; the input itself then adds
        only the heads of its own layer (a previous-stage base, see `_plan_mixing`)."""
        for h, distinct in stage.distinct.items():
            into = heads.distinct.get(h)
            if into is None or len(distinct.a) > 4:
                continue
            width = len(into.b[0]) if into.b else 0
            for a, b in zip(distinct.a, distinct.b):
                a, b = a[:heads.order].copy(), b[:width].copy()
                if np.count_nonzero(a) + np.count_nonzero(b) >= 4:
                    into.add(a, b)  # read by no row of the heads' stage

    def _plan_mixing(self, stage: _Stage, previous: _Stage | None, h: int) -> None:
        """Pick each distinct input's base and build its products.

        The base is resid_r, resid_c (= resid_r + sum_s c_s) or a previous-stage input plus the
        clean residual between the two stages, whichever leaves the fewest nonzero coefficients.
        """
        distinct = stage.distinct[h]
        A, Bm, readers = distinct.a, distinct.b, distinct.readers
        senders = stage.senders
        # singles first, in row order (a dense circuit's rows then meet the weights in order),
        # then inputs several rows share, then partial inputs carried for the next stage
        def rank(i: int) -> tuple:
            return (0 if len(readers[i]) == 1 else 1 if readers[i] else 2), readers[i][:1]

        order = sorted(range(len(A)), key=rank)
        A = np.stack([A[i] for i in order])
        Bm = np.stack([Bm[i] for i in order])
        readers = [readers[i] for i in order]
        start = stage.n_inputs
        for i, rows in enumerate(readers):
            for r in rows:
                stage.row_input[r] = start + i
        stage.n_inputs += len(A)
        stage.input_owner += [(h, i) for i in range(len(A))]
        stage.vectors[h] = _Vectors(A, Bm, start)

        on_senders = np.zeros(stage.order, dtype=np.float32)
        on_senders[senders] = 1
        cost_clean = (A != 0).sum(1) + (Bm != 0).sum(1)
        cost_cf = (A != on_senders).sum(1) + (Bm != 0).sum(1)
        from_cf = cost_cf < cost_clean
        best = np.minimum(cost_clean, cost_cf)
        delta_a = np.where(from_cf[:, None], A - on_senders, A)
        delta_b = Bm.copy()
        base = np.where(from_cf, 1, 0)  # index into `bases`
        bases: list[str | int] = ["r", "c"]
        if previous is not None and h in previous.vectors:
            vectors = previous.vectors[h]
            Ap, Bp, prev_start = vectors.a, vectors.b, vectors.start
            if len(A) * len(Ap) * (A.shape[1] + Bm.shape[1]) <= _MAX_COMPARISONS:
                Ap = np.pad(Ap, ((0, 0), (0, A.shape[1] - Ap.shape[1])))
                Bp = np.pad(Bp, ((0, 0), (0, Bm.shape[1] - Bp.shape[1])))
                via = ((A[:, None] != Ap[None]).sum(2) + (Bm[:, None] != Bp[None]).sum(2) + 1)
                p = via.argmin(1)
                better = via[np.arange(len(A)), p] < best
                if better.any():
                    delta_a[better] = A[better] - Ap[p[better]]
                    delta_b[better] = Bm[better] - Bp[p[better]]
                    chosen = sorted(set(p[better].tolist()))
                    bases += ["between"] + [prev_start + i for i in chosen]
                    base[better] = [3 + chosen.index(i) for i in p[better]]  # after r, c, between
                    stage.uses_previous = True
        base_coef = np.zeros((len(A), len(bases)), dtype=np.float32)
        base_coef[np.arange(len(A)), base] = 1
        if "between" in bases:
            base_coef[base >= 3, 2] = 1
        keep = base_coef.any(axis=0)  # drop base rows nobody reads
        stage.mixing[h] = _Mixing.plan(start, base_coef[:, keep], [b for b, k in zip(bases, keep) if k],
                                       delta_a, delta_b)

    def _plan_projection(self, stage: _Stage) -> None:
        """Group rows by the input they read; key each row by (head, channel)."""
        key = [0] * stage.n_rows
        for cr in stage.copies:
            for channel, rows in enumerate(cr.rows):
                for r in rows:
                    key[r] = cr.copy.node.head * 3 + channel
        readers: dict[int, list[int]] = defaultdict(list)
        for r, i in enumerate(stage.row_input):
            readers[i].append(r)
        for h, mixing in stage.mixing.items():  # singles come first (see `_plan_mixing`)
            projection = stage.projection[h] = _Projection()
            singles = [i for i in range(mixing.start, mixing.stop) if len(readers[i]) == 1]
            if singles:
                rows = np.array([readers[i][0] for i in singles])
                projection.singles = _Singles(len(singles), _span(rows),
                                              _span(np.array([key[r] for r in rows])))
            for i in range(mixing.start + len(singles), mixing.stop):
                if not readers[i]:
                    continue  # a partial input carried for the next stage
                rows = sorted(readers[i], key=lambda r: key[r])
                keys = [key[r] for r in rows]
                every = keys == list(range(keys[-1] + 1)) and keys[-1] + 1 == 3 * self.graph.n_heads
                projection.shared.append(_Shared(i - mixing.start, torch.tensor(rows),
                                                 None if every else torch.tensor(keys)))

    @property
    def n_passes(self) -> int:
        """Layer-stage passes per batch (input copies need no pass: they are a masked select)."""
        return sum(s.kind is not NodeKind.INPUT for s in self.stages)


class _Inputs:
    """A stage's distinct inputs: one block [batch * pos, inputs, d_model] per hypothesis, each
    its own mixing product's output (never copied into one shared tensor)."""

    def __init__(self, stage: _Stage, shape: tuple[int, int, int]):
        self.stage = stage
        self.shape = shape  # (batch, pos, d_model)
        self.blocks: dict[int, torch.Tensor] = {}

    def __getitem__(self, i: int) -> torch.Tensor:
        """Input i of the stage's numbering: [batch, pos, d_model] (a view)."""
        h, j = self.stage.input_owner[i]
        return self.blocks[h][:, j].view(self.shape)

    def source(self, i: int) -> torch.Tensor:
        """Input i as one source of a mixing product: [batch * pos, 1, d_model] (a view)."""
        h, j = self.stage.input_owner[i]
        return self.blocks[h][:, j:j + 1]


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
        storage = [self.workspace.empty((B * T, n + len(order), d), cf_bank)
                   for n, order in zip(plan.scratch, plan.bank_order, strict=True)]
        banks = [st[:, n:] for n, st in zip(plan.scratch, storage, strict=True)]  # after scratch
        out: list[torch.Tensor | None] = [None] * len(plan.copy_graphs)
        for h, cg in enumerate(plan.copy_graphs):
            if cg.root in (CLEAN, CF):
                out[h] = runs.logits["r" if cg.root == CLEAN else "c"]
        previous: tuple[_Stage, torch.Tensor] | None = None
        carried: dict[tuple[int, int], torch.Tensor] = {}  # (stage, hypothesis) -> begun inputs
        for position, stage in enumerate(plan.stages):
            if stage.kind is NodeKind.INPUT:
                self._input_stage(stage, banks)
                continue
            self.passes += 1
            x = self._mix(stage, storage, cf_bank, previous, carried, position)
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

    def _mix(self, stage: _Stage, storage, cf_bank, previous, carried, position: int) -> _Inputs:
        """Each distinct input: its base plus its chosen terms (see `GroupPlan._plan_mixing`),
        added to the rows an earlier stage's product began where it did (`carried`)."""
        clean = self.runs.residual_at(stage.kind, stage.layer, "r")  # [batch, pos, d_model]
        B, T, d = clean.shape
        rows = {"r": clean, "c": self.runs.residual_at(stage.kind, stage.layer, "c")}
        if stage.uses_previous:
            prev_stage, prev_x = previous
            rows["between"] = clean - self.runs.residual_at(prev_stage.kind, prev_stage.layer, "r")
        rows = {k: v.reshape(B * T, 1, d) for k, v in rows.items()}
        x = _Inputs(stage, (B, T, d))
        for h, mixing in stage.mixing.items():
            parts = [rows[b] if isinstance(b, str) else prev_x.source(b) for b in mixing.bases]
            scratch = self.plan.scratch[h]
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
            if mixing.carried:  # a strided view: added once, not a product's output
                block.add_(carried.pop((position, h)))
            for carry in mixing.carries:
                carried[carry.stage, h] = block[:, carry.first:carry.first + carry.rows]
            x.blocks[h] = block[:, :mixing.stop - mixing.start] if mixing.carries else block
        return x

    def _input_stage(self, stage: _Stage, banks) -> None:
        in_dev = self.runs.cf_bank()[:, :, 0]  # [batch, pos, d_model]
        for cr in stage.copies:
            ci = cr.copy.inputs[0]
            index = self.positions.version_index(ci)
            reads_cf = torch.as_tensor([v == (CF,) for v in ci.versions], device=index.device)[index]
            if self.plan.reference[cr.hypothesis] == CF:  # copy - G(x_c): -(c_in) where it reads x_r
                entry = -in_dev * (~reads_cf).unsqueeze(-1)
            else:  # copy - G(x_r): c_in where it reads x_c
                entry = in_dev * reads_cf.unsqueeze(-1)
            banks[cr.hypothesis][:, self.plan.slot[cr.hypothesis][cr.copy.id]] = entry.flatten(0, 1)

    def _picked(self, x: _Inputs, stage: _Stage, cr: _CopyRows, channel: int) -> torch.Tensor:
        ci = cr.copy.inputs[channel]
        rows = cr.rows[channel]
        if len(rows) == 1:
            return x[stage.row_input[rows[0]]]
        return _pick(torch.stack([x[stage.row_input[r]] for r in rows]), self.positions.version_index(ci))

    def _reference_run(self, h: int) -> str:
        """The cached run hypothesis h's bank entries are relative to."""
        return "c" if self.plan.reference[h] == CF else "r"

    def _project(self, stage: _Stage, x: _Inputs, shape: tuple[int, int, int]) -> torch.Tensor:
        """[row, batch*pos, d_head]: each row's q, k or v, LayerNorm folded in (`folding.py`)."""
        fold = self.folded.qkv(stage.layer)
        B, T, _ = shape
        proj = fold.rows.new_empty(stage.n_rows, B * T, fold.rows.shape[-1])
        for h, plan in stage.projection.items():
            if plan.singles is None and not plan.shared:
                continue  # only partial inputs carried for the next stage
            flat = x.blocks[h].transpose(0, 1)  # [inputs, batch * pos, d_model], a view
            if fold.normalize_first:
                flat = self.arch.norm_before_heads(stage.layer, flat)
            if plan.singles is not None:
                n, rows, keys = plan.singles.n, plan.singles.rows, plan.singles.keys
                proj[rows] = fold.project_rows(flat[:n], keys)
                if self.arch.qk_norm_over_heads:
                    self._norm_over_heads(stage.layer, proj, rows, keys, flat[:n])
            for shared in plan.shared:
                i, rows, keys = shared.input, shared.rows, shared.keys
                p = fold.project(flat[i], keys)  # keys None: every head and channel reads it
                keys = slice(0, fold.n_keys) if keys is None else keys
                proj[rows] = fold.finish(p, keys, *fold.stats(flat[i]))
                if self.arch.qk_norm_over_heads:
                    self._norm_over_heads(stage.layer, proj, rows, keys, flat[i])
        return proj

    def _norm_over_heads(self, layer: int, proj: torch.Tensor, rows, keys, inputs: torch.Tensor
                         ) -> None:
        """OLMo-2's q/k norm over all heads, in place on the q and k rows just projected: `rows`
        and `keys` (slices or index tensors) as `_Singles` / `_Shared` give them; `inputs`
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

    def _head_stage(self, stage: _Stage, x: _Inputs, banks) -> None:
        arch, layer = self.arch, stage.layer
        scale = arch.attn_scale(layer)
        B, T, d = self.runs.residual_at(stage.kind, layer).shape
        proj = self._project(stage, x, (B, T, d)).view(stage.n_rows, B, T, -1)
        if arch.transforms_qk:  # q/k norms and rotation by position, before any version picking
            for channel, name in ((0, "q"), (1, "k")):
                rows = [r for cr in stage.copies for r in cr.rows[channel]]
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
            q = _pick(proj[cr.rows[0]], self.positions.version_index(cr.copy.inputs[0]))
            k_index = self.positions.version_index(cr.copy.inputs[1])
            v_index = self.positions.version_index(cr.copy.inputs[2])
            keys, values = proj[cr.rows[1]], proj[cr.rows[2]]
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
            ref = self.runs.z(layer, self._reference_run(span.hypothesis))
            z_ref = ref[:, :, heads].permute(2, 0, 1, 3)
            bmm_into(banks[span.hypothesis][:, span.slot:span.slot + n],
                     (z[start:stop] - z_ref).reshape(n, B * T, -1), arch.W_O(layer)[heads])

    @staticmethod
    def _hidden(allowed: torch.Tensor | None, T: int, device) -> torch.Tensor:
        """[dest, src] the keys a query may not see: after it, or outside its window."""
        if allowed is None:
            return torch.ones(T, T, dtype=torch.bool, device=device).triu(1)
        return ~allowed

    def _mlp_stage(self, stage: _Stage, x: _Inputs, banks) -> None:
        xs = torch.stack([self._picked(x, stage, cr, 0) for cr in stage.copies])  # [copy, batch, pos, d]
        n, B, T, d = xs.shape
        out = self.arch.mlp(stage.layer, xs.view(n * B, T, d)).view(n, B, T, d)
        self._write_entries(stage, out, banks, self.runs.mlp_out)

    def _heads_sum_stage(self, stage: _Stage, x: _Inputs, banks) -> None:
        """Each combination of head copies, summed, through the layer's post-attention norm."""
        xs = torch.stack([self._picked(x, stage, cr, 0) for cr in stage.copies])
        out = self.arch.norm_heads_sum(stage.layer, xs)  # [copy, batch, pos, d_model]
        self._write_entries(stage, out, banks, self.runs.attn_out)

    def _write_entries(self, stage: _Stage, out: torch.Tensor, banks, cached) -> None:
        """Bank entries of one node per copy: out [copy, batch, pos, d_model] minus the cached
        run (`cached(layer, run)`) each hypothesis's bank is relative to."""
        for span in stage.spans:
            ref = cached(stage.layer, self._reference_run(span.hypothesis))
            n = span.stop - span.start
            torch.sub(out[span.start:span.stop].flatten(1, 2).transpose(0, 1), ref.flatten(0, 1)[:, None],
                      out=banks[span.hypothesis][:, span.slot:span.slot + n])

    def _output_stage(self, stage: _Stage, x: _Inputs) -> list[torch.Tensor]:
        xs = torch.stack([self._picked(x, stage, cr, 0) for cr in stage.copies])
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
