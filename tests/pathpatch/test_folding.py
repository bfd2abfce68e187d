"""LayerNorm folded into q/k/v, equal rows built once, residuals carried between stages."""

import random

import pytest
import torch

from pathpatch.engine.evaluation import compile_all
from pathpatch.engine.folding import FoldedWeights
from pathpatch.engine.group_evaluation import GroupEvaluator
from pathpatch.engine.positions import PositionContext
from pathpatch.engine.runs import Runs
from pathpatch.engine.stage_plan import GroupPlan
from pathpatch.language.hypotheses import Hypothesis
from pathpatch.model.adapter import Adapter
from pathpatch.model.config import ModelConfig
from pathpatch.model.graph import Graph
from pathpatch.model.transformer import Transformer
from pathpatch.tools.engine_benchmarks import hook_baseline
from tests.pathpatch.conftest import tiny_model


def _random_model(normalization_type, dtype=torch.float64, attn_only=True, seed=0, act_fn="gelu"):
    cfg = ModelConfig(
        n_layers=2, n_heads=2, d_model=8, d_head=4, n_ctx=16, d_vocab=7, attn_only=attn_only,
        d_mlp=None if attn_only else 12, act_fn=None if attn_only else act_fn,
        normalization_type=normalization_type, dtype=dtype,
    )
    model = Transformer(cfg)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p.dtype) * 0.7)
    return model.eval()


