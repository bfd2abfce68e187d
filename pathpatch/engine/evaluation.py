"""Exact treeified evaluation G_H(x_r, x_c) over a dataset: the public entry points.

`evaluate` streams batches: per batch the clean and counterfactual runs are cached once
(`runs.py`), hypotheses are evaluated in stacked groups (`stage_plan.py` plans a group,
`group_evaluation.py` runs it), and delta is read at the scored positions (`metrics.py`).
Only mixed copies are computed; nothing is approximated: a memory budget shrinks batches and
groups, never precision.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property

import pyarrow as pa
import torch

from pathpatch.engine.ablation import Ablation, Intervention, ablation_values
from pathpatch.engine.folding import FoldedWeights
from pathpatch.engine.group_evaluation import GroupEvaluator
from pathpatch.engine.metrics import DEFAULT_METRIC, get_metric
from pathpatch.engine.positions import PositionContext
from pathpatch.engine.prepared import Prepared, check_mixed_copies, gc_paused
from pathpatch.engine.runs import Runs
from pathpatch.engine.stage_plan import SHARED_HEADS_PRODUCTS
from pathpatch.engine.workspace import Workspace
from pathpatch.errors import PathPatchError
from pathpatch.language.copies import CF, CLEAN, CopyGraph, estimate_cost
from pathpatch.model.adapter import Adapter, Footprint
from pathpatch.model.costs import unit_costs
from pathpatch.model.graph import Graph
from pathpatch.model.support import check_no_hooks

DEFAULT_MAX_MIXED_COPIES = 4096


class ModelState:
    """What `evaluate` keeps across calls on one model, when the caller keeps this: the
    LayerNorm-folded projections, computed once instead of per call (about a forward's time on
    GPT-2 small), and the workspace, whose large buffers are then memory already touched, not
    fresh pages (docs/MEASUREMENTS.md). The model's weights must not change while it is kept;
    between calls it holds at most the buffers of the largest pass so far.

    `prepared` is the model's store of compiled hypotheses and group plans (`Prepared.of`):
    kept per model whether or not a caller keeps this, bounded (`DEFAULT_MAX_KEPT_BYTES` per
    table)."""

    def __init__(self, model):
        self.model = model
        self.folded = FoldedWeights(model)
        self.workspace = Workspace()
        self.prepared = Prepared.of(model)


@dataclass(frozen=True, slots=True)  # one per hypothesis: no __dict__
class HypothesisCost:
    """What validation reports per hypothesis before any data is touched."""

    name: str
    mixed_copies: int
    est_cost: float
    """Estimated compute of its mixed copies, in plain forward passes (per batch)."""
    matches: str = "some"
    """"none" (P = {}: G_H is the counterfactual run), "all" (the clean run) or "some" paths."""


def compile_all(
    graph: Graph, hypotheses: Sequence, max_mixed_copies: int = DEFAULT_MAX_MIXED_COPIES
) -> list[CopyGraph]:
    """Compile every hypothesis anew (nothing kept: tools that time compiling); reject any over
    `max_mixed_copies`, naming it. The engine's entry points compile through `Prepared`."""
    out = []
    for h in hypotheses:
        with gc_paused():
            cg = h.compile(graph)
        check_mixed_copies(h, cg.n_mixed, max_mixed_copies)
        out.append(cg)
    return out


def _check_restrictions(hypotheses: Sequence, restrictions: Sequence[frozenset], dataset) -> None:
    """Masks the dataset has, positions and offsets within its sequences (`restrictions`: each
    hypothesis's, as compiled)."""
    T = dataset.seq_len
    for h, used in zip(hypotheses, restrictions, strict=True):
        for r in used:
            if r.kind == "mask" and r.value not in dataset.masks:
                raise PathPatchError(
                    f"hypothesis {h.name!r} uses @mask={r.value} but the dataset has masks"
                    f" {sorted(dataset.masks) or '(none)'}"
                )
            beyond = ([v for v in r.value if v >= T] if r.kind in ("pos", "src")
                      else [r.value] if r.kind == "offset" and r.value >= T else [])
            if beyond:
                raise PathPatchError(
                    f"hypothesis {h.name!r}: {r} reaches position {beyond[0]}, beyond the "
                    f"dataset's sequences (positions 0-{T - 1})"
                )


