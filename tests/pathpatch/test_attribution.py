"""EAP and EAP-IG edge scores against what they approximate: the first-order change by finite
differences per edge, and the exact single-edge effect where the model is linear."""

import pytest
import torch

from pathpatch.data.pairs import PairDataset
from pathpatch.discovery.attribution import Attribution, edge_attributions
from pathpatch.engine.ablation import ablation_values
from pathpatch.engine.group_evaluation import evaluate_logits
from pathpatch.engine.metrics import get_metric, loss_value
from pathpatch.engine.positions import PositionContext
from pathpatch.engine.runs import Runs
from pathpatch.errors import PathPatchError
from pathpatch.language.hypotheses import Hypothesis
from pathpatch.model.graph import Graph
from tests.pathpatch.conftest import tiny_model
from tests.pathpatch.test_ablation import _values
from tests.pathpatch.test_engine import _edge_hook_run

B, T = 3, 5


def _batch(model, seed=0) -> PairDataset:
    gen = torch.Generator().manual_seed(seed)
    xr, xc = (torch.randint(0, model.cfg.d_vocab, (B, T), generator=gen) for _ in range(2))
    answer = torch.randint(0, model.cfg.d_vocab, (B,), generator=gen)
    wrong = (answer + 1) % model.cfg.d_vocab
    scored = torch.zeros(B, T, dtype=torch.bool)
    scored[:, -1] = True
    return PairDataset(xr, xc, scored, answer=answer, wrong_answer=wrong)


def _m(model, logits, batch):
    return get_metric("logit_diff").value(logits, batch)


@pytest.mark.parametrize("family", ["mlp", "llama", "neox"])
def test_eap_is_the_first_order_change_of_each_edge(family):
    """d/dε m(receiver's input + ε (a_u(x_c) - a_u(x_r))) at 0, by central differences."""
    model = tiny_model(family, n_layers=2)
    batch = _batch(model)
    edges, scores = edge_attributions(model, batch)
    by_name = {str(e): i for i, e in enumerate(edges)}
    checked = 0
    for name in ("in->a0.1.q", "in->a1.0.k", "a0.0->a1.1.v", "a0.1->m1" if family != "neox" else "in->m1",
                 "m0->out", "a1.0->out"):
        edge = edges[by_name[name]]
        eps = 1e-5
        xr, xc = batch.reference, batch.counterfactual
        plus = _edge_hook_run(model, edge, xr, xc, scale=eps)
        minus = _edge_hook_run(model, edge, xr, xc, scale=-eps)
        want = (_m(model, plus, batch) - _m(model, minus, batch)) / (2 * eps)
        torch.testing.assert_close(scores[:, by_name[name]], want, rtol=1e-6, atol=1e-8,
                                   msg=lambda m, name=name: f"{family} {name}: {m}")
        checked += bool(want.abs().max() > 1e-6)
    assert checked >= 4  # real gradients, not zeros


@pytest.mark.parametrize(("metric", "steps", "points"),
                         [("loss", 0, "left"), ("loss", 2, "left"), ("kl", 3, "left"),
                          ("kl", 1, "left"), ("logit_diff", 2, "left"), ("kl", 3, "right"),
                          ("logit_diff", 2, "right")])
def test_every_statistic_s_scores_are_the_mean_first_order_change_over_the_points(
        metric, steps, points):
    """Each point's score is d/dε m(point with the receiver's input + ε (a_u(x_c) - a_u(x_r)))
    at 0 (central differences), m the metric's statistic: the signed loss, KL against the
    clean run, the logit difference; EAP-IG averages the points α = k / steps, k = 0..steps-1
    (`left`) or 1..steps (`right`)."""
    model = tiny_model("mlp", n_layers=2)
    batch = _batch(model, 2)
    scored = torch.zeros(B, T, dtype=torch.bool)
    scored[:, 1:-1] = True  # loss predicts the next token: the last position has none
    batch = PairDataset(batch.reference, batch.counterfactual, scored, answer=batch.answer,
                        wrong_answer=batch.wrong_answer)
    m = get_metric(metric)
    clean_logits = model(batch.reference)

    def stat(logits):
        if metric == "loss":
            return loss_value(logits, batch)
        if metric == "kl":
            return m.against_clean(clean_logits, batch)(logits)
        return m.value(logits, batch)

    edges, scores = edge_attributions(model, batch, metric, steps=steps, points=points)
    by_name = {str(e): i for i, e in enumerate(edges)}
    first = 0 if points == "left" else 1
    alphas = [None] if steps == 0 else [k / steps for k in range(first, first + steps)]
    checked = 0
    for name in ("in->a0.1.q", "a0.0->a1.1.k", "a0.1->m1", "m0->out"):
        edge, eps = edges[by_name[name]], 1e-5
        want = 0
        for alpha in alphas:
            runs = [_edge_hook_run(model, edge, batch.reference, batch.counterfactual,
                                   scale=s, embed_alpha=alpha) for s in (eps, -eps)]
            want = want + (stat(runs[0]) - stat(runs[1])) / (2 * eps) / len(alphas)
        torch.testing.assert_close(scores[:, by_name[name]], want, rtol=1e-5, atol=1e-8,
                                   msg=lambda msg, name=name: f"{metric} {name}: {msg}")
        checked += bool(want.abs().max() > 1e-6)
    assert checked >= 3


