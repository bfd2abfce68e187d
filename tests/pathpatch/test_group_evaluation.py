"""Stacked evaluation: equal to one-at-a-time, one pass per layer stage, idle stages skipped."""

import random

import torch

from pathpatch.engine.group_evaluation import GroupEvaluator
from pathpatch.engine.positions import PositionContext
from pathpatch.engine.runs import Runs
from pathpatch.engine.stage_plan import GroupPlan, Residual
from pathpatch.engine.workspace import Workspace
from pathpatch.language.hypotheses import Hypothesis
from pathpatch.language.hypothesis_families import edge_removal, node_removal
from pathpatch.model.graph import Graph
from tests.pathpatch import oracle
from tests.pathpatch.conftest import tiny_model
from tests.pathpatch.test_ablation import _ablation_hook_run, _outputs

B, T = 3, 5


def _tokens(model, gen):
    return (torch.randint(0, model.cfg.d_vocab, (B, T), generator=gen),
            torch.randint(0, model.cfg.d_vocab, (B, T), generator=gen))


def _setup(family="mlp", n_layers=3):
    model = tiny_model(family, n_layers=n_layers)
    gen = torch.Generator().manual_seed(3)
    xr, xc = _tokens(model, gen)
    masks = {"m1": torch.rand(B, T, generator=gen) < 0.5,
             "m2": (torch.rand(B, T, T, generator=gen) < 0.5).tril()}
    graph = Graph.from_model(model)
    return model, graph, Runs(model, xr, xc), PositionContext(masks, B, T, torch.device("cpu"))


def test_stacked_equals_one_at_a_time():
    model, graph, runs, positions = _setup()
    rng = random.Random(5)
    om = oracle.Model(model)
    hyps = [Hypothesis(f"r{i}", oracle.render(oracle.random_hypothesis(rng, om, ["m1"], ["m2"])))
            for i in range(30)]
    hyps += node_removal(graph)[:5] + edge_removal(graph)[::7]
    cgs = [h.compile(graph) for h in hyps]
    stacked = GroupEvaluator(model, GroupPlan(graph, cgs), runs, positions).logits()
    for h, cg, got in zip(hyps, cgs, stacked):
        alone = GroupEvaluator(model, GroupPlan(graph, [cg]), runs, positions).logits()[0]
        torch.testing.assert_close(got, alone, rtol=1e-12, atol=1e-12, msg=lambda m, h=h: f"{h.pattern}: {m}")


def test_logits_a_caller_keeps_are_not_written_over_by_the_next_group(monkeypatch):
    """Each group's logits come from the shared workspace: a buffer is handed out again only
    once the caller has dropped every view of the logits in it."""
    from pathpatch.engine import workspace

    monkeypatch.setattr(workspace, "LARGE_BYTES", 0)
    model, graph, runs, positions = _setup()
    ws = Workspace()
    plans = [GroupPlan(graph, [Hypothesis(n, p).compile(graph)])
             for n, p in (("a", "a0.* | a1.*"), ("b", "~m1"), ("c", "a2.0[q]"))]
    kept = GroupEvaluator(model, plans[0], runs, positions, workspace=ws).logits()[0]
    want = GroupEvaluator(model, plans[0], runs, positions).logits()[0]
    held = {b.untyped_storage().data_ptr() for b in ws._buffers}
    assert kept.untyped_storage().data_ptr() in held  # a workspace buffer: the check can fail
    for _ in range(3):  # later groups, each dropping its logits: their buffers are reused
        for plan in plans[1:]:
            GroupEvaluator(model, plan, runs, positions, workspace=ws).logits()
    assert torch.equal(kept, want)
    assert torch.equal(GroupEvaluator(model, plans[2], runs, positions, workspace=ws).logits()[0],
                       GroupEvaluator(model, plans[2], runs, positions).logits()[0])


def test_a_stacked_group_makes_one_pass_per_layer_stage():
    model, graph, runs, positions = _setup(n_layers=3)
    hyps = [Hypothesis(f"c{i}", f"circuit(*->*) & ~a0.{i % 2}") for i in range(10)]
    plan = GroupPlan(graph, [h.compile(graph) for h in hyps])
    evaluator = GroupEvaluator(model, plan, runs, positions)
    evaluator.logits()
    # MLP 0 (reads a0.*), heads and MLP of layers 1-2, and the output: 1 + 4 + 1, for 10 hypotheses
    stages = [(s.kind.value, s.layer) for s in plan.stages]
    assert evaluator.passes == plan.n_passes == 6, stages
    assert ("head", 0) not in stages  # layer 0 heads: all clean or counterfactual, read not run


