"""A worker prepares once: its weights hashed once per load, each group compiled and planned once
for all its items (counted, not timed)."""

import pickle

import torch

import pathpatch.engine.prepared as prepared_module
from pathpatch.data.pairs import PairDataset
from pathpatch.engine.evaluation import evaluate
from pathpatch.language.hypotheses import Hypothesis
from pathpatch.model import loading, sources
from pipeline.worker import Evaluate, Worker, WorkerConfig


def _shard(seed: int, first_id: int, n: int = 4, T: int = 6) -> PairDataset:
    gen = torch.Generator().manual_seed(seed)
    xr = torch.randint(0, 128, (n, T), generator=gen)
    xc = torch.randint(0, 128, (n, T), generator=gen)
    scored = torch.zeros(n, T, dtype=torch.bool)
    scored[:, 3:] = True
    return PairDataset(xr, xc, scored, example_ids=torch.arange(first_id, first_id + n))


def test_a_worker_hashes_its_weights_once_and_prepares_each_group_once(monkeypatch):
    hashed, compiled, planned = [], [], []
    digest = loading._digest
    monkeypatch.setattr(loading, "_digest", lambda params: (hashed.append(1), digest(params))[1])
    compile_ = Hypothesis.compile
    monkeypatch.setattr(Hypothesis, "compile",
                        lambda self, graph, *a: (compiled.append(self.name), compile_(self, graph, *a))[1])

    class CountingPlan(prepared_module.GroupPlan):
        def __init__(self, *args):
            planned.append(1)
            super().__init__(*args)

    monkeypatch.setattr(prepared_module, "GroupPlan", CountingPlan)
    config = WorkerConfig(model="attn-only-2l",
                          model_digest=sources.bundled_config("attn-only-2l")["digest"],
                          dtype="float32", metric="kl", threads=1, device="cpu", batch_size=None,
                          memory_budget=None, shard_cache=2, max_mixed_copies=4096)
    worker = Worker(config, node="here")
    assert len(hashed) == 1  # the file's check at load; the start's comparison reuses it
    group = (Hypothesis("prev", "a1.*[k] -> a0.*"), Hypothesis("no-a1.0", "~a1.0"))
    shards = {"s0": _shard(0, 0), "s1": _shard(1, 4)}
    tables = [worker.run(Evaluate(f"item-{sid}", sid, pickle.loads(pickle.dumps(group))), data)[0]
              for sid, data in shards.items()]
    assert sorted(compiled) == ["no-a1.0", "prev"] and len(planned) == 1
    model = loading.load_model("attn-only-2l")  # a fresh model: nothing prepared, same rows
    for data, table in zip(shards.values(), tables, strict=True):
        assert table.equals(evaluate(model, data, list(group)))
    assert len(hashed) == 2 and len(planned) == 2  # the fresh model planned once too