def test_eap_is_exact_where_the_metric_is_linear_in_the_receiver_s_input():
    """Without a final norm the logits are linear in `out`'s input: every edge into `out` scores
    exactly its single-edge effect m(remove edge) - m(x_r), and EAP-IG equals EAP there."""
    model = tiny_model("attn-only-noln", n_layers=2)
    batch = _batch(model, 1)
    graph = Graph.from_model(model)
    edges, eap = edge_attributions(model, batch)
    _, ig = edge_attributions(model, batch, steps=4)
    into_out = [i for i, e in enumerate(edges) if e.receiver.name == "out"]
    assert len(into_out) == 1 + 2 * 2  # in and the four heads
    hyps = [Hypothesis(str(edges[i]), f"remove({edges[i]})") for i in into_out]
    runs = Runs(model, batch.reference, batch.counterfactual)
    copy_graphs = [h.compile(graph) for h in hyps]
    assert all(cg.n_mixed > 0 for cg in copy_graphs)  # the exact side is a real recomputation
    got = evaluate_logits(model, graph, copy_graphs, runs,
                          PositionContext({}, B, T, batch.reference.device))
    clean = _m(model, runs.logits["r"], batch)
    for i, logits in zip(into_out, got, strict=True):
        exact = _m(model, logits, batch) - clean
        torch.testing.assert_close(eap[:, i], exact, rtol=1e-9, atol=1e-10)
        torch.testing.assert_close(ig[:, i], exact, rtol=1e-9, atol=1e-10)
    assert any(float(eap[:, i].abs().max()) > 1e-3 for i in into_out)


def test_eap_ig_converges_as_its_steps_grow():
    model = tiny_model("mlp", n_layers=2)
    batch = _batch(model, 2)
    runs = [edge_attributions(model, batch, steps=s)[1] for s in (1, 2, 32, 64)]
    coarse = (runs[0] - runs[1]).abs().max()
    fine = (runs[2] - runs[3]).abs().max()
    assert fine < coarse / 10  # a Riemann sum settling on its integral


def test_what_attribution_cannot_do_is_refused_by_name():
    model = tiny_model("mlp")
    batch = _batch(model)
    with pytest.raises(PathPatchError, match="gradient there is 0"):
        edge_attributions(model, batch, "kl")
    with pytest.raises(PathPatchError, match="steps = 1 and points 'right'.* only at x_r"):
        edge_attributions(model, batch, "kl", steps=1, points="right")
    with pytest.raises(PathPatchError, match="points = 'middle': allowed are left, right"):
        edge_attributions(model, batch, steps=2, points="middle")
    with pytest.raises(PathPatchError, match="points = 'middle': allowed are left, right"):
        Attribution("eap-ig", 2, points="middle")
    with pytest.raises(PathPatchError, match="eap takes no points"):
        Attribution("eap", points="left")
    with pytest.raises(PathPatchError, match="user metric"):
        edge_attributions(model, batch, "tests.pipeline.slow_metric:slow_kl")
    with pytest.raises(PathPatchError, match="eap takes no steps"):
        Attribution("eap", 3)
    with pytest.raises(PathPatchError, match="steps = 0"):
        Attribution("eap-ig", 0)
    with pytest.raises(PathPatchError, match="allowed are eap, eap-ig"):
        Attribution("acdc")
    with pytest.raises(PathPatchError, match="steps = -1"):
        edge_attributions(model, batch, steps=-1)
    with pytest.raises(PathPatchError, match="Gemma-2"):
        edge_attributions(tiny_model("gemma"), _batch(tiny_model("gemma")))