def test_idle_layers_are_read_not_run():
    model, graph, runs, positions = _setup(n_layers=3)
    late = [Hypothesis("late edge", "remove(a2.0->out)"), Hypothesis("late node", "~m2")]
    evaluator = GroupEvaluator(model, GroupPlan(graph, [h.compile(graph) for h in late]), runs, positions)
    evaluator.logits()
    assert evaluator.passes == 1  # only the output stage: nothing upstream changes


def _circuit_hook_run(model, kept: set[str], xr, xc) -> torch.Tensor:
    """A circuit as TransformerLens hooks compute it, sharing nothing with the engine: one run on
    x_r in which every receiver's input gets, for each edge u -> v outside the circuit,
    a_u(x_c) - a_u(this run) (the hook-based edge ablation of `test_ablation`, whose ablation
    values here are each sender's output on x_c)."""
    _, cf_cache = model.run_with_cache(xc)
    return _ablation_hook_run(model, kept, xr, _outputs(model, lambda name: cf_cache[name]))


def test_dense_circuits_match_an_independent_hook_run():
    """Random half-edge circuits (every node mixed: fused products, carried partial inputs,
    previous-stage bases and head stages' shared products all in play) equal TransformerLens
    hooks applying the circuit rule."""
    from pathpatch.tools.engine_benchmarks import random_circuits

    model = tiny_model("mlp", n_layers=6, n_heads=4)
    graph = Graph.from_model(model)
    xr, xc = _tokens(model, torch.Generator().manual_seed(3))
    hyps = random_circuits(graph, 6, random.Random(1))
    plan = GroupPlan(graph, [h.compile(graph) for h in hyps])
    summary = plan.summary()
    assert summary.fused_products > 0
    assert summary.partial_inputs > 0  # the next stage's part, computed in the heads' product
    assert summary.previous_stage_bases > 0
    assert summary.shared_products > 0  # head stages' products, computing later stages' terms
    positions = PositionContext({}, B, T, torch.device("cpu"))
    got = GroupEvaluator(model, plan, Runs(model, xr, xc), positions).logits()
    clean, patched = model(xr), model(xc)
    for h, logits in zip(hyps, got):
        kept = set(h.pattern[len("circuit("):-1].split(", "))
        want = _circuit_hook_run(model, kept, xr, xc)
        assert not torch.allclose(want, clean) and not torch.allclose(want, patched)  # a real mix
        torch.testing.assert_close(logits, want, rtol=1e-10, atol=1e-10)
    # and the rule itself: keeping every edge is the clean run, keeping none the counterfactual
    every = {str(e) for e in graph.edges}
    torch.testing.assert_close(_circuit_hook_run(model, every, xr, xc), clean, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(_circuit_hook_run(model, set(), xr, xc), patched, rtol=1e-10, atol=1e-10)



def test_rows_of_the_clean_run_are_shared_whatever_else_each_hypothesis_builds():
    """Both removals leave a1.0's k and v reading the clean run: one pair of rows for the two,
    though the second builds one more input in that stage (a1.1's) and so reads the clean
    residual at another index of its own. Each equals TransformerLens hooks removing its edges."""
    model = tiny_model("attn-only", n_layers=2)
    graph = Graph.from_model(model)
    xr, xc = _tokens(model, torch.Generator().manual_seed(3))
    removed = [["in->a1.0.q"], ["in->a1.0.q", "a0.0->a1.1.q", "a0.0->a1.1.k", "a0.0->a1.1.v"]]
    hyps = [Hypothesis(f"r{i}", f"remove({', '.join(edges)})") for i, edges in enumerate(removed)]
    plan = GroupPlan(graph, [h.compile(graph) for h in hyps])
    stage = next(s for s in plan.stages if s.kind.value == "head" and s.layer == 1)
    assert [(m.n_inputs, m.cached) for m in stage.mixing.values()] == [(1, (Residual.CLEAN,)),
                                                                       (2, (Residual.CLEAN,))]
    assert stage.n_rows == 1 + 2 + 4 and plan.summary().shared_rows == 2  # not 3 + 6
    positions = PositionContext({}, B, T, torch.device("cpu"))
    got = GroupEvaluator(model, plan, Runs(model, xr, xc), positions).logits()
    every = {str(e) for e in graph.edges}
    for edges, logits in zip(removed, got, strict=True):
        torch.testing.assert_close(logits, _circuit_hook_run(model, every - set(edges), xr, xc),
                                   rtol=1e-10, atol=1e-10)