def check(
    graph_or_model,
    hypotheses: Sequence,
    *,
    max_mixed_copies: int = DEFAULT_MAX_MIXED_COPIES,
    dataset=None,
    seq_len: int | None = None,
) -> list[HypothesisCost]:
    """Validate hypotheses against a model (and dataset masks); report copies and cost.

    The cost is estimated at the dataset's sequence length, else at `seq_len`; with neither
    (or a bare graph) it is NaN. Given a model, what is compiled is kept in its `Prepared`
    store (bounded), where a later `evaluate` in this process finds it; members of a family
    that share their cost (`shared_cost`) are compiled once for all of them."""
    bare = isinstance(graph_or_model, Graph)
    graph = graph_or_model if bare else Graph.from_model(graph_or_model)
    prepared = Prepared() if bare else Prepared.of(graph_or_model)  # a bare graph keeps nothing
    seq_len = dataset.seq_len if dataset is not None else seq_len
    unit = None if bare or not seq_len else unit_costs(graph_or_model.cfg, seq_len)
    matches = {CF: "none", CLEAN: "all"}
    shared: dict[tuple, tuple[int, float, str]] = {}  # family members that cost the same
    if dataset is not None:  # restrictions first: they need no compiling
        _check_restrictions(hypotheses, [h.restrictions for h in hypotheses], dataset)
    out = []
    for h in hypotheses:
        key = h.shared_cost(graph) if hasattr(h, "shared_cost") else None
        if key is None or key not in shared:
            compiled = prepared.compile(graph, h, max_mixed_copies)
            cg = compiled.copy_graph
            cost = float("nan") if unit is None else estimate_cost(cg, unit)
            report = (compiled.n_mixed, cost, matches.get(cg.root, "some"))
            if key is not None:
                shared[key] = report
        else:
            report = shared[key]
        out.append(HypothesisCost(h.name, *report))
    return out


DEFAULT_MEMORY_BUDGET = 2 * 1024**3


def cached_bytes(runs_cache: dict) -> int:
    """Bytes the cached runs in an `evaluate` runs cache hold (a worker bounds what it keeps)."""
    return sum(runs.nbytes() for runs in runs_cache.values())