@pytest.mark.parametrize("steps", [0, 4])
def test_a_model_with_a_known_circuit_ranks_its_edges_first(steps):
    """Only heads a0.1 and a1.0 write to the residual stream (every other W_O and both MLPs
    are 0), so the circuit is known: the edges among in, a0.1, a1.0 and out. Every other edge
    sends a zero change or feeds a node whose output is zero: its score is exactly 0, and the
    circuit's edges take the top ranks."""
    model = tiny_model("mlp", n_layers=2, n_heads=3)
    with torch.no_grad():
        for layer, keep in ((0, 1), (1, 0)):
            for head in range(3):
                if head != keep:
                    model.blocks[layer].attn.W_O[head].zero_()
            model.blocks[layer].mlp.W_out.zero_()
            model.blocks[layer].mlp.b_out.zero_()
    batch = _batch(model, 4)
    edges, scores = edge_attributions(model, batch, steps=steps)
    circuit = {"in", "a0.1", "a1.0", "out"}
    known = [i for i, e in enumerate(edges) if e.sender.name in circuit and e.receiver.name in circuit]
    assert len(known) == 3 + 3 + 3 + 3  # in->a0.1.qkv, in->a1.0.qkv, a0.1->a1.0.qkv, into out
    importance = scores.abs().mean(dim=0)
    others = [i for i in range(len(edges)) if i not in known]
    assert torch.all(importance[others] == 0)
    assert torch.all(importance[known] > 1e-6)
    top = importance.argsort(descending=True)[:len(known)].tolist()
    assert set(top) == set(known)


def _reference_eap_ig(model, batch, steps, ablated=None):
    """EAP-IG as the EAP-IG repository computes it, written here with plain autograd on the
    model's own hooks: run x_r's tokens with the token embedding e(x_c) + α (e(x_r) - e(x_c))
    for α = k / steps, k = 0..steps-1; take the logit difference's gradient with respect to
    every receiver channel's input (heads' split q/k/v inputs, the MLP's input, the final
    residual stream); average over the points and take the product with each sender's
    (corrupted - clean) output, summed over positions and d_model. Returns {edge name: [batch]}
    (the repository then sums over examples and divides by their count; its sign differs).

    `ablated`: {sender: its ablation value [pos or 1, d_model]} for the repository's EAP
    (`steps` = 0) under zero or mean ablation: the gradient at x_r, times ablated - clean."""
    cfg = model.cfg
    _, rc = model.run_with_cache(batch.reference)
    _, cc = model.run_with_cache(batch.counterfactual)

    def output(cache, name):  # a sender's output, [batch, pos, d_model]
        if name == "in":
            return cache["hook_embed"]
        if name.startswith("m"):
            return cache[f"blocks.{name[1:]}.hook_mlp_out"]
        layer, head = (int(x) for x in name[1:].split("."))
        return cache[f"blocks.{layer}.attn.hook_z"][:, :, head] @ model.blocks[layer].attn.W_O[head]

    receivers = [f"blocks.{layer}.hook_{c}_input" for layer in range(cfg.n_layers) for c in "qkv"]
    receivers += [f"blocks.{layer}.hook_mlp_in" for layer in range(cfg.n_layers)]
    receivers += [f"blocks.{cfg.n_layers - 1}.hook_resid_post"]
    total = {name: 0 for name in receivers}
    e_r, e_c = rc["hook_embed"], cc["hook_embed"]
    model.set_use_split_qkv_input(True)
    model.set_use_hook_mlp_in(True)
    try:
        kept = {}

        def keep(x, hook):
            x.retain_grad()
            kept[hook.name] = x
            return x

        for k in range(max(steps, 1)):
            alpha = k / steps if steps else 1.0  # EAP: the one point x_r
            point = (e_c + alpha * (e_r - e_c)).detach().requires_grad_()
            logits = model.run_with_hooks(
                batch.reference, fwd_hooks=[("hook_embed", lambda x, hook, p=point: p)]
                + [(name, keep) for name in receivers])
            _m(model, logits, batch).sum().backward()
            for name in receivers:
                total[name] = total[name] + kept[name].grad / max(steps, 1)
    finally:
        model.set_use_split_qkv_input(False)
        model.set_use_hook_mlp_in(False)
    model.zero_grad(set_to_none=True)
    scores = {}
    senders = ["in"] + [f"{kind}{layer}" if kind == "m" else f"a{layer}.{h}"
                        for layer in range(cfg.n_layers) for kind in ("a", "m")
                        for h in (range(cfg.n_heads) if kind == "a" else [None])]
    for sender in senders:
        changed = output(cc, sender) if ablated is None else ablated[sender]
        diff = changed - output(rc, sender)
        src_layer = -1 if sender == "in" else int(sender[1:].split(".")[0])
        for layer in range(cfg.n_layers):
            for h in range(cfg.n_heads):
                if src_layer < layer:
                    for c in "qkv":
                        grad = total[f"blocks.{layer}.hook_{c}_input"][:, :, h]
                        scores[f"{sender}->a{layer}.{h}.{c}"] = (diff * grad).sum((1, 2))
            if src_layer < layer or (src_layer == layer and sender.startswith("a")):
                grad = total[f"blocks.{layer}.hook_mlp_in"]
                scores[f"{sender}->m{layer}"] = (diff * grad).sum((1, 2))
        scores[f"{sender}->out"] = (diff * total[receivers[-1]]).sum((1, 2))
    return scores


