"""The notebook API: evaluate() rows and summaries, validation errors, explain()."""

import pytest
import torch

from pathpatch import summarize
from pathpatch.data.pairs import PairDataset
from pathpatch.engine.evaluation import ModelState, check, evaluate
from pathpatch.engine.metrics import Metric, get_metric
from pathpatch.errors import PathPatchError
from pathpatch.language.hypotheses import Hypothesis
from pathpatch.language.hypothesis_families import load_hypotheses
from pathpatch.model.graph import Graph
from pathpatch.tools.explain import explain
from tests.pathpatch.conftest import tiny_model


def _dataset(model, n=6, T=5, seed=0, first_id=100):
    gen = torch.Generator().manual_seed(seed)
    xr = torch.randint(0, model.cfg.d_vocab, (n, T), generator=gen)
    xc = torch.randint(0, model.cfg.d_vocab, (n, T), generator=gen)
    scored = torch.zeros(n, T, dtype=torch.bool)
    scored[:, 2:] = True
    masks = {"prev": torch.ones(n, T, T, dtype=torch.bool).tril(-1).triu(-1)}
    return PairDataset(xr, xc, scored, masks, example_ids=torch.arange(first_id, first_id + n))


@pytest.mark.parametrize("metric", ["kl", "loss"])
def test_evaluate_rows_and_trivial_hypotheses(metric):
    model = tiny_model("mlp")
    data = _dataset(model)
    if metric == "loss":  # |Δ loss| needs a next token: do not score the last position
        scored = data.scored.clone().index_fill_(1, torch.tensor([4]), False)
        data = PairDataset(data.reference, data.counterfactual, scored, data.masks,
                           example_ids=data.example_ids)
    hyps = [Hypothesis("all", "all"), Hypothesis("none", "none"), Hypothesis("heads", "a0.* | a1.*")]
    rows = evaluate(model, data, hyps, metric, batch_size=4)
    assert rows.column_names[:4] == ["hypothesis", "example", "ue", "te"]
    assert rows.num_rows == 3 * len(data)
    d = rows.to_pydict()
    assert d["example"][:6] == list(range(100, 106))
    for h, ue, te in zip(d["hypothesis"], d["ue"], d["te"]):
        assert te > 0
        if h == "all":
            assert ue == 0.0
        elif h == "none":
            assert ue == pytest.approx(te, rel=1e-12)
        else:
            assert 0 < ue
    summary = summarize(rows).to_pydict()
    pe = dict(zip(summary["hypothesis"], summary["proportion_explained"]))
    assert pe["all"] == 1.0 and abs(pe["none"]) < 1e-12
    # batching does not change results
    again = evaluate(model, data, hyps, metric, batch_size=6)
    assert again.equals(rows) or torch.allclose(torch.tensor(again["ue"].to_pylist()), torch.tensor(d["ue"]))


def test_the_metric_reads_the_clean_run_once_per_batch():
    """Every hypothesis of a batch (and the total effect) is scored against one clean side."""
    model = tiny_model("mlp")
    data = _dataset(model, n=10)
    kl = get_metric("kl")
    calls = []

    def counting(clean, batch):
        calls.append(len(batch))
        return kl.against_clean(clean, batch)

    hyps = [Hypothesis("all", "all"), Hypothesis("heads", "a0.* | a1.*"), Hypothesis("m", "m0 | m1")]
    rows = evaluate(model, data, hyps, Metric("kl", counting), batch_size=4)
    assert calls == [4, 4, 2]
    assert rows.equals(evaluate(model, data, hyps, "kl", batch_size=4))
    per_call = Metric.from_fn("kl", kl.per_example)  # no split: both logits on every call
    assert evaluate(model, data, hyps, per_call, batch_size=4).equals(rows)


def test_evaluate_errors_name_the_problem():
    model = tiny_model("attn-only")
    data = _dataset(model)
    with pytest.raises(PathPatchError, match="unique"):
        evaluate(model, data, [Hypothesis("a", "all"), Hypothesis("a", "none")])
    with pytest.raises(PathPatchError, match="@mask=nope.*prev"):
        evaluate(model, data, [Hypothesis("m", "a1.0[k]@mask=nope")])
    with pytest.raises(PathPatchError, match="'a7.2' matches no node.*layers 0-1"):
        evaluate(model, data, [Hypothesis("bad", "a7.2")])
    with pytest.raises(PathPatchError, match="'x'.*max_mixed_copies = 1"):
        evaluate(model, data, [Hypothesis("x", "a0.0 -> a1.0[k]@mask=prev")], max_mixed_copies=1)
    with pytest.raises(PathPatchError, match=r"found end of pattern at column 8"):
        _ = Hypothesis("p", "a0.* ->").ast
    caret = r"unknown channel 'x'.*column 14\n  a0.\* -> a1.0\[x\]\n {15}\^"
    with pytest.raises(PathPatchError, match=caret):
        _ = Hypothesis("p", "a0.* -> a1.0[x]").ast
    with pytest.raises(PathPatchError, match="memory_budget"):
        evaluate(model, data, [Hypothesis("a", "all")], memory_budget=10)


