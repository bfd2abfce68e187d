"""The worker: one loaded model that evaluates work items, with a small cache of shards.

Plain Python (no Ray): the Ray actor in `pipeline.ray_executor` wraps it, and the in-process
backend uses it directly, so both run exactly the same code. A worker checks on start that its
weights have the digest the plan was made with (a different file on another node would
otherwise silently produce other numbers).
"""

from __future__ import annotations

import os
import socket
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, assert_never

import torch

from pathpatch.data.pairs import PairDataset
from pathpatch.discovery.attribution import Attribution
from pathpatch.engine import evaluation as engine
from pathpatch.errors import PathPatchError
from pathpatch.model.loading import load_model, model_digest
from pipeline.allocator import fit_to_model
from pipeline.resolve import TORCH_DTYPES

if TYPE_CHECKING:  # annotations only: result tables are built by the engine
    import pyarrow as pa


@dataclass(frozen=True)
class WorkerConfig:
    """What every worker of a sweep is built from (picklable to actors). Built from a spec by
    `pipeline.driver` only, so no default is restated here.

    Attributes:
        model: model spec for `load_model`.
        model_digest: the digest the plan used; a mismatch is an error.
        dtype: torch dtype name.
        metric: metric spec.
        threads: torch threads.
        device: "cpu", "cuda" or "auto" (cuda where available).
        batch_size, memory_budget: passed to `engine.evaluate`.
        shard_cache: shards kept in memory.
        max_mixed_copies: the bound validation used.
        intervention: "resample", or the `Ablation` the driver computed on the whole dataset.
    """

    model: str
    model_digest: str
    dtype: str
    metric: str
    threads: int
    device: str
    batch_size: int | None
    memory_budget: int | None
    shard_cache: int
    max_mixed_copies: int
    intervention: Any = "resample"


@dataclass(frozen=True)
class Evaluate:
    """A work item as shipped to a worker: a group of hypotheses evaluated on a shard, one
    result row per (hypothesis, example).

    Attributes:
        item_id: the item's identity (its file's name).
        shard_id: the shard's id (`pipeline.plan.Shard.id`).
        hypotheses: `pathpatch.language.hypotheses.Hypothesis` objects, stacked in one pass.
    """

    item_id: str
    shard_id: str
    hypotheses: tuple[Any, ...]


@dataclass(frozen=True)
class Attribute:
    """A work item as shipped to a worker: one attribution method's edge scores on a shard,
    one row per (example, edge).

    Attributes:
        item_id: the item's identity (its file's name).
        shard_id: the shard's id (`pipeline.plan.Shard.id`).
        method: the method (`pathpatch.discovery.attribution.Attribution`).
    """

    item_id: str
    shard_id: str
    method: Attribution


Task = Evaluate | Attribute
"""What a worker runs: the executors schedule either kind by `item_id` and `shard_id` alone."""


@dataclass(frozen=True)
class TaskInfo:
    """Where and how fast a task ran (recorded in the sweep's event log, not in results)."""

    node: str
    pid: int
    seconds: float
    examples: int


class Worker:
    """One model, evaluating tasks on shards it caches (least recently used out first)."""

    def __init__(self, config: WorkerConfig, node: str | None = None, model: Any = None):
        """Load the model (or take `model`, already loaded, in the driver's process)."""
        torch.set_num_threads(config.threads)
        device = config.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.config = config
        self.node = node or socket.gethostname()
        if model is None:
            model = load_model(config.model, device=device, dtype=TORCH_DTYPES[config.dtype])
        self.model = model
        # kept freed memory where the worst case fits this worker's share of the node (its share
        # of the cores: workers are placed by the CPUs they ask for)
        fit_to_model(model, config.memory_budget or engine.DEFAULT_MEMORY_BUDGET,
                     share=min(1.0, config.threads / (os.cpu_count() or 1)))
        digest = model_digest(self.model)
        if digest != config.model_digest:
            raise PathPatchError(
                f"model {config.model!r} on node {self.node} has weights digest {digest[:12]}, "
                f"but the plan was made with {config.model_digest[:12]}: the file differs "
                "between machines; put the same file on every node (or use a bundled model)"
            )
        self._shards: OrderedDict[str, PairDataset] = OrderedDict()
        # the engine's cached runs, per shard: the current one always, others while they fit
        self._runs: OrderedDict[str, dict] = OrderedDict()
        self._engine_state = engine.ModelState(self.model)  # kept item after item

    def holds(self, shard_id: str) -> bool:
        return shard_id in self._shards

    def add_shard(self, shard_id: str, data: PairDataset) -> None:
        self._shards[shard_id] = data
        self._shards.move_to_end(shard_id)
        while len(self._shards) > self.config.shard_cache:
            dropped, _ = self._shards.popitem(last=False)
            self._runs.pop(dropped, None)  # its cached runs go with it

    def _runs_of(self, shard_id: str) -> dict:
        cache = self._runs.setdefault(shard_id, {})
        self._runs.move_to_end(shard_id)
        return cache

    def _keep_runs_within_budget(self) -> None:
        """Drop the least recently used shards' cached runs until those of the other shards
        take at most half the memory budget: a worker that takes turns between shards (a
        search's rounds) keeps computing each shard's two runs once, and memory stays within
        1.5 budgets."""
        limit = (self.config.memory_budget or engine.DEFAULT_MEMORY_BUDGET) // 2
        while len(self._runs) > 1 and sum(
                engine.cached_bytes(c) for c in list(self._runs.values())[:-1]) > limit:
            self._runs.popitem(last=False)

    def run(self, task: Task, data: PairDataset | None = None) -> tuple[pa.Table, TaskInfo]:
        """Rows of one work item on the shard's examples: an `Evaluate` by `engine.evaluate`,
        an `Attribute` by its method's `rows`.

        Args:
            task: the item.
            data: the shard's examples, when the caller did not know this worker holds them.
        """
        if data is not None:
            self.add_shard(task.shard_id, data)
        if task.shard_id not in self._shards:
            raise KeyError(f"worker does not hold shard {task.shard_id}")  # driver bug
        self._shards.move_to_end(task.shard_id)
        shard = self._shards[task.shard_id]
        start = time.perf_counter()
        match task:
            case Evaluate(hypotheses=hypotheses):
                table = engine.evaluate(
                    self.model, shard, list(hypotheses), self.config.metric,
                    batch_size=self.config.batch_size, memory_budget=self.config.memory_budget,
                    max_mixed_copies=self.config.max_mixed_copies,
                    runs_cache=self._runs_of(task.shard_id), state=self._engine_state,
                    intervention=self.config.intervention,
                )
                self._keep_runs_within_budget()
            case Attribute(method=method):
                ablation = self.config.intervention
                table = method.rows(self.model, shard, self.config.metric,
                                    batch_size=self.config.batch_size,
                                    memory_budget=self.config.memory_budget,
                                    ablation=None if isinstance(ablation, str) else ablation)
            case _:
                assert_never(task)
        info = TaskInfo(node=self.node, pid=os.getpid(), seconds=time.perf_counter() - start,
                        examples=len(shard))
        return table, info
