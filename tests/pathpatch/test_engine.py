"""The engine against TransformerLens itself: trivial hypotheses, node patching, edge hooks."""

import pytest
import torch
from transformer_lens import patching

from pathpatch.engine.group_evaluation import GroupEvaluator, evaluate_logits
from pathpatch.engine.positions import PositionContext
from pathpatch.engine.runs import Runs
from pathpatch.engine.stage_plan import GroupPlan, Residual
from pathpatch.language.copies import CF, CLEAN
from pathpatch.language.hypotheses import Hypothesis
from pathpatch.language.hypothesis_families import edge_removal, node_removal
from pathpatch.model.graph import Graph
from tests.pathpatch.conftest import tiny_model

B, T = 3, 5


def _tokens(model, seed=0):
    gen = torch.Generator().manual_seed(seed)
    xr = torch.randint(0, model.cfg.d_vocab, (B, T), generator=gen)
    xc = torch.randint(0, model.cfg.d_vocab, (B, T), generator=gen)
    return xr, xc


def _engine(model, hypotheses, xr, xc, masks=None):
    graph = Graph.from_model(model)
    runs = Runs(model, xr, xc)
    positions = PositionContext(masks or {}, B, T, torch.device("cpu"))
    copy_graphs = [h.compile(graph) for h in hypotheses]
    return evaluate_logits(model, graph, copy_graphs, runs, positions), copy_graphs


def test_all_paths_is_clean_run_and_no_paths_is_counterfactual(family):
    model = tiny_model(family)
    xr, xc = _tokens(model)
    hyps = [
        Hypothesis("all", "all"), Hypothesis("gap", "..."), Hypothesis("every edge", "circuit(*->*)"),
        Hypothesis("union", "in -> out | ~(in -> out)"),
        Hypothesis("none", "none"), Hypothesis("not all", "~..."), Hypothesis("empty", "in -> out & a0.0"),
    ]
    outs, cgs = _engine(model, hyps, xr, xc)
    clean, cf = model(xr), model(xc)
    for h, cg, out in zip(hyps[:4], cgs[:4], outs[:4]):
        assert cg.root == CLEAN, h
        torch.testing.assert_close(out, clean)
    for h, cg, out in zip(hyps[4:], cgs[4:], outs[4:]):
        assert cg.root == CF, h
        torch.testing.assert_close(out, cf)
    assert not torch.allclose(clean, cf)


def test_mixed_computation_reproduces_clean_run(family):
    """x_c = x_r: the compiler cannot know the inputs are equal, so these hypotheses compute mixed
    copies (a dense circuit mixes every node), and each must still give G(x_r)."""
    model = tiny_model(family)
    xr, _ = _tokens(model)
    graph = Graph.from_model(model)
    half = ", ".join(str(e) for e in graph.edges[1::2])
    hyps = [Hypothesis("~a0.0", "~a0.0"), Hypothesis("half", f"circuit({half})"),
            Hypothesis("split by position", "~(a0.*[k]@prev -> ...)")]
    outs, cgs = _engine(model, hyps, xr, xr.clone())
    clean = model(xr)
    for h, cg, out in zip(hyps, cgs, outs, strict=True):
        assert cg.n_mixed > 0, h.name
        torch.testing.assert_close(out, clean, atol=1e-10, rtol=1e-10)


def _functional(model):
    gen = torch.Generator().manual_seed(7)
    R = torch.randn(B, T, model.cfg.d_vocab, generator=gen, dtype=torch.float64)
    return R, (lambda logits: (logits * R).sum())


def test_node_removal_matches_transformer_lens_patching(family):
    """'Node n removed' == TL patching n's output from the counterfactual run into the clean run."""
    model = tiny_model(family)
    xr, xc = _tokens(model)
    graph = Graph.from_model(model)
    _, cf_cache = model.run_with_cache(xc)
    R, metric = _functional(model)  # TL stores the scalar in float32: compare to 1e-6
    tl_heads = patching.get_act_patch_attn_head_out_all_pos(model, xr, cf_cache, metric)  # [layer, head]
    hyps = [h for h in node_removal(graph) if h.name.startswith("remove a")]
    outs, cgs = _engine(model, hyps, xr, xc)
    for h, out in zip(hyps, outs):
        node = graph.node(h.name.split()[-1])
        want = tl_heads[node.layer, node.head].item()
        assert (out * R).sum().item() == pytest.approx(want, rel=1e-6, abs=1e-6), h.name
    if graph.has_mlp:  # TL patches MLP outputs one position at a time
        tl_mlp = patching.get_act_patch_mlp_out(model, xr, cf_cache, metric)  # [layer, pos]
        hyps = [Hypothesis(f"m{l}@{p}", f"~m{l}@pos={p}") for l in range(graph.n_layers) for p in range(T)]
        outs, _ = _engine(model, hyps, xr, xc)
        for h, out in zip(hyps, outs):
            l, p = int(h.name[1]), int(h.name[-1])
            assert (out * R).sum().item() == pytest.approx(tl_mlp[l, p].item(), rel=1e-6, abs=1e-6)
    assert sum(cg.n_mixed for cg in cgs) > 0