@torch.inference_mode()
def evaluate(
    model,
    dataset,
    hypotheses: Sequence,
    metric=DEFAULT_METRIC,
    *,
    batch_size: int | None = None,
    memory_budget: int | None = None,
    max_mixed_copies: int = DEFAULT_MAX_MIXED_COPIES,
    progress=None,
    runs_cache: dict | None = None,
    state: ModelState | None = None,
    intervention="resample",
):
    """Per-example unexplained and total effects of each hypothesis.

    Args:
        model: a pathpatch `Transformer` (see `pathpatch.model.loading.load_model`).
        dataset: a `PairDataset`; delta is read at its `scored` positions.
        hypotheses: `Hypothesis` objects (names unique).
        metric: "kl" (default), "loss", "logit_diff", "module:function" or a `Metric`.
        batch_size: examples per pass (default: as many as `memory_budget` allows, up to 64).
        memory_budget: bytes for caches and mixed copies (default 2 GiB); decides the batch
            size and how many hypotheses are stacked in one pass. Never approximates.
        progress: optional callable(n_examples_done) called after each batch.
        runs_cache: a dict the caller keeps for this dataset (e.g. per shard): when the whole
            dataset is one batch, its cached clean and counterfactual runs are kept there and
            reused by the next call with other hypotheses (same numbers, two forwards saved).
            With it and no `batch_size`, the dataset is one batch whenever the budget allows.
        state: a `ModelState` of this model, kept by a caller that evaluates it many times (a
            worker, item after item).
        intervention: what the paths outside a hypothesis carry (`ablation.py`): "resample"
            (default: each example's x_c), "zero", "mean" or "mean_positional" (means over this
            dataset's reference examples), or an `Ablation` whose values were computed
            elsewhere (a sharded sweep computes them once, on the whole dataset). Under an
            x_c-free intervention, G(x_c) stands for the fully ablated model (`te`, `m_cf`) and
            the dataset's counterfactual prompts are not read.

    Returns:
        pyarrow.Table with one row per (hypothesis, example): `hypothesis`, `example`, `ue`
        (delta(G(x_r), G_H)), `te` (delta(G(x_r), G(x_c))), ordered by hypothesis then example;
        for a metric with a `value` (logit_diff) also `m`, `m_clean`, `m_cf`: that statistic of
        G_H, G(x_r) and G(x_c).
    """
    metric = get_metric(metric)
    graph = Graph.from_model(model)
    names = [h.name for h in hypotheses]
    if len(set(names)) != len(names):
        raise PathPatchError(f"hypothesis names must be unique, got {names}")
    arch = Adapter.of(model)
    if dataset.seq_len > arch.n_ctx:
        raise PathPatchError(f"the dataset's sequences have {dataset.seq_len} positions, more "
                             f"than the model's context (n_ctx = {arch.n_ctx})")
    if state is not None and state.model is not model:
        raise PathPatchError("evaluate: `state` is another model's ModelState")
    ablation = intervention if isinstance(intervention, Ablation) else None
    if ablation is None and not Intervention.parse(intervention).reads_counterfactual:
        # over the whole dataset given, never per batch: results independent of batching
        ablation = ablation_values(model, dataset.reference, intervention)
    check_no_hooks(model)  # checked once when the graph was made (`Graph.from_model`); hooks may come later
    # prepared once per process and model (`prepared.py`): compiled with any heads' sums to
    # compute, restrictions read, group plans built
    prepared = state.prepared if state is not None else Prepared.of(model)
    compiled = prepared.compile_all(graph, hypotheses, max_mixed_copies)
    _check_restrictions(hypotheses, [c.restrictions for c in compiled], dataset)
    dataset.validate(arch.d_vocab)
    metric.check_dataset(dataset)  # once per call: each batch's `against` skips it
    copy_graphs = [c.copy_graph for c in compiled]
    budget = MemoryBudget(model, dataset.seq_len, memory_budget or DEFAULT_MEMORY_BUDGET)
    batch_size, groups = budget.schedule(copy_graphs, len(dataset), batch_size,
                                         whole=runs_cache is not None)
    plans = [prepared.plan(graph, [hypotheses[i] for i in group], [compiled[i] for i in group])
             for group in groups]
    n = len(dataset)
    device = next(model.parameters()).device
    ablation_here = ablation.to(device) if ablation is not None else None  # once, not per batch
    state = state or ModelState(model)
    folded, workspace = state.folded, state.workspace
    ue = torch.zeros(len(hypotheses), n, dtype=torch.float64)
    te = torch.zeros(n, dtype=torch.float64)
    values = metric.value is not None  # the metric's own statistic too: m, m_clean, m_cf
    m = torch.zeros(len(hypotheses), n, dtype=torch.float64) if values else None
    m_runs = torch.zeros(2, n, dtype=torch.float64) if values else None
    for start in range(0, n, batch_size):
        batch = dataset.select(slice(start, start + batch_size))
        stop = start + len(batch)
        key = (dataset.digest(), batch_size, str(device),
               ablation.digest if ablation is not None else None) if batch_size >= n else None
        runs = runs_cache.get(key) if runs_cache is not None and key else None
        if runs is None:
            if runs_cache is not None:  # one batch's runs at a time: what the budget accounts
                runs_cache.clear()  # for; freed first, so the new runs reuse their memory
            if ablation is not None:
                runs = Runs.ablated(model, batch.reference.to(device), ablation_here)
            else:
                runs = Runs(model, batch.reference.to(device), batch.counterfactual.to(device))
            if runs_cache is not None and key:
                runs_cache[key] = runs
        if ablation is not None:  # what the metric sees: x_c is not part of this run
            batch = batch.without_counterfactual(
                f"metric {metric.name!r} read the batch's counterfactual prompts "
                f"(batch.counterfactual), but intervention {ablation.intervention.value!r} "
                "carries ablation values instead of x_c, so they are no part of the run: use a "
                "metric that reads only the clean prompts, the answers and the logits, or "
                "intervention = 'resample'")
        positions = PositionContext(
            {k: v.to(device) for k, v in batch.masks.items()}, len(batch), batch.seq_len, device
        )
        # the clean side once per batch; the dataset was checked above
        delta = metric.against(runs.logits["r"], batch, checked=True)
        te[start:stop] = delta(runs.logits["c"]).cpu()
        if values:
            value = metric.values(runs.logits["r"], batch)  # what it reads of the batch, once
            for row, run in enumerate(("r", "c")):
                m_runs[row, start:stop] = value(runs.logits[run]).cpu()
        read = batch.scored.to(device) if metric.scored_only else None
        for group, plan in zip(groups, plans, strict=True):
            outputs = GroupEvaluator(model, plan, runs, positions, folded, read, workspace).logits()
            for i, logits in zip(group, outputs, strict=True):
                ue[i, start:stop] = delta(logits).cpu()
                if values:
                    m[i, start:stop] = value(logits).cpu()
            del outputs, logits  # dropped before the next group: its logits reuse their buffer
        if progress is not None:
            progress(len(batch))
    examples = dataset.example_ids.to(torch.int64)
    columns = {
        "hypothesis": pa.array([n_ for n_ in names for _ in range(n)], pa.string()),
        "example": pa.array(examples.repeat(len(hypotheses)).numpy(), pa.int64()),
        "ue": pa.array(ue.reshape(-1).numpy(), pa.float64()),
        "te": pa.array(te.repeat(len(hypotheses)).numpy(), pa.float64()),
    }
    if values:
        columns["m"] = pa.array(m.reshape(-1).numpy(), pa.float64())
        columns["m_clean"] = pa.array(m_runs[0].repeat(len(hypotheses)).numpy(), pa.float64())
        columns["m_cf"] = pa.array(m_runs[1].repeat(len(hypotheses)).numpy(), pa.float64())
    return pa.table(columns)


