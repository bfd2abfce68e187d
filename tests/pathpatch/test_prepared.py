"""Prepare once, evaluate many: what is compiled, planned and checked once per process, counted."""

import copy
import gc
import pickle
import weakref

import pytest
import torch

import pathpatch.engine.prepared as prepared_module
import pathpatch.model.support as support_module
from pathpatch.data.pairs import PairDataset
from pathpatch.engine.evaluation import ModelState, check, evaluate
from pathpatch.engine.metrics import Metric, get_metric
from pathpatch.engine.prepared import Prepared
from pathpatch.errors import PathPatchError
from pathpatch.language.hypotheses import Hypothesis, StructuralHypothesis
from pathpatch.language.hypothesis_families import edge_removal
from pathpatch.model import loading, sources
from pathpatch.model.adapter import Adapter
from pathpatch.model.graph import Graph
from tests.pathpatch.conftest import tiny_model
from tests.pathpatch.test_evaluate import _dataset

HYPOTHESES = [Hypothesis("heads", "a0.* | a1.*"), Hypothesis("k", "a1.*[k]@mask=prev"),
              Hypothesis("mlp", "~m0")]




@pytest.fixture
def counted(monkeypatch):
    """Counts of hypotheses compiled (by their own `compile`) and group plans built."""
    counts = {"compile": 0, "plan": 0}
    for cls in (Hypothesis, StructuralHypothesis):
        original = cls.compile

        def compile_(self, graph, *args, _original=original, **kwargs):
            counts["compile"] += 1
            return _original(self, graph, *args, **kwargs)

        monkeypatch.setattr(cls, "compile", compile_)

    class CountingPlan(prepared_module.GroupPlan):
        def __init__(self, *args):
            counts["plan"] += 1
            super().__init__(*args)

    monkeypatch.setattr(prepared_module, "GroupPlan", CountingPlan)
    return counts


def test_two_items_of_one_group_compile_and_plan_once_with_the_same_rows(counted):
    """A worker's items: the same group on two shards, its hypotheses shipped anew with each."""
    model = tiny_model("mlp")
    state = ModelState(model)
    shards = [_dataset(model, seed=0), _dataset(model, seed=1, first_id=200)]
    budget = 100_000  # a group per hypothesis, two batches per shard
    tables = [evaluate(model, shard, pickle.loads(pickle.dumps(HYPOTHESES)), batch_size=3,
                       memory_budget=budget, state=state, runs_cache={}) for shard in shards]
    assert counted == {"compile": 3, "plan": 3}
    assert state.prepared.compiles == 3 and state.prepared.plans_built == 3
    fresh = copy.deepcopy(model)  # another model: nothing prepared for it
    for shard, table in zip(shards, tables, strict=True):
        assert table.equals(evaluate(fresh, shard, HYPOTHESES, batch_size=3,
                                     memory_budget=budget))  # bitwise the same rows
    assert counted == {"compile": 6, "plan": 6}
    # a group made of other hypotheses is planned anew, from compilations already kept
    evaluate(model, shards[0], HYPOTHESES[:2], state=state)
    assert counted == {"compile": 6, "plan": 7}


def test_evaluate_without_a_kept_state_still_prepares_once_per_model(counted):
    model = tiny_model("attn-only")
    data = _dataset(model)
    hyps = [Hypothesis("a", "a0.*"), Hypothesis("b", "~a1.0")]
    first = evaluate(model, data, hyps)
    assert evaluate(model, data, hyps).equals(first)
    assert counted == {"compile": 2, "plan": 1}
    assert ModelState(model).prepared is Prepared.of(model)


def test_check_on_the_driver_then_evaluate_in_its_process_compile_each_hypothesis_once(counted):
    """The in-process backend: `check` in resolve, then the worker's items, one model object."""
    model = tiny_model("mlp")
    data = _dataset(model)
    costs = check(model, HYPOTHESES, dataset=data)
    assert counted["compile"] == 3
    assert check(model, HYPOTHESES, dataset=data) == costs  # asked again: nothing compiled
    evaluate(model, data, HYPOTHESES, state=ModelState(model))
    assert counted == {"compile": 3, "plan": 1}


def test_a_family_sharing_its_cost_is_compiled_once_per_cost_by_check(counted):
    model = tiny_model("mlp")
    graph = Graph.from_model(model)
    members = edge_removal(graph)
    costs = check(model, members, seq_len=5)
    receivers = {m.shared_cost(graph) for m in members}
    assert counted["compile"] == len(receivers) < len(members)
    assert len({(c.mixed_copies, c.est_cost) for c in costs}) <= len(receivers)


def test_the_kept_compilations_are_bounded_least_recently_used_out(counted):
    model = tiny_model("mlp")
    graph = Graph.from_model(model)
    # single-edge removals into one receiver: copy graphs of one size
    into_out = ("remove_edge", "output", None, "resid")
    hyps = [h for h in edge_removal(graph) if h.shared_cost(graph) == into_out][:4]
    sizes = {Prepared().compile(graph, h, 4096).nbytes for h in hyps}
    assert len(hyps) == 4 and len(sizes) == 1
    one = sizes.pop()
    store = Prepared(max_bytes=2 * one)  # room for two of these
    for h in hyps:
        store.compile(graph, h, 4096)
    assert store._compiled.weight <= 2 * one and len(store._compiled) <= 2
    before = counted["compile"]
    store.compile(graph, hyps[-1], 4096)  # the most recent is kept
    assert counted["compile"] == before
    store.compile(graph, hyps[0], 4096)  # the oldest was dropped: compiled again
    assert counted["compile"] == before + 1
    huge = Prepared(max_bytes=1)  # an entry over the bound stays while it is the newest
    huge.compile(graph, hyps[0], 4096)
    assert len(huge._compiled) == 1


