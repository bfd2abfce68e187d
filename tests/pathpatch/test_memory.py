"""The memory budget binds: peak live tensor memory of evaluate() stays under it.

Measured with torch's profiler (every CPU tensor allocation and free, in time order), so the
figure is the engine's own tensors, not the allocator's retained pages.
"""

import random

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from pathpatch.data.pairs import PairDataset
from pathpatch.engine import workspace
from pathpatch.engine.evaluation import evaluate
from pathpatch.model.graph import Graph
from pathpatch.tools.engine_benchmarks import random_circuits
from tests.pathpatch.conftest import tiny_model


def _peak_tensor_bytes(fn) -> int:
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]")
    live = peak = 0
    for _, delta in events:
        live += delta
        peak = max(peak, live)
    return peak


@pytest.mark.slow
@pytest.mark.parametrize("pooled", [False, True], ids=["", "every-block-pooled"])
@pytest.mark.parametrize("family", ["mlp", "llama", "neox", "window", "gemma"])  # GPT-2, Llama,
def test_peak_memory_stays_under_the_budget_where_it_binds(family, pooled, monkeypatch):
    # Pythia, Mistral, Gemma-2; pooled: the workspace keeps even these small blocks, as it keeps
    # a large model's, and must not hold more than the budget counts
    if pooled:
        monkeypatch.setattr(workspace, "LARGE_BYTES", 0)
    model = tiny_model(family, d_model=32, d_vocab=4000, dtype=torch.float32)
    graph = Graph.from_model(model)
    gen = torch.Generator().manual_seed(0)
    n, T = 48, 16
    data = PairDataset(torch.randint(0, 4000, (n, T), generator=gen),
                       torch.randint(0, 4000, (n, T), generator=gen), torch.ones(n, T, dtype=torch.bool))
    hyps = random_circuits(graph, 6, random.Random(0))
    budget = 8 * 2**20
    unbounded = _peak_tensor_bytes(lambda: evaluate(model, data, hyps))
    bounded_rows = []
    bounded = _peak_tensor_bytes(
        lambda: bounded_rows.append(evaluate(model, data, hyps, memory_budget=budget)))
    print(f"peak tensor bytes: unbounded {unbounded}, budget {budget}, bounded {bounded}")
    assert unbounded > 2 * budget, "the budget would not bind on this model"
    assert bounded <= budget, f"peak {bounded} bytes over the budget {budget}"
    full = evaluate(model, data, hyps)
    torch.testing.assert_close(torch.tensor(bounded_rows[0]["ue"].to_pylist()),
                               torch.tensor(full["ue"].to_pylist()), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("family", ["attn-only", "mlp", "llama", "neox", "gemma"])
def test_the_footprint_counts_what_the_cached_runs_and_their_bank_hold(family):
    """`Adapter.footprint`, which the budget counts in, is exactly the bytes `Runs` holds per
    token: both runs' hooks and logits, the heads' sums where a norm follows attention, the
    counterfactual deviation bank (attention-only, parallel and post-normed models differ)."""
    from pathpatch.engine.runs import Runs
    from pathpatch.model.adapter import Adapter
    from pathpatch.model.graph import NodeKind

    model = tiny_model(family, n_heads=3)
    batch, T = 2, 5
    xr, xc = torch.randint(0, 7, (2, batch, T), generator=torch.Generator().manual_seed(0))
    runs = Runs(model, xr, xc)
    runs.cf_bank()
    arch = Adapter.of(model)
    if arch.heads_normed:
        for layer in range(arch.n_layers):
            for run in "rc":
                runs.residual_at(NodeKind.HEADS_SUM, layer, run)
    footprint = arch.footprint(T)
    assert runs.nbytes() == batch * T * (2 * footprint.cached_run + footprint.bank) * footprint.itemsize