@dataclass(frozen=True)
class MemoryBudget:
    """Bytes the engine will hold, per example, and the batch/group sizes that fit a budget.

    Per example: both cached runs, the counterfactual deviation bank (every node), and, per
    stacked hypothesis, its bank of mixed-copy deviations, its widest stage's input rows and
    its output logits. The bank is held once (`Runs.cf_bank` writes it in place); a stage's
    widest input rows count twice for its working copies, and `SHARED_HEADS_PRODUCTS` times for
    the head stages whose inputs one product builds together, held until the last of them
    (`tests/pathpatch/test_memory.py` measures the peak under the budget).
    """

    model: object
    seq_len: int
    budget: int

    @cached_property  # read once: `hypothesis_per_example` runs per hypothesis of a sweep
    def _footprint(self) -> Footprint:
        return Adapter.of(self.model).footprint(self.seq_len)

    def fixed_per_example(self) -> int:
        f, T = self._footprint, self.seq_len
        # transient: the widest activations of the forward that computes both runs (`Runs`:
        # two examples each), and the metric's float64 rows (KL keeps the clean probabilities
        # for the batch, one row per scored position, and works on two more at a time: at most 3
        # per position, 4 counted)
        metric = 4 * T * f.d_vocab * 8
        return T * (2 * f.cached_run + f.bank + 2 * f.forward) * f.itemsize + metric

    def hypothesis_per_example(self, cg: CopyGraph) -> int:
        f, T = self._footprint, self.seq_len
        by_stage: dict = {}
        for copy in cg.copies:
            key = (copy.node.layer, copy.node.kind)
            by_stage[key] = by_stage.get(key, 0) + sum(len(ci.versions) for ci in copy.inputs)
        widest = max(by_stage.values(), default=0)
        rows = cg.n_mixed + (2 + SHARED_HEADS_PRODUCTS) * widest
        elements = rows * T * f.d_model + widest * T * T + 2 * T * f.d_vocab
        return elements * f.itemsize

    def schedule(self, copy_graphs: Sequence[CopyGraph], n_examples: int, batch_size: int | None,
                 whole: bool = False) -> tuple[int, list[list[int]]]:
        """(batch size, groups of hypothesis indices) whose peak fits the budget.

        With no `batch_size`, batches hold up to 64 examples, or all `n_examples` when `whole`
        and the budget allows it (one batch: its cached runs can serve the next call).
        """
        fixed = self.fixed_per_example()
        costs = [self.hypothesis_per_example(cg) for cg in copy_graphs]
        largest = max(costs, default=0)
        most = self.budget // (fixed + largest)
        if most < 1:
            raise PathPatchError(
                f"memory_budget={self.budget} bytes cannot hold even one example with the largest"
                f" hypothesis (~{fixed + largest} bytes); raise it"
            )
        if batch_size is None:
            batch_size = int(min(n_examples if whole else 64, n_examples, most))
        elif batch_size > most:
            raise PathPatchError(
                f"batch_size={batch_size} does not fit memory_budget={self.budget} bytes (at most"
                f" {most} examples with these hypotheses); lower batch_size or raise the budget"
            )
        room = self.budget // batch_size - fixed
        groups: list[list[int]] = [[]]
        used = 0
        for i, cost in enumerate(costs):
            if groups[-1] and used + cost > room:
                groups.append([])
                used = 0
            groups[-1].append(i)
            used += cost
        return batch_size, [g for g in groups if g]
