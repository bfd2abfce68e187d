"""The plan: a sweep cut into work items, each named by a hash of what determines its rows.

Pure and deterministic (no Ray, no files, no model): the same inputs give the same shards and
items, in the same order, with the same identities, on any machine. A work item is one fixed group of
hypotheses on one dataset shard; its identity hashes the model weights digest, the shard
digest (which covers the examples and their ids), the group's (name, canonical pattern) pairs,
the metric and the dtype. Resources, the cluster address and the item's position in the plan
are not part of it, so resuming, resizing or editing a sweep reuses every unchanged item.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from pathpatch.errors import PathPatchError
from pathpatch.language.hypotheses import FREE_FORM, Facts

if TYPE_CHECKING:  # annotations only: the store and the views read plans without torch
    from pathpatch.data.pairs import PairDataset

IDENTITY_VERSION = "pathpatch-item/1"
"""Bump when the meaning of a result row changes, so old files are not mistaken for new."""


@dataclass(frozen=True, slots=True)  # one per hypothesis: no __dict__
class HypothesisInfo:
    """One hypothesis as the pipeline sees it: opaque text, validation's cost report, and what
    its family knew of it (the sweep's `hypotheses` table).

    Attributes:
        name: unique label; the `hypothesis` column of result rows.
        canonical: normalized pattern text (equal patterns, equal text).
        mixed_copies: node copies the engine must compute for it.
        est_cost: estimated compute, in plain forward passes per batch.
        kind: "evaluation" (a hypothesis: rows of `results`) or "attribution" (a method's
            approximate edge scores: rows of `attributions`, one per edge).
        rows_per_example: result rows per example (an attribution: the model's edge count).
        facts: the hypothesis's `Facts` (family, target, ranking, k, ...): data, never part
            of an identity or the manifest; `pipeline.store.hypotheses_table` writes them.
    """

    name: str
    canonical: str
    mixed_copies: int = 0
    est_cost: float = 0.0
    kind: str = "evaluation"
    rows_per_example: int = 1
    facts: Facts = field(default=FREE_FORM, compare=False, repr=False)


def attribution_info(*, name: str, method: str, steps: int, edges: int,
                     forwards: float, points: str = "") -> HypothesisInfo:
    """An attribution method as the plan lists it: a group of its own, `edges` rows per
    example. Its identity text (the `canonical` of a hypothesis) is what determines its rows
    beside model and metric: the method, its steps and EAP-IG's points. The `right` points
    (α = 1/m..1) keep the text every EAP-IG item had before points were named, since they were
    its points; the `left` ones (the default since) add `points=left`, so an EAP-IG result
    written before is computed again, not read back as theirs. EAP's text is unchanged."""
    canonical = f"attribution {method} steps={steps}"
    if points and points != "right":
        canonical += f" points={points}"
    return HypothesisInfo(name=name, canonical=canonical,
                          est_cost=forwards, kind="attribution", rows_per_example=edges)


@dataclass(frozen=True)
class Shard:
    """A contiguous range of examples [start, stop) of a dataset, identified by its content.

    Attributes:
        index: position of the shard in the dataset's shard list (0, 1, ...).
        start: first example (row) of the shard.
        stop: one past the last example.
        digest: `PairDataset.digest` of the shard's examples.
        id: ``shard-<index:05d>-<first 12 hex of digest>``, stable across runs and machines.
    """

    index: int
    start: int
    stop: int
    digest: str
    id: str = field(init=False)

    def __post_init__(self) -> None:
        if not 0 <= self.start < self.stop or self.index < 0:
            raise PathPatchError(
                f"shard {self.index}: range [{self.start}, {self.stop}) is empty or invalid; a "
                "shard holds at least one example"
            )
        if not re.fullmatch(r"[0-9a-f]{64}", self.digest):
            raise PathPatchError(f"shard {self.index}: digest {self.digest!r} is not sha256 hex")
        object.__setattr__(self, "id", f"shard-{self.index:05d}-{self.digest[:12]}")

    def __len__(self) -> int:
        return self.stop - self.start

    @property
    def n_examples(self) -> int:
        return self.stop - self.start

    def take(self, dataset: PairDataset, *, verify: bool = True) -> PairDataset:
        """The shard's examples of `dataset`.

        Args:
            dataset: the dataset this shard was cut from.
            verify: check that the slice has this shard's digest (catches a changed dataset).

        Raises:
            PathPatchError: the range does not fit `dataset` or its content differs.
        """
        if self.stop > len(dataset):
            raise PathPatchError(
                f"{self.id}: covers examples [{self.start}, {self.stop}) but the dataset has "
                f"{len(dataset)}; it was cut from another dataset: shard this one again"
            )
        part = dataset.select(slice(self.start, self.stop))
        if verify and part.digest() != self.digest:
            raise PathPatchError(
                f"{self.id}: examples [{self.start}, {self.stop}) of this dataset have digest "
                f"{part.digest()[:12]}, not {self.digest[:12]}; the dataset changed since it "
                "was sharded: shard it again"
            )
        return part


def shard_dataset(dataset: PairDataset, shard_size: int) -> list[Shard]:
    """Cut `dataset` into contiguous shards of `shard_size` examples (the last may be smaller).

    Deterministic: the same dataset and size give the same ranges, digests and ids on any
    run or machine; the shards cover every example exactly once, in order.

    Raises:
        PathPatchError: `shard_size` is not a positive int, or a shard would be empty.
    """
    if isinstance(shard_size, bool) or not isinstance(shard_size, int) or shard_size <= 0:
        raise PathPatchError(
            f"shard_size must be a positive number of examples, got {shard_size!r}"
        )
    n = len(dataset)
    if n == 0:
        raise PathPatchError("cannot shard an empty dataset: every shard needs an example")
    shards = []
    for index, start in enumerate(range(0, n, shard_size)):
        stop = min(start + shard_size, n)
        digest = dataset.select(slice(start, stop)).digest()
        shards.append(Shard(index=index, start=start, stop=stop, digest=digest))
    return shards


@dataclass(frozen=True)
class WorkItem:
    """One actor call and one result file: a group of hypotheses on one shard.

    Attributes:
        id: identity hash (hex); the result file is `items/<id>.parquet`.
        group: index of the hypothesis group in the plan.
        shard: the shard evaluated.
        hypotheses: the group, in spec order.
    """

    id: str
    group: int
    shard: Shard
    hypotheses: tuple[HypothesisInfo, ...]

    @property
    def n_examples(self) -> int:
        return self.shard.n_examples

    @property
    def expected_rows(self) -> int:
        """One row per (hypothesis, example); an attribution's, one per (example, edge)."""
        return sum(h.rows_per_example for h in self.hypotheses) * self.shard.n_examples

    @property
    def kind(self) -> str:
        """"evaluation" or "attribution" (a group is one or the other)."""
        return self.hypotheses[0].kind

    @property
    def est_cost(self) -> float:
        return sum(h.est_cost for h in self.hypotheses)


@dataclass(frozen=True)
class Plan:
    """Every work item of a sweep, shard-major (all groups of shard 0, then shard 1, ...)."""

    model_digest: str
    metric: str
    dtype: str
    hypotheses: tuple[HypothesisInfo, ...]
    groups: tuple[tuple[HypothesisInfo, ...], ...]
    shards: tuple[Shard, ...]
    items: tuple[WorkItem, ...]
    intervention: str = "resample"
    """What paths outside a hypothesis carry (`pathpatch.engine.ablation.Intervention`)."""
    ablation: str = ""
    """The digest of an x_c-free intervention's values ("" under resample)."""

    @property
    def n_examples(self) -> int:
        return sum(s.n_examples for s in self.shards)


def item_identity(*, model_digest: str, shard_digest: str,
                  hypotheses: tuple[HypothesisInfo, ...], metric: str, dtype: str,
                  intervention: str = "resample", ablation: str = "") -> str:
    """sha256 (hex, 32 chars) of exactly what determines a work item's rows. The intervention
    and `ablation` (the digest of its values: means depend on the whole dataset, not only on
    the item's shard) enter only where it is not the default, so earlier sweeps keep their
    identities."""
    payload = {
        "version": IDENTITY_VERSION,
        "model": model_digest,
        "shard": shard_digest,
        "hypotheses": [[h.name, h.canonical] for h in hypotheses],
        "metric": metric,
        "dtype": dtype,
    }
    if intervention != "resample":
        payload["intervention"] = intervention
        payload["ablation"] = ablation
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def group_hypotheses(hypotheses: tuple[HypothesisInfo, ...],
                     group_size: int) -> tuple[tuple[HypothesisInfo, ...], ...]:
    """Consecutive groups of `group_size` in spec order (appending keeps earlier groups)."""
    assert group_size >= 1, group_size
    return tuple(hypotheses[i:i + group_size] for i in range(0, len(hypotheses), group_size))


def make_plan(*, model_digest: str, shards: tuple[Shard, ...],
              hypotheses: tuple[HypothesisInfo, ...], group_size: int, metric: str,
              dtype: str, attributions: tuple[HypothesisInfo, ...] = (),
              intervention: str = "resample", ablation: str = "") -> Plan:
    """Cut a sweep into work items (shard-major), each with its identity: hypotheses in groups
    of `group_size`, then each attribution method on its own."""
    names = [h.name for h in (*hypotheses, *attributions)]
    assert len(set(names)) == len(names), "hypothesis names must be unique"
    assert all(a.kind == "attribution" for a in attributions)
    groups = (group_hypotheses(tuple(hypotheses), group_size)
              + tuple((a,) for a in attributions))
    items = tuple(
        WorkItem(
            id=item_identity(model_digest=model_digest, shard_digest=shard.digest,
                             hypotheses=group, metric=metric, dtype=dtype,
                             intervention=intervention, ablation=ablation),
            group=g, shard=shard, hypotheses=group,
        )
        for shard in shards
        for g, group in enumerate(groups)
    )
    assert len({item.id for item in items}) == len(items), "duplicate work item identity"
    return Plan(model_digest=model_digest, metric=metric, dtype=dtype,
                hypotheses=(*hypotheses, *attributions), groups=groups, shards=tuple(shards), items=items,
                intervention=intervention, ablation=ablation)


NAME_WIDTH = 60
"""Widest hypothesis name `describe` prints whole; a longer one is cut with "..."."""


def describe(plan: Plan, *, max_rows: int = 50) -> str:
    """The plan as text for `run --dry-run`: totals, then one line per hypothesis."""
    total = sum(item.est_cost for item in plan.items)
    lines = [
        f"plan: {len(plan.items)} work items = {len(plan.groups)} hypothesis groups x "
        f"{len(plan.shards)} shards; {len(plan.hypotheses)} hypotheses on {plan.n_examples} "
        f"examples",
        (f"model digest {plan.model_digest[:12]}" if plan.model_digest else
         "weights not read (planned from the architecture)") + f", metric {plan.metric}, dtype {plan.dtype}; "
        f"estimated cost {total:.1f} forward-equivalents per batch over all items",
        "",
    ]
    rows = [(g, h) for g, group in enumerate(plan.groups) for h in group]
    # the name column as wide as the longest name shown (up to NAME_WIDTH; longer ones cut)
    width = max([len("hypothesis")] + [min(len(h.name), NAME_WIDTH) for _, h in rows[:max_rows]])
    lines.append(f"{'group':>5}  {'hypothesis':<{width}} {'mixed copies':>12} {'est. cost':>10}"
                 "  canonical")
    for g, h in rows[:max_rows]:
        name = h.name if len(h.name) <= NAME_WIDTH else h.name[:NAME_WIDTH - 3] + "..."
        canonical = h.canonical if len(h.canonical) <= 60 else h.canonical[:57] + "..."
        lines.append(f"{g:>5}  {name:<{width}} {h.mixed_copies:>12} {h.est_cost:>10.2f}  "
                     f"{canonical}")
    if len(rows) > max_rows:
        lines.append(f"... and {len(rows) - max_rows} more hypotheses")
    return "\n".join(lines)