def _edge_hook_run(model, edge, xr, xc, scale: float = 1.0, embed_alpha: float | None = None):
    """Clean run where only `edge.sender`'s term in the receiver channel's input comes from x_c
    (`scale` times that change: 1 is the removal, small values its first-order change).
    `embed_alpha`: the run's token embedding is x_c's + alpha (x_r's - x_c's) instead (EAP-IG's
    points), the change added still the one between the two real runs."""
    _, rc = model.run_with_cache(xr)
    _, cc = model.run_with_cache(xc)
    s = edge.sender

    def out_of(cache):
        if s.kind.value == "input":
            return cache["hook_embed"]
        if s.kind.value == "mlp":
            return cache[f"blocks.{s.layer}.hook_mlp_out"]
        return cache[f"blocks.{s.layer}.attn.hook_z"][:, :, s.head] @ model.blocks[s.layer].attn.W_O[s.head]

    if s.kind.value == "head" and (model.cfg.use_normalization_before_and_after
                                   or model.cfg.post_norm_only):
        # the head's term is its layer's normalized sum with only this head from x_c, minus the
        # clean one: TransformerLens's own hook_attn_out with hook_z patched for that head
        def patch(z, hook):
            z = z.clone()
            z[:, :, s.head] = cc[hook.name][:, :, s.head]
            return z

        out_name = f"blocks.{s.layer}.hook_attn_out"
        patched = {}
        model.run_with_hooks(xr, fwd_hooks=[
            (f"blocks.{s.layer}.attn.hook_z", patch),
            (out_name, lambda x, hook: patched.setdefault("out", x.clone()))])
        delta = patched["out"] - rc[out_name]
    else:
        delta = out_of(cc) - out_of(rc)  # [batch, pos, d_model]
    delta = scale * delta
    r = edge.receiver
    fired = []
    if r.kind.value == "head":
        name = f"blocks.{r.layer}.hook_{edge.channel.value}_input"

        def hook(x, hook):  # [batch, pos, head, d_model]
            fired.append(name)
            x = x.clone()
            x[:, :, r.head] += delta
            return x
    elif r.kind.value == "mlp":
        name = f"blocks.{r.layer}.hook_mlp_in"

        def hook(x, hook):
            fired.append(name)
            return x + delta
    else:
        name = f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"

        def hook(x, hook):
            fired.append(name)
            return x + delta

    model.set_use_split_qkv_input(True)
    grouped = (model.cfg.n_key_value_heads or model.cfg.n_heads) != model.cfg.n_heads
    if grouped:  # k/v input hooks per query head, not per kv head
        model.set_ungroup_grouped_query_attention(True)
    if not model.cfg.attn_only:
        model.set_use_hook_mlp_in(True)
    hooks = [(name, hook)]
    if embed_alpha is not None:
        emb_r, emb_c = rc["hook_embed"], cc["hook_embed"]
        hooks.insert(0, ("hook_embed", lambda x, hook: emb_c + embed_alpha * (emb_r - emb_c)))
    try:
        logits = model.run_with_hooks(xr, fwd_hooks=hooks)
    finally:
        model.set_use_split_qkv_input(False)
        if grouped:
            model.set_ungroup_grouped_query_attention(False)
        if not model.cfg.attn_only:
            model.set_use_hook_mlp_in(False)
    assert fired == [name], f"hook {name} did not fire"
    return logits


