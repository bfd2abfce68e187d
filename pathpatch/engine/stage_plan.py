"""A group's stage plan: how each stage's inputs are built from cached runs and deviation banks.

A group's mixed copies are sorted into stages (heads of layer L, the normalized sums of those
heads where the model has a norm after attention, MLP of layer L, output); each stage is one
pass of `group_evaluation.GroupEvaluator`. Every input *row* of a stage (a version of a channel
of a copy) is a residual stream (for a heads' sum, a sum of heads) made of cached runs and
sender deviations:

    x = resid_r + sum_s a_s c_s + sum_m b_m e_m

with c_s = G(x_c) - G(x_r) the output deviation of sender s (the counterfactual bank) and e_m
the entry of mixed copy m in its hypothesis's bank (its output minus the bank's reference run).
Rows with equal (a, b) are one *input*, built once. Each input is its base (`Residual`,
`PreviousInput`) plus its remaining terms, one matrix product per hypothesis over a slice of its
banks (banks and inputs are position-major, [batch * pos, slot, d_model]: `kernels.py` says why).
An input that is a cached residual as it is (b = 0 and a = 0, or a_s = 1 for every sender: a
removal's untouched channels read the clean run) is read from the cache, not built; a head
stage's rows of it are the same in every hypothesis that reads it through the same heads and
channels, so they are projected once for the group (`CachedRows`).

The plan depends only on the hypotheses, so it is built once and reused for every batch. It is
built by named passes, each returning new values (`plan_stages` reads as the list of them); the
finished plan holds only what evaluation needs.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from dataclasses import dataclass
from enum import Enum

import numpy as np
import torch

from pathpatch.language.copies import CF, CLEAN, Copy, CopyGraph, for_evaluation
from pathpatch.model.graph import Graph, NodeKind

_RANK = {NodeKind.INPUT: 0, NodeKind.HEAD: 1, NodeKind.HEADS_SUM: 2, NodeKind.MLP: 3, NodeKind.OUTPUT: 4}
_RESIDUAL = (NodeKind.HEAD, NodeKind.MLP, NodeKind.OUTPUT)
"""Stages whose inputs are residual streams (a HEADS_SUM's input is a sum of heads)."""
_MAX_COMPARISONS = 4_000_000  # previous-stage bases are searched only up to this much work
_MAX_CARRIED_INPUTS = 4  # a stage with more distinct inputs gets no partial inputs carried
_MIN_CARRIED_TERMS = 4  # a partial input with fewer terms is not worth a row of the heads' product
SHARED_HEADS_PRODUCTS = 3
"""Head stages whose mixing products over the bank entries they all read are one product
(`share_heads_products`)."""


# --- the finished plan --------------------------------------------------------------------------

class Residual(Enum):
    """A base that is a cached residual stream at the stage's input (one row of the product)."""

    CLEAN = "r"
    """resid_r: the clean run's residual (all coefficients 0)."""
    COUNTERFACTUAL = "c"
    """resid_c = resid_r + sum_s c_s: the counterfactual run's residual (every a_s 1)."""
    BETWEEN = "between"
    """The clean residual between the previous stage's input and this one's, added to a
    `PreviousInput` (a residual stream carried forward, as in a forward)."""


@dataclass(frozen=True)
class PreviousInput:
    """A base that is one of the previous stage's inputs of the same hypothesis."""

    index: int  # in that hypothesis's block of the previous stage


Base = Residual | PreviousInput


@dataclass(frozen=True)
class BankLayout:
    """One hypothesis's deviation bank: a slot per mixed copy, in node order, so that the copies
    a stage reads are a prefix of it."""

    slots: dict[int, int]  # copy id -> slot
    orders: tuple[int, ...]  # node order of each slot's copy
    reference: int  # CLEAN or CF: each entry is its copy minus this run (the one nearer to most)
    scratch: int = 0  # rows before the bank into which a fused product copies its other sources

    @property
    def run(self) -> str:
        """The cached run ("r" or "c") the entries are relative to."""
        return "c" if self.reference == CF else "r"


@dataclass(frozen=True)
class BankSpan:
    """A hypothesis's copies `stage.copies[start:stop]`, filling consecutive bank slots."""

    hypothesis: int
    start: int
    stop: int
    slot: int  # the first bank slot they fill


@dataclass(frozen=True)
class CopyRows:
    """Where one copy's input rows sit in its stage, channel by channel, version by version. A
    head stage's row of a cached residual may be another hypothesis's too (`CachedRows`)."""

    hypothesis: int
    copy: Copy
    rows: tuple[tuple[int, ...], ...] = ()  # per channel: the row of each version
    inputs: tuple[tuple[int, ...], ...] = ()  # per channel: the input each reads (in its block)


@dataclass(frozen=True)
class SharedRows:
    """A head stage's terms over the bank entries that an earlier head stage's product reads
    in place: rows of that product's output (`share_heads_products`), added once to its own."""

    rows: slice
    last: bool  # no later stage reads that product: it can be let go


@dataclass(frozen=True, eq=False)
class Mixing:
    """How one hypothesis's inputs of a stage are built, in one product and maybe two.

    Main product: coef @ [bases; counterfactual deviations c_s (`cf`); gathered entries of the
    hypothesis's own bank (`gathered`)]. A dense run of own-bank entries is read in place: when
    it starts at the bank's first entry, the other sources are copied into the scratch rows just
    before the bank so that one product reads both (entries [0, `in_place`)); otherwise by a
    second product (`sliced`, `sliced_coef`). A head stage's fused product may also compute
    `later_rows` rows of later head stages' inputs (`share_heads_products`); those stages add
    them to their own product's output (`earlier`). The inputs after the built ones are cached
    residuals as they are (`cached`): read, not built.
    """

    n_inputs: int  # built by the product; the `cached` inputs follow them
    bases: tuple[Base, ...]
    cf: slice | torch.Tensor | None  # entries of the counterfactual bank
    gathered: slice | torch.Tensor | None  # entries of its own bank, copied into the product
    coef: torch.Tensor  # [n_inputs + later_rows, bases + cf + gathered + in_place]
    in_place: int = 0  # own-bank entries [0, in_place) read by the main product, after scratch
    sliced: slice | None = None  # own-bank entries read in place by a second product
    sliced_coef: torch.Tensor | None = None  # [n_inputs, entries]
    later_rows: int = 0  # rows after its own inputs: later head stages' terms
    earlier: SharedRows | None = None  # its terms an earlier head stage's product computed
    cached: tuple[Residual, ...] = ()  # inputs n_inputs, n_inputs + 1, ...: CLEAN or COUNTERFACTUAL

    @property
    def n_sources(self) -> int:
        """Rows of the main product's source that are copied (into scratch when `in_place`)."""
        return self.coef.shape[1] - self.in_place


@dataclass(frozen=True)
class Singles:
    """The block's first `n` inputs, read by one row each: one batched product."""

    n: int
    rows: torch.Tensor | slice  # the row each input feeds
    keys: torch.Tensor | slice  # its (head, channel) key, `head * 3 + channel`


@dataclass(frozen=True)
class SharedInput:
    """One input read by several rows (q, k and v of many heads reading one residual)."""

    input: int  # within the hypothesis's block
    rows: torch.Tensor
    keys: torch.Tensor | None  # None: every head and channel, in key order


@dataclass(frozen=True)
class Projection:
    """One hypothesis's rows of a head stage: rows reading one input each go through one
    batched product; rows sharing an input through one wide product each."""

    singles: Singles | None = None
    shared: tuple[SharedInput, ...] = ()


@dataclass(frozen=True)
class CachedRows:
    """A head stage's rows that read a cached residual (`run`), projected in one product as a
    hypothesis's own plan projects its rows of one input: its rows of that residual, in key
    order, which every hypothesis reading it through the same heads and channels shares."""

    run: Residual  # CLEAN or COUNTERFACTUAL
    rows: torch.Tensor | slice
    keys: torch.Tensor | slice | None  # `head * 3 + channel` of each row; None: every one
    single: bool  # one row: projected as a hypothesis's `Singles` are


@dataclass(frozen=True, eq=False)
class Stage:
    """One pass: the copies of one layer's nodes of one kind, and how their inputs are built."""

    kind: NodeKind
    layer: int
    copies: tuple[CopyRows, ...]
    spans: tuple[BankSpan, ...]  # where each copy's output goes in its hypothesis's bank
    n_rows: int = 0
    mixing: dict[int, Mixing] = dataclasses.field(default_factory=dict)  # by hypothesis
    projection: dict[int, Projection] = dataclasses.field(default_factory=dict)  # head stages
    cached_rows: tuple[CachedRows, ...] = ()  # head stages: rows of cached residuals, the group's

    @property
    def n_inputs(self) -> int:
        """Distinct inputs over all hypotheses (partial ones carried for the next stage and
        cached residuals read as they are too)."""
        return sum(m.n_inputs + len(m.cached) for m in self.mixing.values())

    @property
    def uses_previous(self) -> bool:
        """Some input is built on one of the previous stage's inputs (plus the clean residual
        between the stages, `Residual.BETWEEN`)."""
        return any(Residual.BETWEEN in m.bases for m in self.mixing.values())


@dataclass(frozen=True)
class PlanSummary:
    """What a plan does, in counts: what its tests and benchmarks read instead of its parts."""

    passes: int  # layer-stage passes per batch
    rows: int  # input rows over all stages
    inputs: int  # distinct inputs built (rows that come out equal are built once)
    products: int  # mixing products (a second product over a slice of a bank counts)
    fused_products: int  # products reading their bank in place after their copied sources
    shared_products: int  # fused head-stage products that also compute later stages' terms
    partial_inputs: int  # inputs read by no row: the next stage's part computed by the heads'
    previous_stage_bases: int  # previous stages' inputs that inputs are built on
    cached_inputs: int  # inputs that are a cached residual as it is: read, not built
    projected_rows: int  # head-stage rows: one q, k or v projection each
    shared_rows: int  # of those, rows that copies of several hypotheses read: projected once


class GroupPlan:
    """The data-independent schedule of a group of compiled hypotheses (not changed once built).

    Attributes:
        graph: the evaluation graph (with heads' sums where the model has them).
        copy_graphs: the hypotheses, each with the copies evaluation computes.
        banks: each hypothesis's bank layout.
        stages: the passes, in order; an INPUT stage's copies are a masked select, not a pass.
    """

    def __init__(self, graph: Graph, copy_graphs: list[CopyGraph]):
        self.graph = graph.evaluation
        self.copy_graphs = tuple(for_evaluation(cg) for cg in copy_graphs)
        banks = lay_out_banks(self.copy_graphs)
        self.stages = plan_stages(self.graph, self.copy_graphs, banks)
        self.banks = with_scratch(banks, self.stages)

    @property
    def n_passes(self) -> int:
        """Layer-stage passes per batch (input copies need no pass: they are a masked select)."""
        return sum(s.kind is not NodeKind.INPUT for s in self.stages)

    def summary(self) -> PlanSummary:
        """The plan's work in counts."""
        mixings = [m for s in self.stages for m in s.mixing.values()]
        read = [{i for cr in s.copies if cr.hypothesis == h for channel in cr.inputs for i in channel}
                for s in self.stages for h in s.mixing]
        heads = [s for s in self.stages if s.kind is NodeKind.HEAD]
        return PlanSummary(
            passes=self.n_passes,
            rows=sum(s.n_rows for s in self.stages),
            inputs=sum(s.n_inputs for s in self.stages),
            products=sum((m.n_inputs > 0) + (m.sliced is not None) for m in mixings),
            fused_products=sum(m.in_place > 0 for m in mixings),
            shared_products=sum(m.later_rows > 0 for m in mixings),
            partial_inputs=sum(m.n_inputs + len(m.cached) - len(r)
                               for m, r in zip(mixings, read, strict=True)),
            previous_stage_bases=sum(isinstance(b, PreviousInput) for m in mixings for b in m.bases),
            cached_inputs=sum(len(m.cached) for m in mixings),
            projected_rows=sum(s.n_rows for s in heads),
            shared_rows=sum(_shared_rows(s) for s in heads),
        )


def _shared_rows(stage: Stage) -> int:
    """Rows of a stage that copies of more than one hypothesis read."""
    readers: dict[int, set[int]] = defaultdict(set)
    for cr in stage.copies:
        for rows in cr.rows:
            for r in rows:
                readers[r].add(cr.hypothesis)
    return sum(len(hypotheses) > 1 for hypotheses in readers.values())


# --- planning -----------------------------------------------------------------------------------

def lay_out_banks(copy_graphs: tuple[CopyGraph, ...]) -> tuple[BankLayout, ...]:
    """Each hypothesis's bank slots (copies sorted by node order, so prefixes hold senders) and
    its reference: the run most of its copies' inputs read, so entries need fewer terms back."""
    banks = []
    for cg in copy_graphs:
        ordered = sorted(cg.copies, key=lambda c: (c.node.order, c.id))
        children = [c for copy in ordered for ci in copy.inputs for v in ci.versions for c in v]
        banks.append(BankLayout({c.id: i for i, c in enumerate(ordered)},
                                tuple(c.node.order for c in ordered),
                                CLEAN if children.count(CLEAN) > children.count(CF) else CF))
    return tuple(banks)


def with_scratch(banks: tuple[BankLayout, ...], stages: tuple[Stage, ...]) -> tuple[BankLayout, ...]:
    """Scratch rows before each bank: the most sources a fused product of it copies there."""
    scratch = [0] * len(banks)
    for stage in stages:
        for h, mixing in stage.mixing.items():
            if mixing.in_place:
                scratch[h] = max(scratch[h], mixing.n_sources)
    return tuple(dataclasses.replace(b, scratch=n) for b, n in zip(banks, scratch, strict=True))


@dataclass(frozen=True, eq=False)
class _Inputs:
    """While planning: one hypothesis's distinct inputs of a stage as coefficient vectors over
    the clean run's senders (a, by node order) and its bank entries (b), with the rows reading
    each (none: a partial input carried for the next stage)."""

    a: tuple[np.ndarray, ...]
    b: tuple[np.ndarray, ...]
    readers: tuple[tuple[int, ...], ...]


class _InputSet:
    """Builds an `_Inputs`, merging equal inputs."""

    def __init__(self, inputs: _Inputs | None = None):
        self.a = list(inputs.a) if inputs else []
        self.b = list(inputs.b) if inputs else []
        self.readers = [list(r) for r in inputs.readers] if inputs else []
        self.found = {(a.tobytes(), b.tobytes()): i for i, (a, b) in enumerate(zip(self.a, self.b))}

    def add(self, a: np.ndarray, b: np.ndarray) -> int:
        """The index of input (a, b), added when new."""
        key = (a.tobytes(), b.tobytes())
        if key not in self.found:
            self.found[key] = len(self.a)
            self.a.append(a)
            self.b.append(b)
            self.readers.append([])
        return self.found[key]

    def done(self) -> _Inputs:
        return _Inputs(tuple(self.a), tuple(self.b), tuple(tuple(r) for r in self.readers))


@dataclass(frozen=True, eq=False)
class _Draft:
    """While planning: a stage's copies, its senders and, per hypothesis, its inputs."""

    kind: NodeKind
    layer: int
    order: int  # receivers read senders of lower topological order only
    copies: tuple[CopyRows, ...]
    spans: tuple[BankSpan, ...]
    senders: np.ndarray | None = None  # node orders of the stage's senders
    n_rows: int = 0
    inputs: dict[int, _Inputs] = dataclasses.field(default_factory=dict)


def plan_stages(graph: Graph, copy_graphs: tuple[CopyGraph, ...],
                banks: tuple[BankLayout, ...]) -> tuple[Stage, ...]:
    """The passes, in order, each deciding one thing (drafts carry what planning needs; the
    finished `Stage`s only what evaluation reads):

    - `sort_into_stages`: which copies each pass computes, and where they sit in their banks;
    - `merge_equal_rows`: which rows are one input (equal coefficient vectors), and which rows
      of cached residuals several hypotheses share;
    - `carry_partial_inputs`: which next-stage inputs a head stage's product begins;
    - `order_inputs`: the order a product writes its hypothesis's inputs in;
    - `choose_bases_and_products`: each input's base, and how each product reads the banks;
    - `plan_projections`: which rows of a head stage project together;
    - `share_heads_products`: which head stages' products over shared entries are one.
    """
    drafts = sort_into_stages(graph, copy_graphs, banks)
    drafts = merge_equal_rows(drafts, graph, banks)
    drafts = carry_partial_inputs(drafts)
    drafts = order_inputs(drafts)
    stages = choose_bases_and_products(drafts)
    stages = plan_projections(stages, graph.n_heads)
    return share_heads_products(stages)


def sort_into_stages(graph: Graph, copy_graphs: tuple[CopyGraph, ...],
                     banks: tuple[BankLayout, ...]) -> tuple[_Draft, ...]:
    """One stage per (layer, kind) with a mixed copy; a hypothesis's copies of a stage fill
    consecutive bank slots (a `BankSpan`)."""
    copies: dict[tuple[int, int], list[CopyRows]] = defaultdict(list)
    for h, bank in enumerate(banks):
        for copy in sorted(copy_graphs[h].copies, key=lambda c: bank.slots[c.id]):
            copies[copy.node.layer, _RANK[copy.node.kind]].append(CopyRows(h, copy))
    drafts = []
    for key in sorted(copies):
        node = copies[key][0].copy.node
        order = min(n.order for n in graph.nodes if n.layer == node.layer and n.kind is node.kind)
        spans: list[BankSpan] = []
        for i, cr in enumerate(copies[key]):
            slot = banks[cr.hypothesis].slots[cr.copy.id]
            last = spans[-1] if spans else None
            if last is not None and last.hypothesis == cr.hypothesis:
                assert slot == last.slot + i - last.start
                spans[-1] = dataclasses.replace(last, stop=i + 1)
            else:
                spans.append(BankSpan(cr.hypothesis, i, i + 1, slot))
        drafts.append(_Draft(node.kind, node.layer, order, tuple(copies[key]), tuple(spans)))
    return tuple(drafts)


def merge_equal_rows(drafts: tuple[_Draft, ...], graph: Graph,
                     banks: tuple[BankLayout, ...]) -> tuple[_Draft, ...]:
    """Number each stage's rows and merge equal ones into distinct inputs, per hypothesis; in
    a head stage, rows of a cached residual that hypotheses share are one (`_share_cached_rows`).

    A row's input relative to the clean run: a_s = 1 for each sender s it reads from the
    counterfactual run (every mixed one too when the bank is relative to it), b_m = 1 for each
    mixed copy m it reads.
    """
    out = []
    for draft in drafts:
        if draft.kind is NodeKind.INPUT:
            out.append(draft)
            continue
        senders = np.array([s.order for s in graph.senders(draft.copies[0].copy.node)])
        inputs: dict[int, _InputSet] = {}
        copies, n_rows = [], 0
        for cr in draft.copies:
            bank = banks[cr.hypothesis]
            n_bank = sum(o < draft.order for o in bank.orders)
            found = inputs.setdefault(cr.hypothesis, _InputSet())
            rows = []
            for ci in cr.copy.inputs:
                channel = []
                for version in ci.versions:
                    children = np.array(version)
                    a = np.zeros(draft.order, dtype=np.float32)
                    b = np.zeros(n_bank, dtype=np.float32)
                    mixed = children >= 0
                    a[senders[children == CF]] = 1
                    if bank.reference == CF:
                        a[senders[mixed]] = 1
                    b[[bank.slots[int(c)] for c in children[mixed]]] = 1
                    found.readers[found.add(a, b)].append(n_rows)
                    channel.append(n_rows)
                    n_rows += 1
                rows.append(tuple(channel))
            copies.append(CopyRows(cr.hypothesis, cr.copy, tuple(rows)))
        draft = dataclasses.replace(draft, copies=tuple(copies), senders=senders, n_rows=n_rows,
                                    inputs={h: s.done() for h, s in inputs.items()})
        out.append(_share_cached_rows(draft) if draft.kind is NodeKind.HEAD else draft)
    return tuple(out)


def _cached_run(a: np.ndarray, b: np.ndarray, senders: np.ndarray) -> Residual | None:
    """The cached residual input (a, b) is as it is: the clean run's (no term), the
    counterfactual run's (every sender from it, no bank entry), or None."""
    if b.any():
        return None
    n = np.count_nonzero(a)
    return Residual.CLEAN if n == 0 else Residual.COUNTERFACTUAL if n == len(senders) else None


def _share_cached_rows(draft: _Draft) -> _Draft:
    """A head stage's rows of a cached residual: each hypothesis projects its rows of one input
    together (`plan_projections`), so two hypotheses whose rows of a cached residual are the
    same heads and channels compute the same projection: the later one's rows become the
    earlier one's, and the stage's rows are numbered again, in order."""
    key = {r: cr.copy.node.head * 3 + channel
           for cr in draft.copies for channel, rows in enumerate(cr.rows) for r in rows}
    alias = list(range(draft.n_rows))
    first: dict[tuple, list[int]] = {}  # (run, keys in order) -> the first hypothesis's rows
    for found in draft.inputs.values():  # hypotheses in stage order: the first has the lowest rows
        for a, b, readers in zip(found.a, found.b, found.readers, strict=True):
            run = _cached_run(a, b, draft.senders)
            if run is None or not readers:
                continue
            rows = sorted(readers, key=lambda r: key[r])  # as `plan_projections` orders them
            unit = (run, tuple(key[r] for r in rows))
            if unit in first:
                for r, r0 in zip(rows, first[unit], strict=True):
                    alias[r] = r0
            else:
                first[unit] = rows
    if all(r == a for r, a in enumerate(alias)):
        return draft
    number: dict[int, int] = {}
    for r, a in enumerate(alias):
        if r == a:
            number[r] = len(number)
    new = [number[a] for a in alias]
    copies = tuple(dataclasses.replace(cr, rows=tuple(tuple(new[r] for r in rows) for rows in cr.rows))
                   for cr in draft.copies)
    inputs = {h: dataclasses.replace(found, readers=tuple(tuple(new[r] for r in rows)
                                                          for rows in found.readers))
              for h, found in draft.inputs.items()}
    return dataclasses.replace(draft, copies=copies, inputs=inputs, n_rows=len(number))


def carry_partial_inputs(drafts: tuple[_Draft, ...]) -> tuple[_Draft, ...]:
    """Compute a following MLP/output input's part over the senders before a head stage inside
    that stage's product, which reads those bank entries anyway; the input itself then adds only
    the heads of its own layer (a previous-stage base, see `choose_bases_and_products`)."""
    out = list(drafts)
    mixed = [i for i, d in enumerate(drafts) if d.kind is not NodeKind.INPUT]
    for i, j in zip(mixed, mixed[1:]):
        heads, stage = out[i], out[j]
        if heads.kind is not NodeKind.HEAD or stage.kind not in (NodeKind.MLP, NodeKind.OUTPUT):
            continue
        inputs = dict(heads.inputs)
        for h, later in stage.inputs.items():
            into = heads.inputs.get(h)
            if into is None or len(later.a) > _MAX_CARRIED_INPUTS:
                continue
            width = len(into.b[0]) if into.b else 0
            found = _InputSet(into)
            for a, b in zip(later.a, later.b):
                a, b = a[:heads.order].copy(), b[:width].copy()
                if np.count_nonzero(a) + np.count_nonzero(b) >= _MIN_CARRIED_TERMS:
                    found.add(a, b)  # read by no row of the heads' stage
            inputs[h] = found.done()
        out[i] = dataclasses.replace(heads, inputs=inputs)
    return tuple(out)


def order_inputs(drafts: tuple[_Draft, ...]) -> tuple[_Draft, ...]:
    """Each hypothesis's inputs in the order its product writes them: inputs read by one row
    first, in row order (a dense circuit's rows then meet the weights in order), then inputs
    several rows share, then partial inputs carried for the next stage, then cached residuals
    (read, not built); and each row's input."""
    out = []
    for draft in drafts:
        # per hypothesis, row -> its input's index in its block (a row of a cached residual
        # may be several hypotheses', each reading it at its own index)
        inputs, where = {}, defaultdict(dict)
        for h, found in draft.inputs.items():
            readers = found.readers
            cached = [_cached_run(a, b, draft.senders) is not None for a, b in zip(found.a, found.b)]

            def rank(i: int, readers=readers, cached=cached) -> tuple:
                group = 3 if cached[i] else 0 if len(readers[i]) == 1 else 1 if readers[i] else 2
                return group, readers[i][:1]

            order = sorted(range(len(found.a)), key=rank)
            inputs[h] = _Inputs(tuple(found.a[i] for i in order), tuple(found.b[i] for i in order),
                                tuple(readers[i] for i in order))
            for i, rows in enumerate(inputs[h].readers):
                for r in rows:
                    where[h][r] = i
        copies = tuple(CopyRows(cr.hypothesis, cr.copy, cr.rows,
                                tuple(tuple([where[cr.hypothesis][r] for r in rows])
                                      for rows in cr.rows))
                       for cr in draft.copies)
        out.append(dataclasses.replace(draft, copies=copies, inputs=inputs))
    return tuple(out)


def choose_bases_and_products(drafts: tuple[_Draft, ...]) -> tuple[Stage, ...]:
    """Pick each input's base and build its products (`_choose_bases`, `_plan_products`); a
    previous stage's inputs are bases only when both stages' inputs are residual streams."""
    stages, previous = [], None
    for draft in drafts:
        mixing = {}
        if draft.kind is not NodeKind.INPUT:
            residual = previous is not None and {previous.kind, draft.kind} <= set(_RESIDUAL)
            for h, inputs in draft.inputs.items():
                earlier = previous.inputs.get(h) if residual else None
                runs = [_cached_run(a, b, draft.senders) for a, b in zip(inputs.a, inputs.b)]
                n = sum(run is None for run in runs)  # built inputs come first (`order_inputs`)
                built = _Inputs(inputs.a[:n], inputs.b[:n], inputs.readers[:n])
                mixing[h] = dataclasses.replace(
                    _plan_products(*_choose_bases(built, earlier, draft.senders, draft.order))
                    if n else _NO_PRODUCT, cached=tuple(runs[n:]))
            previous = draft
        stages.append(Stage(draft.kind, draft.layer, draft.copies, draft.spans, draft.n_rows, mixing))
    return tuple(stages)


_NO_PRODUCT = Mixing(0, (), None, None, torch.zeros(0, 0))
"""The mixing of a hypothesis whose inputs of a stage are all cached residuals."""


def _choose_bases(inputs: _Inputs, previous: _Inputs | None, senders: np.ndarray, order: int
                  ) -> tuple[np.ndarray, tuple[Base, ...], np.ndarray, np.ndarray]:
    """Each input's base: resid_r, resid_c (= resid_r + sum_s c_s) or a previous-stage input
    plus the clean residual between the two stages, whichever leaves the fewest nonzero
    coefficients. Returns the base coefficients [inputs, bases], the bases, and what remains:
    coefficients over the senders' deviations and over the bank entries."""
    A, Bm = np.stack(inputs.a), np.stack(inputs.b)
    on_senders = np.zeros(order, dtype=np.float32)
    on_senders[senders] = 1
    cost_clean = (A != 0).sum(1) + (Bm != 0).sum(1)
    cost_cf = (A != on_senders).sum(1) + (Bm != 0).sum(1)
    from_cf = cost_cf < cost_clean
    best = np.minimum(cost_clean, cost_cf)
    delta_a = np.where(from_cf[:, None], A - on_senders, A)
    delta_b = Bm.copy()
    bases: list[Base] = [Residual.CLEAN, Residual.COUNTERFACTUAL]
    base = np.where(from_cf, bases.index(Residual.COUNTERFACTUAL), bases.index(Residual.CLEAN))
    on_previous = np.zeros(len(A), dtype=bool)
    if previous is not None:
        Ap, Bp = np.stack(previous.a), np.stack(previous.b)
        if len(A) * len(Ap) * (A.shape[1] + Bm.shape[1]) <= _MAX_COMPARISONS:
            Ap = np.pad(Ap, ((0, 0), (0, A.shape[1] - Ap.shape[1])))
            Bp = np.pad(Bp, ((0, 0), (0, Bm.shape[1] - Bp.shape[1])))
            # its differing coefficients, plus the residual between the stages
            via = ((A[:, None] != Ap[None]).sum(2) + (Bm[:, None] != Bp[None]).sum(2) + 1)
            p = via.argmin(1)
            on_previous = via[np.arange(len(A)), p] < best
            if on_previous.any():
                delta_a[on_previous] = A[on_previous] - Ap[p[on_previous]]
                delta_b[on_previous] = Bm[on_previous] - Bp[p[on_previous]]
                chosen = sorted(set(p[on_previous].tolist()))
                first = len(bases) + 1  # the chosen inputs' columns follow BETWEEN's
                bases += [Residual.BETWEEN, *(PreviousInput(i) for i in chosen)]
                column = {i: first + k for k, i in enumerate(chosen)}
                base[on_previous] = [column[i] for i in p[on_previous].tolist()]
    base_coef = np.zeros((len(A), len(bases)), dtype=np.float32)
    base_coef[np.arange(len(A)), base] = 1
    if on_previous.any():
        base_coef[on_previous, bases.index(Residual.BETWEEN)] = 1
    keep = base_coef.any(axis=0)  # drop base rows nobody reads
    return base_coef[:, keep], tuple(b for b, k in zip(bases, keep) if k), delta_a, delta_b


def _plan_products(base_coef: np.ndarray, bases: tuple[Base, ...], delta_a: np.ndarray,
                   delta_b: np.ndarray) -> Mixing:
    """Which entries each product reads: the counterfactual deviations used, gathered; the own
    bank's used entries gathered, read in place by a second product, or read in place by the
    main one after its other sources (fused), whichever moves the least memory."""
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
    return Mixing(len(base_coef), bases, cf, gathered, coef, in_place, sliced, sliced_coef)


def _span(indices: np.ndarray) -> slice | torch.Tensor:
    """A slice when `indices` are consecutive (a view, no copy), else an index tensor."""
    if len(indices) and np.all(np.diff(indices) == 1):
        return slice(int(indices[0]), int(indices[-1]) + 1)
    return torch.as_tensor(indices, dtype=torch.long)


def plan_projections(stages: tuple[Stage, ...], n_heads: int) -> tuple[Stage, ...]:
    """Head stages: group each hypothesis's rows by the input they read; key each row by
    (head, channel). The inputs read by one row each come first (`order_inputs`). Rows of a
    cached residual are the stage's (`CachedRows`), once however many hypotheses read them."""
    out = []
    for stage in stages:
        if stage.kind is not NodeKind.HEAD:
            out.append(stage)
            continue
        readers: dict[int, list[list[int]]] = {h: [[] for _ in range(m.n_inputs + len(m.cached))]
                                               for h, m in stage.mixing.items()}
        key = {}
        for cr in stage.copies:
            for channel, (rows, inputs) in enumerate(zip(cr.rows, cr.inputs, strict=True)):
                for r, i in zip(rows, inputs, strict=True):
                    key[r] = cr.copy.node.head * 3 + channel
                    readers[cr.hypothesis][i].append(r)
        projection, cached = {}, {}
        for h, by_input in readers.items():
            n = stage.mixing[h].n_inputs  # built; the cached residuals follow
            by_input = [sorted(rows) for rows in by_input]
            singles = [rows[0] for rows in by_input[:n] if len(rows) == 1]
            rows = np.array(singles)
            one = Singles(len(singles), _span(rows), _span(np.array([key[r] for r in rows]))
                          ) if singles else None
            shared = []
            for i in range(len(singles), n):
                if by_input[i]:  # none: a partial input carried for the next stage
                    shared.append(SharedInput(i, *_keyed(by_input[i], key, n_heads)))
            projection[h] = Projection(one, tuple(shared))
            for run, rows in zip(stage.mixing[h].cached, by_input[n:], strict=True):
                if rows and tuple(rows) not in cached:  # another hypothesis's rows: projected
                    cached[tuple(rows)] = _cached_rows(run, rows, key, n_heads)
        out.append(dataclasses.replace(stage, projection=projection,
                                       cached_rows=tuple(cached.values())))
    return tuple(out)


def _keyed(rows: list[int], key: dict[int, int], n_heads: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Rows reading one input in (head, channel) order, and their keys (None: every key)."""
    rows = sorted(rows, key=lambda r: key[r])
    keys = [key[r] for r in rows]
    every = keys == list(range(keys[-1] + 1)) and keys[-1] + 1 == 3 * n_heads
    return torch.tensor(rows), None if every else torch.tensor(keys)


def _cached_rows(run: Residual, rows: list[int], key: dict[int, int], n_heads: int) -> CachedRows:
    """Rows of a cached residual, projected as one hypothesis's rows of one input are."""
    if len(rows) == 1:  # as `Singles`
        return CachedRows(run, _span(np.array(rows)), _span(np.array([key[rows[0]]])), single=True)
    return CachedRows(run, *_keyed(rows, key, n_heads), single=False)


def share_heads_products(stages: tuple[Stage, ...]) -> tuple[Stage, ...]:
    """Build head stages' inputs `SHARED_HEADS_PRODUCTS` stages at a time: the first stage's
    fused product also computes the later stages' terms over the bank entries it reads in place
    anyway, and each later stage adds only its bases and newer entries to those rows. The same
    terms, regrouped: one product of a few dozen more rows over the same entries, which runs at
    up to 1.5x the FLOP rate of a thin one on CPU (docs/MEASUREMENTS.md)."""
    out = list(stages)
    heads = [i for i, stage in enumerate(stages) if stage.kind is NodeKind.HEAD]
    for b in range(0, len(heads), SHARED_HEADS_PRODUCTS):
        first, later = heads[b], heads[b + 1:b + SHARED_HEADS_PRODUCTS]
        for h, ms in stages[first].mixing.items():
            if not ms.in_place:
                continue
            readers = [t for t in later if (mt := stages[t].mixing.get(h)) is not None and mt.in_place]
            extra, n_rows = [], ms.n_inputs
            for t in readers:
                mt = stages[t].mixing[h]
                upto, n_src = min(ms.in_place, mt.in_place), mt.n_sources
                rows = ms.coef.new_zeros(mt.n_inputs, ms.coef.shape[1])
                rows[:, ms.n_sources:ms.n_sources + upto] = mt.coef[:, n_src:n_src + upto]
                extra.append(rows)
                sliced, sliced_coef = None, None
                if upto < mt.in_place:  # its newer entries: a second product
                    sliced = slice(upto, mt.in_place)
                    sliced_coef = mt.coef[:, n_src + upto:n_src + mt.in_place].contiguous()
                earlier = SharedRows(slice(n_rows, n_rows + len(rows)), last=t == readers[-1])
                _set_mixing(out, t, h, dataclasses.replace(
                    mt, coef=mt.coef[:, :n_src].contiguous(), in_place=0, sliced=sliced,
                    sliced_coef=sliced_coef, earlier=earlier))
                n_rows += len(rows)
            if extra:
                _set_mixing(out, first, h, dataclasses.replace(
                    ms, coef=torch.cat([ms.coef, *extra]), later_rows=n_rows - ms.n_inputs))
    return tuple(out)


def _set_mixing(stages: list[Stage], i: int, h: int, mixing: Mixing) -> None:
    stages[i] = dataclasses.replace(stages[i], mixing={**stages[i].mixing, h: mixing})