def test_memory_budget_shrinks_batches_not_results():
    model = tiny_model("attn-only")
    data = _dataset(model, n=8)
    hyps = [Hypothesis("k", "a1.*[k]@mask=prev")]
    small = evaluate(model, data, hyps, memory_budget=40_000)
    full = evaluate(model, data, hyps)
    assert torch.allclose(torch.tensor(small["ue"].to_pylist()), torch.tensor(full["ue"].to_pylist()),
                          rtol=1e-12, atol=0)


def test_check_reports_copies_and_cost():
    model = tiny_model("mlp")
    costs = check(model, [Hypothesis("one", "~a0.0"), Hypothesis("circ", "remove(in->out)")], seq_len=5)
    assert [c.name for c in costs] == ["one", "circ"]
    assert costs[0].mixed_copies >= 2 and costs[1].mixed_copies == 1
    assert all(c.est_cost > 0 for c in costs)


def test_explain_counts_paths_by_dynamic_programming():
    graph = Graph(n_layers=2, n_heads=2, has_mlp=False)
    # one position: q/k/v all read position 0, so (1 + 3*2)^2 = 49 paths
    assert explain(graph, Hypothesis("all", "all"), seq_len=1).n_paths == 49
    assert explain(graph, Hypothesis("direct", "in -> out"), seq_len=3).n_paths == 3
    e = explain(graph, Hypothesis("v", "in -> a1.0[v] -> out"), seq_len=3)
    assert e.n_paths == 1 + 2 + 3  # sources j <= i for each output position i
    gpt2 = Graph(n_layers=12, n_heads=12, has_mlp=True)
    assert explain(gpt2, Hypothesis("all", "all"), seq_len=1).n_paths == gpt2.n_paths()
    assert "paths in P" in str(e)


def test_hypotheses_from_toml_tables():
    graph = Graph(n_layers=2, n_heads=2, has_mlp=True)
    hyps = load_hypotheses(
        [{"name": "direct", "pattern": "in -> out"}, {"family": "node_removal"},
         {"family": "induction_initial", "prev_heads": ["a0.0"], "induction_heads": ["a1.*"]}],
        graph,
    )
    names = [h.name for h in hyps]
    assert names[0] == "direct" and "remove a1.1" in names and "remove m0" in names
    assert "initial (V | Q | K)" in names
    with pytest.raises(PathPatchError, match=r"hypotheses\[0\].*keys"):
        load_hypotheses([{"name": "x", "patern": "all"}], graph)
    with pytest.raises(PathPatchError, match="unknown family 'nodes'"):
        load_hypotheses([{"family": "nodes"}], graph)
    with pytest.raises(PathPatchError, match="duplicate hypothesis name"):
        load_hypotheses([{"name": "x", "pattern": "all"}, {"name": "x", "pattern": "none"}], graph)


def test_runs_cache_reuses_both_runs_and_changes_nothing(monkeypatch):
    import pathpatch.engine.evaluation as engine

    model = tiny_model("attn-only")
    data = _dataset(model)
    built = []

    cache: dict = {}

    class CountingRuns(engine.Runs):
        def __init__(self, *args):
            built.append(len(cache))  # runs cached while these are built
            super().__init__(*args)

    monkeypatch.setattr(engine, "Runs", CountingRuns)
    first = evaluate(model, data, [Hypothesis("a", "a0.*")], runs_cache=cache)
    second = evaluate(model, data, [Hypothesis("b", "~a1.0")], runs_cache=cache)
    assert len(built) == 1 and len(cache) == 1
    assert first.equals(evaluate(model, data, [Hypothesis("a", "a0.*")]))
    assert second.equals(evaluate(model, data, [Hypothesis("b", "~a1.0")]))
    other = _dataset(model, seed=1)  # another shard replaces the cached one
    evaluate(model, other, [Hypothesis("a", "a0.*")], runs_cache=cache)
    assert len(cache) == 1 and len(built) == 4
    assert built[-1] == 0  # the old shard's runs were freed first: one batch's runs at a time