@pytest.mark.parametrize("norm", ["LN", "LNPre", "RMS", "RMSPre", None])
def test_folded_projection_equals_layernorm_then_projection(norm):
    model = _random_model(norm)
    block = model.blocks[1]
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(5, 6, 8, generator=gen, dtype=torch.float64) * 3 + 2  # rows, tokens, d_model
    normed = block.ln1(x) if norm is not None else x
    want = torch.stack([torch.einsum("nd,hde->hne", row, W) + b[:, None] for row in normed
                        for W, b in [(block.attn.W_Q, block.attn.b_Q), (block.attn.W_K, block.attn.b_K),
                                     (block.attn.W_V, block.attn.b_V)]])  # [row*3, head, tok, d_head]
    fold = FoldedWeights(model).qkv(1)
    mean, inv = fold.stats(x)
    for r in range(x.shape[0]):
        for channel in range(3):
            for head in range(2):
                key = head * 3 + channel
                got = fold.finish((x[r] @ fold.rows[key])[None], [key],
                                  None if mean is None else mean[r], None if inv is None else inv[r])[0]
                torch.testing.assert_close(got, want[r * 3 + channel, head], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("norm,act_fn", [("RMS", "gelu"), ("LNPre", "relu"), ("LN", "gelu_new")])
def test_engine_reproduces_clean_run_with_other_norms(norm, act_fn):
    """x_c = x_r: node removals and a half circuit compute mixed copies (the compiler cannot know
    the inputs are equal), which must give G(x_r) to float64 precision, MLP norms included
    (gelu_new: the engine's fused MLP path)."""
    model = _random_model(norm, attn_only=False, act_fn=act_fn)
    gen = torch.Generator().manual_seed(2)
    xr = torch.randint(0, 7, (3, 5), generator=gen)
    graph = Graph.from_model(model)
    half = ", ".join(str(e) for e in graph.edges[::2])
    hyps = [Hypothesis("~a0.1", "~a0.1"), Hypothesis("~m0", "~m0"), Hypothesis("half", f"circuit({half})")]
    copy_graphs = [h.compile(graph) for h in hyps]
    outs = GroupEvaluator(model, GroupPlan(graph, copy_graphs), Runs(model, xr, xr.clone()),
                          PositionContext({}, 3, 5, xr.device)).logits()
    clean = model(xr)
    for h, cg, out in zip(hyps, copy_graphs, outs, strict=True):
        assert cg.n_mixed > 0, h.name
        torch.testing.assert_close(out, clean, rtol=1e-10, atol=1e-10)


def test_half_precision_keeps_transformer_lens_layernorm():
    """bf16 takes the unfolded path; it agrees with the float64 engine to bf16 precision."""
    exact = tiny_model("mlp", n_layers=2)
    half = tiny_model("mlp", n_layers=2, dtype=torch.bfloat16)
    half.load_state_dict({k: v.to(torch.bfloat16) for k, v in exact.state_dict().items()})
    assert FoldedWeights(half).qkv(0).normalize_first and not FoldedWeights(exact).qkv(0).normalize_first
    gen = torch.Generator().manual_seed(4)
    xr, xc = (torch.randint(0, 7, (3, 5), generator=gen) for _ in range(2))
    graph = Graph.from_model(exact)
    h = Hypothesis("circuit", "circuit(in->a0.0.q, in->a0.1.k, a0.0->a1.1.v, a0.1->m0, m0->out, a1.1->out)")
    logits = []
    for model in (exact, half):
        plan = GroupPlan(graph, [h.compile(graph)])
        runs = Runs(model, xr, xc)
        logits.append(GroupEvaluator(model, plan, runs, PositionContext({}, 3, 5, xr.device)).logits()[0])
    scale = logits[0].abs().max().item()
    assert (logits[1].double() - logits[0]).abs().max().item() < 0.05 * scale
    assert not torch.allclose(logits[0], Runs(exact, xr, xc).logits["r"])  # a real patch


def test_a_removed_edge_recomputes_one_row_per_stage_downstream():
    """Downstream of a removed edge every head reads the same residual: built once, from the
    previous stage's input plus what lies between, like a forward's residual stream."""
    model = tiny_model("mlp", n_layers=4)
    graph = Graph.from_model(model)
    plan = GroupPlan(graph, [Hypothesis("r", "remove(a0.0->a1.1.q)").compile(graph)])
    heads = [s for s in plan.stages if s.kind.value == "head"]
    assert [s.layer for s in heads] == [1, 2, 3]
    assert heads[0].n_inputs == 2  # a1.1's q, and the clean residual its k, v (and all else) read
    for stage in heads[1:]:
        assert stage.n_rows == 3 * graph.n_heads and stage.n_inputs == 1
    assert heads[-1].uses_previous  # a2.*, m2 added to m2's input, not a1.1 ... m2 to resid_r


def test_grouped_kv_weights_are_stored_once_per_kv_head():
    """Under grouped-query attention the folded k/v matrices stay at kv size (repeating them
    per query head costs ~13 GB for Llama-3-8B in float32), and every key still projects as
    LayerNorm-then-its-head's-matrix."""
    model = tiny_model("llama", n_heads=4)  # one kv head: multi-query attention
    fold = FoldedWeights(model).qkv(1)
    H, n_kv = model.cfg.n_heads, model.cfg.n_key_value_heads
    assert fold.rows.shape[0] == H + 2 * n_kv < 3 * H
    x = torch.randn(5, model.cfg.d_model, dtype=torch.float64)
    attn, ln = model.blocks[1].attn, model.blocks[1].ln1
    want = torch.stack([ln(x) @ attn.W_Q[h] + attn.b_Q[h] if c == 0 else
                        ln(x) @ attn.W_K[h] + attn.b_K[h] if c == 1 else
                        ln(x) @ attn.W_V[h] + attn.b_V[h] for h in range(H) for c in range(3)])
    mean, inv = fold.stats(x)
    every = fold.finish(fold.project(x, None), slice(0, 3 * H), mean, inv)
    torch.testing.assert_close(every, want.to(every.dtype))
    some = torch.tensor([1, 4, 7, 11])  # k of heads 0, 1, 2 and v of head 3: one kv matrix
    picked = fold.finish(fold.project(x, some), some, mean, inv)
    torch.testing.assert_close(picked, want[some].to(picked.dtype))


@pytest.mark.parametrize("norm", ["RMS", "LN"])
def test_dense_rows_under_grouped_query_attention_read_each_kv_matrix_in_place(norm):
    """A dense circuit's rows (one input per key, a slice of whole heads, given as the transposed
    view of a position-major block) project with their own head's q and their kv head's k/v:
    6 query heads in 2 groups of 3, whole and partial slices and an index of keys."""
    cfg = ModelConfig(
        n_layers=2, n_heads=6, n_key_value_heads=2, d_model=12, d_head=4, n_ctx=16, d_vocab=7,
        d_mlp=8, act_fn="silu", gated_mlp=True, normalization_type=norm, dtype=torch.float64,
        positional_embedding_type="rotary", rotary_dim=4)
    model = Transformer(cfg, generator=torch.Generator().manual_seed(3)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)  # norm weights and biases away from 1 and 0
    fold = FoldedWeights(model).qkv(1)
    attn, ln = model.blocks[1].attn, model.blocks[1].ln1
    H, tokens = cfg.n_heads, 5
    block = torch.randn(tokens, 3 * H + 2, cfg.d_model, dtype=torch.float64) * 2 + 0.5
    rows = block.transpose(0, 1)[1:3 * H + 1]  # [key, tokens, d_model], a strided view
    W = {0: (attn.W_Q, attn.b_Q), 1: (attn.W_K, attn.b_K), 2: (attn.W_V, attn.b_V)}
    want = torch.stack([ln(rows[key]) @ W[key % 3][0][key // 3] + W[key % 3][1][key // 3]
                        for key in range(3 * H)])
    for keys in (slice(0, 3 * H), slice(3, 15), slice(6, 9), torch.tensor([1, 4, 8, 11, 17])):
        got = fold.project_rows(rows[keys], keys)
        torch.testing.assert_close(got, want[keys], rtol=1e-12, atol=1e-12)


def test_dense_circuit_under_grouped_query_attention_matches_the_hook_baseline():
    """End to end: a circuit of a model with 4 query heads on 2 kv heads, keeping every edge into
    `out` and the MLPs and half of those into q/k/v (so every head copy is mixed and reads its
    own row per channel), equals the careful hook run on split, ungrouped inputs
    (`benchmark.hook_baseline`)."""
    cfg = ModelConfig(
        n_layers=3, n_heads=4, n_key_value_heads=2, d_model=8, d_head=4, n_ctx=16, d_vocab=7,
        d_mlp=12, act_fn="silu", gated_mlp=True, normalization_type="RMS", dtype=torch.float64,
        positional_embedding_type="rotary", rotary_dim=4)
    model = Transformer(cfg, generator=torch.Generator().manual_seed(4)).eval()
    graph = Graph.from_model(model)
    gen = torch.Generator().manual_seed(4)
    xr, xc = (torch.randint(0, 7, (2, 6), generator=gen) for _ in range(2))
    rng = random.Random(4)
    kept = {str(e) for e in graph.edges
            if e.receiver.kind.value in ("output", "mlp") or rng.random() < 0.5}
    circuit = Hypothesis("dense", "circuit(" + ", ".join(sorted(kept)) + ")")
    plan = GroupPlan(graph, compile_all(graph, [circuit], max_mixed_copies=10**6))
    # the last layer's heads (11 senders): every key its own row, a slice of all heads, which
    # takes the in-place products; earlier layers (fewer senders) share some rows
    stage = next(s for s in plan.stages if s.kind.value == "head" and s.layer == 2)
    assert stage.projection[0].singles.keys == slice(0, 3 * cfg.n_heads)
    with torch.no_grad():
        (got,) = GroupEvaluator(model, plan, Runs(model, xr, xc),
                                PositionContext({}, 2, 6, xr.device)).logits()
        _, cf_cache = model.run_with_cache(xc)
        with Adapter.of(model).split_inputs():
            want = hook_baseline(model, graph, kept, xr, cf_cache)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)