@pytest.mark.parametrize("steps", [1, 5])
def test_eap_ig_is_the_reference_s_formula(steps):
    """By default EAP-IG is the EAP-IG repository's: gradients averaged at α = 0, 1/m, ...,
    (m-1)/m of the embedding interpolated from x_c's towards x_r's (the corrupted point in, the
    clean one out), here written independently of the engine; float64, every edge."""
    model = tiny_model("mlp", n_layers=2)
    batch = _batch(model, 3)
    edges, scores = edge_attributions(model, batch, steps=steps)
    want = _reference_eap_ig(model, batch, steps)
    assert sorted(want) == sorted(str(e) for e in edges)
    for i, edge in enumerate(edges):
        torch.testing.assert_close(scores[:, i], want[str(edge)], rtol=1e-9, atol=1e-11,
                                   msg=lambda m, edge=edge: f"{edge}: {m}")
    assert float(scores.abs().max()) > 1e-3


def test_the_right_points_reproduce_the_scores_before_points_were_named():
    """`right` is α = 1/m, ..., 1: its scores are the mean of the gradients at those points,
    the last of which is x_r itself (EAP); for m = 1 it is EAP, and it differs from `left`."""
    model = tiny_model("mlp", n_layers=2)
    batch = _batch(model, 3)
    _, eap = edge_attributions(model, batch)
    _, right1 = edge_attributions(model, batch, steps=1, points="right")
    torch.testing.assert_close(right1, eap, rtol=1e-12, atol=1e-14)
    _, left4 = edge_attributions(model, batch, steps=4)
    _, right4 = edge_attributions(model, batch, steps=4, points="right")
    # right's points are left's shifted by 1/m: the sums differ by (gradient at x_r - at x_c) / m
    _, left1 = edge_attributions(model, batch, steps=1)  # x_c's point alone
    torch.testing.assert_close(right4 - left4, (eap - left1) / 4, rtol=1e-9, atol=1e-11)
    assert float((right4 - left4).abs().max()) > 1e-4
    named = Attribution("eap-ig", 4, points="right")
    assert (named.name, Attribution("eap-ig", 4).name) == ("eap-ig-4-right", "eap-ig-4")


@pytest.mark.parametrize("kind", ["zero", "mean", "mean_positional"])
def test_eap_under_ablation_is_the_reference_s_formula(kind):
    """Under zero, mean or position-wise mean ablation EAP is the EAP-IG repository's
    `get_scores_eap` with that intervention: the gradient at x_r times (the sender's ablation
    value - its clean output); the values those of test_ablation's hook oracle, taken from the
    clean cache without the engine (means over examples and positions, or over examples per
    position), float64, every edge; x_c unread.
    (The ablation values' hooks are the engine's, exact on every family: test_ablation.py.)"""
    model = tiny_model("mlp", n_layers=2)
    batch = _batch(model, 4)
    ablated = _values(model, batch.reference, kind)  # the hook oracle's own values
    ablation = ablation_values(model, batch.reference, kind)
    edges, scores = edge_attributions(model, batch, ablation=ablation)
    want = _reference_eap_ig(model, batch, 0, ablated=ablated)
    assert sorted(want) == sorted(str(e) for e in edges)
    for i, edge in enumerate(edges):
        torch.testing.assert_close(scores[:, i], want[str(edge)], rtol=1e-9, atol=1e-11,
                                   msg=lambda m, edge=edge: f"{edge}: {m}")
    assert float(scores.abs().max()) > 1e-3
    _, resampled = edge_attributions(model, batch)
    assert float((scores - resampled).abs().max()) > 1e-3  # the ablation values are read
    other = PairDataset(batch.reference, batch.reference.flip(0), batch.scored,
                        answer=batch.answer, wrong_answer=batch.wrong_answer)
    assert torch.equal(edge_attributions(model, other, ablation=ablation)[1], scores)


def test_eap_ig_under_ablation_is_refused_by_name():
    """EAP-IG interpolates towards x_c's embedding: without x_c it is refused, as the EAP-IG
    repository refuses `EAP-IG-inputs` under any intervention but patching."""
    model = tiny_model("mlp", n_layers=2)
    batch = _batch(model)
    with pytest.raises(PathPatchError, match="EAP-IG interpolates.*'mean'.*method 'eap'"):
        edge_attributions(model, batch, steps=3, ablation=ablation_values(model, batch.reference,
                                                                          "mean"))
    with pytest.raises(PathPatchError, match="eap-ig-3.*'zero'"):
        Attribution("eap-ig", 3).check(model, "logit_diff", "zero")
    Attribution("eap").check(model, "logit_diff", "zero")  # EAP is defined there