def test_a_kept_model_state_changes_no_result_and_reuses_its_buffers(monkeypatch):
    from pathpatch.engine import workspace

    monkeypatch.setattr(workspace, "LARGE_BYTES", 0)  # the tiny model's buffers go through it
    model = tiny_model("mlp")
    data = _dataset(model)
    state = ModelState(model)
    hyps = [Hypothesis("heads", "a0.* | a1.*"), Hypothesis("k", "a1.*[k]@mask=prev"),
            Hypothesis("mlp", "~m0")]
    budget = 400_000  # several groups and batches: each reuses the buffers before it
    fresh = evaluate(model, data, hyps, batch_size=4, memory_budget=budget)
    assert evaluate(model, data, hyps, batch_size=4, memory_budget=budget, state=state).equals(fresh)
    for _ in range(2):  # buffers of a few sizes: what it holds settles within two calls
        assert evaluate(model, data, hyps, batch_size=4, memory_budget=budget,
                        state=state).equals(fresh)
    held = state.workspace.nbytes
    assert held > 0
    assert evaluate(model, data, hyps, batch_size=4, memory_budget=budget, state=state).equals(fresh)
    assert state.workspace.nbytes == held  # then a call touches no new memory
    other = evaluate(model, data, [Hypothesis("b", "~a1.0")], state=state)
    assert other.equals(evaluate(model, data, [Hypothesis("b", "~a1.0")]))
    with pytest.raises(PathPatchError, match="another model's ModelState"):
        evaluate(tiny_model("attn-only"), data, hyps, state=state)


def test_with_a_runs_cache_a_large_shard_is_one_batch(monkeypatch):
    """More than 64 examples: one batch when a cache can keep its runs, so the next call
    reuses them; without a cache, batches of at most 64. Same numbers either way."""
    import pathpatch.engine.evaluation as engine

    model = tiny_model("attn-only")
    data = _dataset(model, n=100)
    built = []

    class CountingRuns(engine.Runs):
        def __init__(self, *args):
            built.append(args[1].shape[0])  # examples in the batch
            super().__init__(*args)

    monkeypatch.setattr(engine, "Runs", CountingRuns)
    cache: dict = {}
    hyps = [[Hypothesis("a", "a0.*")], [Hypothesis("b", "~a1.0")]]
    cached = [evaluate(model, data, h, runs_cache=cache) for h in hyps]
    assert built == [100]
    built.clear()
    plain = [evaluate(model, data, h) for h in hyps]
    assert built == [64, 36, 64, 36]
    assert all(a.equals(b) for a, b in zip(cached, plain))


@pytest.mark.parametrize("name", ["kl", "loss", "logit_diff"])
def test_built_in_metrics_unembed_only_the_scored_positions(name, monkeypatch):
    """A built-in reads logits at scored positions only, so the engine unembeds just those; the
    results equal those of the same metric as a user callable (complete logits) to 1e-12."""
    import dataclasses

    import pathpatch.engine.evaluation
    from pathpatch.engine.group_evaluation import GroupEvaluator

    model = tiny_model("mlp")
    data = _dataset(model)
    scored = torch.zeros_like(data.scored)
    scored[:, 2:4] = True  # not the last position: loss has no target there
    data = dataclasses.replace(data, scored=scored, answer=data.reference[:, 0],
                               wrong_answer=(data.reference[:, 0] + 1) % 7)
    builtin = get_metric(name)
    assert builtin.scored_only
    as_user = dataclasses.replace(builtin, scored_only=False)
    reads = []

    class Recording(GroupEvaluator):
        def logits(self):
            out = super().logits()
            reads.append(self.read)
            return out

    monkeypatch.setattr(pathpatch.engine.evaluation, "GroupEvaluator", Recording)
    hyps = [Hypothesis("~a0.0", "~a0.0"), Hypothesis("half", "in -> a1.*[v] -> out | ~m1")]
    fast = evaluate(model, data, hyps, builtin)
    full = evaluate(model, data, hyps, as_user)
    assert reads[0] is not None and bool(reads[0].any()) and not bool(reads[0].all())
    assert reads[-1] is None
    for column in ("ue", "te"):
        a, b = fast.column(column).to_numpy(), full.column(column).to_numpy()
        assert abs(a - b).max() <= 1e-12 * max(1.0, abs(b).max())
    assert fast.column("ue").to_numpy().max() > 0  # a real patch