def test_single_edge_removal_matches_hook_run(family):
    model = tiny_model(family)
    xr, xc = _tokens(model)
    graph = Graph.from_model(model)
    hyps = edge_removal(graph)
    outs, cgs = _engine(model, hyps, xr, xc)
    for edge, h, out in zip(graph.edges, hyps, outs):
        want = _edge_hook_run(model, edge, xr, xc)
        torch.testing.assert_close(out, want, atol=1e-10, rtol=1e-10, msg=lambda m, h=h: f"{h.name}: {m}")
    # single-edge removals compute only what lies downstream of the edge
    for edge, cg in zip(graph.edges, cgs):
        assert all(c.node.order >= edge.receiver.order for c in cg.copies)


def test_a_groups_removals_into_one_head_project_its_clean_rows_once(family):
    """Every removal of an edge into a1.0 leaves a1.0's other two channels reading the clean
    run: that input is the clean residual itself, read from the cache, and the removals into
    one channel project its two rows once for all of them. The results are still each
    removal's own hook run."""
    model = tiny_model(family)
    xr, xc = _tokens(model)
    graph = Graph.from_model(model)
    edges = [e for e in graph.edges if e.receiver.name == "a1.0"]
    hyps = [h for h in edge_removal(graph) if h.target.partition("->")[2].startswith("a1.0.")]
    assert len(hyps) == len(edges) > 6  # at least 3 senders per channel
    plan = GroupPlan(graph, [h.compile(graph) for h in hyps])
    stage = next(s for s in plan.stages if s.kind.value == "head" and s.layer == 1)
    assert all(m.cached == (Residual.CLEAN,) and m.n_inputs == 1 for m in stage.mixing.values())
    # one row per removal (its cut channel), and per channel cut the other two of the clean
    # run: 6 rows for the group, where each removal projected its own two
    assert stage.n_rows == len(hyps) + 6
    summary = plan.summary()
    assert summary.shared_rows == 6 and summary.cached_inputs == len(hyps)
    assert summary.projected_rows == len(hyps) + 6  # no later head stage: layer 1 is the last
    outs = GroupEvaluator(model, plan, Runs(model, xr, xc), PositionContext({}, B, T, torch.device("cpu"))
                          ).logits()
    for edge, h, out in zip(edges, hyps, outs, strict=True):
        assert h.target == str(edge)
        torch.testing.assert_close(out, _edge_hook_run(model, edge, xr, xc), atol=1e-10, rtol=1e-10,
                                   msg=lambda m, h=h: f"{h.name}: {m}")


def test_circuit_has_one_mixed_copy_per_node():
    model = tiny_model("mlp")
    graph = Graph.from_model(model)
    kept = [e for i, e in enumerate(graph.edges) if i % 2 == 0]
    cg = Hypothesis("half", "circuit(" + ", ".join(map(str, kept)) + ")").compile(graph)
    nodes = [c.node.name for c in cg.copies]
    assert len(nodes) == len(set(nodes)) and len(nodes) >= 3


def test_evaluate_keeps_no_reference_to_the_model():
    """Nothing the engine keeps (adapters, folded weights) outlives the call: a sweep process
    that loads model after model must not hold them all."""
    import gc
    import weakref

    from pathpatch.data.pairs import PairDataset
    from pathpatch.engine.evaluation import evaluate

    model = tiny_model("llama")
    x = torch.randint(0, model.cfg.d_vocab, (2, 5), generator=torch.Generator().manual_seed(0))
    evaluate(model, PairDataset(x, x.flip(0), torch.ones(2, 5, dtype=torch.bool)),
             [Hypothesis("h", "~a1.0")])
    alive = weakref.ref(model)
    del model
    gc.collect()
    assert alive() is None


def test_both_cached_runs_from_one_forward_are_each_run_s_own(family):
    """`Runs` computes x_r and x_c in one stacked forward: each half is exactly that run's plain
    forward, logits and every cached activation, and x_r, x_c of different shapes are refused."""
    model = tiny_model(family)
    xr, xc = _tokens(model)
    runs = Runs(model, xr, xc)
    for run, tokens in (("r", xr), ("c", xc)):
        logits, cache = model.run_with_cache(tokens)
        torch.testing.assert_close(runs.logits[run], logits, rtol=1e-12, atol=1e-12)
        for name, value in runs.cache[run].items():
            torch.testing.assert_close(value, cache[name], rtol=1e-12, atol=1e-12, msg=name)
    with pytest.raises(ValueError, match="one shape"):
        Runs(model, xr, xc[:, :-1])