def test_over_the_copy_bound_is_refused_whether_or_not_it_was_compiled_before():
    model = tiny_model("attn-only")
    data = _dataset(model)
    h = Hypothesis("x", "a0.0 -> a1.0[k]@mask=prev")
    evaluate(model, data, [h])
    with pytest.raises(PathPatchError, match="'x'.*max_mixed_copies = 1"):
        evaluate(model, data, [h], max_mixed_copies=1)


def test_the_metric_checks_the_dataset_once_per_call_and_reads_the_batch_once(monkeypatch):
    model = tiny_model("mlp")
    data = _dataset(model, n=10)
    checks = []
    kl = get_metric("kl")
    counting = Metric("kl", kl.against_clean, check=lambda d: checks.append(len(d)))
    rows = evaluate(model, data, HYPOTHESES, counting, batch_size=4)  # three batches
    assert checks == [10]
    assert rows.equals(evaluate(model, data, HYPOTHESES, "kl", batch_size=4))

    import pathpatch.engine.metrics as metrics

    logit_diff = get_metric("logit_diff")
    reads = []

    def value_of(logits, batch):
        reads.append(len(batch))
        return metrics._logit_diff_of(logits, batch)

    counting = Metric("logit_diff", logit_diff.against_clean, logit_diff.check, True,
                      logit_diff.value, value_of)
    answers = PairDataset(data.reference, data.counterfactual, data.scored, data.masks,
                          answer=torch.zeros(10, dtype=torch.long),
                          wrong_answer=torch.ones(10, dtype=torch.long))
    rows = evaluate(model, answers, HYPOTHESES, counting, batch_size=4)
    assert reads == [4, 4, 2]  # once per batch, not per hypothesis and run
    assert rows.equals(evaluate(model, answers, HYPOTHESES, "logit_diff", batch_size=4))


def test_the_model_is_wrapped_and_checked_once(monkeypatch):
    checks = []
    original = support_module.check_supported
    monkeypatch.setattr(support_module, "check_supported",
                        lambda cfg: (checks.append(cfg), original(cfg)))
    model = tiny_model("mlp")
    data = _dataset(model, n=10)
    arch = Adapter.of(model)
    evaluate(model, data, HYPOTHESES, batch_size=4)
    evaluate(model, data, HYPOTHESES[:1], batch_size=4)
    check(model, HYPOTHESES, seq_len=5)
    assert len(checks) == 1
    assert Adapter.of(model) is arch and Graph.from_model(model) is arch.graph
    # the adapter reads weights, dtype and device at each call: still valid after `to`
    model.to(torch.float32)
    assert Adapter.of(model) is arch and arch.footprint(5).itemsize == 4
    assert evaluate(model, data, HYPOTHESES).equals(
        evaluate(copy.deepcopy(model), data, HYPOTHESES))
    # another config is another adapter, checked again
    model.cfg = model.cfg.replace(n_ctx=12)
    assert Adapter.of(model) is not arch and Adapter.of(model).n_ctx == 12
    Graph.from_model(model)
    assert len(checks) == 2


def test_hooks_attached_after_the_graph_was_made_are_still_refused():
    model = tiny_model("attn-only")
    data = _dataset(model)
    evaluate(model, data, HYPOTHESES[:1])
    model.blocks[0].attn.hook_z.add_hook(lambda z, hook: z * 0, is_permanent=True)
    with pytest.raises(PathPatchError, match=r"forward hooks attached at blocks\.0\.attn\.hook_z"):
        evaluate(model, data, HYPOTHESES[:1])
    model.reset_hooks(including_permanent=True)
    evaluate(model, data, HYPOTHESES[:1])


def test_what_is_kept_for_a_model_goes_with_it():
    gc.collect()
    kept = len(prepared_module._BY_MODEL)
    model = tiny_model("attn-only")
    evaluate(model, _dataset(model), HYPOTHESES[:1])
    loading.model_digest(model)
    assert len(prepared_module._BY_MODEL) == kept + 1 and model in loading._DIGESTS
    gone = weakref.ref(model)
    del model
    gc.collect()  # the model and its adapter are one cycle
    assert gone() is None
    assert len(prepared_module._BY_MODEL) == kept


def test_the_weights_digest_is_computed_once_per_load_and_again_after_a_change(monkeypatch):
    hashed = []
    original = loading._digest
    monkeypatch.setattr(loading, "_digest", lambda params: (hashed.append(1), original(params))[1])
    model = loading.load_model("attn-only-2l")  # the file's digest, checked: the model's own
    assert len(hashed) == 1
    digest = loading.model_digest(model)
    assert loading.model_digest(model) == digest == sources.bundled_config("attn-only-2l")["digest"]
    assert len(hashed) == 1
    with torch.no_grad():
        model.blocks[0].attn.W_Q.add_(1.0)  # in place: the version counter moves
    changed = loading.model_digest(model)
    assert changed != digest and len(hashed) == 2
    model.to(torch.float64)
    assert loading.model_digest(model) not in (digest, changed) and len(hashed) == 3
    assert loading.model_digest(model) and len(hashed) == 3


def test_a_round_trip_through_another_dtype_is_hashed_anew():
    """bfloat16 and back rounds the weights; the new float32 storage may reuse the old one's
    address (it did for this shape with glibc's allocator), so only the storage's identity
    tells the kept digest is stale."""
    torch.manual_seed(0)
    model = torch.nn.Linear(2048, 1, bias=False)
    before = loading.model_digest(model)
    model.to(torch.bfloat16).to(torch.float32)
    assert loading.model_digest(model) == loading._digest(dict(model.named_parameters())) != before
