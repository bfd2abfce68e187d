"""The cost estimate: per-token multiply-adds read from the model's shape through the adapter,
at the dataset's sequence length, never at n_ctx."""

import math

import pytest

from pathpatch.engine.evaluation import check
from pathpatch.language.copies import estimate_cost
from pathpatch.language.hypotheses import Hypothesis
from pathpatch.model.adapter import Adapter
from pathpatch.model.costs import unit_costs
from pathpatch.model.graph import Graph
from tests.pathpatch.conftest import tiny_model

D, D_HEAD, D_MLP, VOCAB = 8, 4, 12, 7  # tiny_model's shape


def test_unit_costs_follow_each_familys_shape():
    plain, llama = (unit_costs(tiny_model(f).cfg, 6) for f in ("mlp", "llama"))
    keys = (1 + 2 + 3 + 4 + 5 + 6) / 6  # causal: query t sees t + 1 keys
    assert plain.attention == (D_HEAD * keys,) * 2
    assert plain.mlp == 2 * D * D_MLP and llama.mlp == 3 * D * D_MLP  # gated: three matrices
    assert plain.projection == D * D_HEAD and plain.unembed == D * VOCAB
    layer = (2 + 2 * 2) * D * D_HEAD + 2 * (2 * D_HEAD * keys + D_HEAD * D) + 2 * D * D_MLP
    assert plain.forward == pytest.approx(2 * layer + D * VOCAB)
    # grouped-query attention: a forward projects k and v once per kv head (1 for 2 heads)
    gqa_layer = (2 + 2 * 1) * D * D_HEAD + 2 * (2 * D_HEAD * keys + D_HEAD * D) + 3 * D * D_MLP
    assert llama.forward == pytest.approx(2 * gqa_layer + D * VOCAB)


def test_a_window_caps_the_keys_a_query_attends_to():
    window = unit_costs(tiny_model("window").cfg, 6)  # a window of 2 in layer 0
    assert window.attention == (D_HEAD * (1 + 2 * 5) / 6, D_HEAD * 21 / 6)


def test_keys_per_query_counts_the_model_s_own_mask():
    """The config's count (read without torch, by `explain` and plans) is the number of keys the
    model's attention mask allows, window or not, at every length."""
    model = tiny_model("window")
    for layer in range(model.cfg.n_layers):
        for seq_len in (1, 2, 5, 9):
            allowed = Adapter.of(model).allowed_keys(layer, seq_len, "cpu")
            n_keys = (seq_len * (seq_len + 1) // 2 if allowed is None else int(allowed.sum()))
            assert model.cfg.keys_per_query(layer, seq_len) == n_keys / seq_len


def test_the_estimate_reads_the_sequence_length_not_n_ctx():
    model = tiny_model("llama")
    graph = Graph.from_model(model)
    cg = Hypothesis("h", "~a0.0").compile(graph)
    before = estimate_cost(cg, unit_costs(model.cfg, 5))
    model.cfg = model.cfg.replace(n_ctx=131_072)  # Llama-3's
    assert estimate_cost(cg, unit_costs(model.cfg, 5)) == before
    assert estimate_cost(cg, unit_costs(model.cfg, 500)) != before


def test_a_mixed_output_costs_the_unembedding_and_one_mixing_term():
    model = tiny_model("mlp")
    graph = Graph.from_model(model)
    unit = unit_costs(model.cfg, 5)
    # only `out` is mixed; it reads x_c through `in` and the clean run elsewhere: against the
    # clean run one term (in's counterfactual deviation), against x_c every other sender
    cg = Hypothesis("h", "remove(in->out)").compile(graph)
    assert cg.n_mixed == 1
    assert estimate_cost(cg, unit) == pytest.approx((unit.unembed + D) / unit.forward)


def test_check_estimates_at_the_datasets_length_else_none():
    model = tiny_model("mlp")
    hyps = [Hypothesis("one", "~a0.0")]
    at_five = check(model, hyps, seq_len=5)[0].est_cost
    assert at_five == estimate_cost(hyps[0].compile(Graph.from_model(model)),
                                    unit_costs(model.cfg, 5))
    assert math.isnan(check(model, hyps)[0].est_cost)  # no dataset, no length


def test_a_row_reading_a_cached_run_adds_no_mixing_term():
    """Removing in -> a1.0.q leaves a1.0's k and v reading the clean run: that row is the
    cached residual, read, not mixed (`Mixing.cached`). Against the clean run the
    mixing is a1.0's q (in's counterfactual deviation) and out's a1.0 entry: two terms."""
    model = tiny_model("attn-only")
    unit = unit_costs(model.cfg, 5)
    cg = Hypothesis("h", "remove(in->a1.0.q)").compile(Graph.from_model(model))
    assert [c.node.name for c in cg.copies] == ["a1.0", "out"]
    head = 3 * unit.projection + 2 * unit.attention[1] + unit.head_output
    assert estimate_cost(cg, unit) == pytest.approx((head + unit.unembed + 2 * D) / unit.forward)
