"""Stacked evaluation: equal to one-at-a-time, one pass per layer stage, idle stages skipped."""

import random

import torch

from pathpatch.graph import Graph
from pathpatch.hypotheses import Hypothesis, edge_removal, node_removal
from pathpatch.positions import PositionContext
from pathpatch.runs import Runs
from pathpatch.stacking import GroupEvaluator, GroupPlan
from tests.pathpatch import oracle
from tests.pathpatch.conftest import tiny_model

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


def test_dense_circuits_match_an_independent_hook_run():
    """Random half-edge circuits (every node mixed: fused products, carried partial inputs and
    previous-stage bases all in play) equal the benchmark's hook baseline, written separately."""
    from pathpatch.benchmark import hook_baseline, random_circuits

    model = tiny_model("mlp", n_layers=3, n_heads=4)
    graph = Graph.from_model(model)
    xr, xc = _tokens(model, torch.Generator().manual_seed(3))
    hyps = random_circuits(graph, 6, random.Random(1))
    plan = GroupPlan(graph, [h.compile(graph) for h in hyps])
    assert any(m.in_place for s in plan.stages for m in s.mixing.values())  # fused products
    assert any(len(r) == 0 for s in plan.stages for r in _readers(s).values())  # carried inputs
    positions = PositionContext({}, B, T, torch.device("cpu"))
    got = GroupEvaluator(model, plan, Runs(model, xr, xc), positions).logits()
    _, cf_cache = model.run_with_cache(xc)
    model.set_use_split_qkv_input(True)
    model.set_use_hook_mlp_in(True)
    try:
        for h, logits in zip(hyps, got):
            kept = set(h.pattern[len("circuit("):-1].split(", "))
            want = hook_baseline(model, graph, kept, xr, cf_cache)
            torch.testing.assert_close(logits, want, rtol=1e-10, atol=1e-10)
    finally:
        model.set_use_split_qkv_input(False)
        model.set_use_hook_mlp_in(False)


def _readers(stage) -> dict[int, list[int]]:
    out = {i: [] for i in range(stage.n_inputs)}
    for r, i in enumerate(stage.row_input):
        out[i].append(r)
    return out
