"""Zero, mean and position-wise mean ablation equal hook-based edge ablation on the same model."""

import pytest
import torch

from pathpatch.engine.ablation import Intervention, ablation_values
from pathpatch.engine.evaluation import evaluate
from pathpatch.engine.group_evaluation import evaluate_logits
from pathpatch.engine.positions import PositionContext
from pathpatch.engine.runs import Runs
from pathpatch.errors import PathPatchError
from pathpatch.language.circuits import circuit_hypothesis, prune
from pathpatch.language.hypotheses import Hypothesis
from pathpatch.model.graph import Graph
from tests.pathpatch.conftest import FAMILIES, tiny_model
from tests.pathpatch.test_evaluate import _dataset

ABLATIONS = ["zero", "mean", "mean_positional"]


def _outputs(model, cache_get) -> dict:
    """Every node's output by the graph's names, read from a run: `in` the token embedding, a
    head z @ W_O (no b_O), an MLP its output."""
    out = {"in": cache_get("hook_embed")}
    for layer in range(model.cfg.n_layers):
        z = cache_get(f"blocks.{layer}.attn.hook_z")
        for h in range(model.cfg.n_heads):
            out[f"a{layer}.{h}"] = z[:, :, h] @ model.blocks[layer].attn.W_O[h]
        if not model.cfg.attn_only:
            out[f"m{layer}"] = cache_get(f"blocks.{layer}.hook_mlp_out")
    return out


def _values(model, xr, kind: str) -> dict:
    """Each node's ablation value, by its own means of the clean runs (nothing of the engine)."""
    _, cache = model.run_with_cache(xr)
    outputs = _outputs(model, lambda name: cache[name])
    if kind == "zero":
        return {u: torch.zeros_like(o[0, 0]) for u, o in outputs.items()}
    if kind == "mean":
        return {u: o.mean((0, 1)) for u, o in outputs.items()}
    return {u: o.mean(0) for u, o in outputs.items()}  # [pos, d_model]


def _ablation_hook_run(model, kept: set[str], xr, values: dict) -> torch.Tensor:
    """A circuit as TransformerLens hooks compute it: one run on x_r in which each receiver's
    input gets, for each edge u -> v outside the circuit, a_u - a_u(this run). Under norms after
    attention the norm reads the sum of the layer's heads, each kept or ablated, plus b_O."""
    cfg = model.cfg
    L, H = cfg.n_layers, cfg.n_heads
    parallel = bool(cfg.parallel_attn_mlp) and not cfg.attn_only
    normed = bool(cfg.use_normalization_before_and_after or cfg.post_norm_only)
    has_mlp = int(not cfg.attn_only)
    current: dict = {}

    def heads(layer):
        return [f"a{layer}.{h}" for h in range(H)]

    def correction(receiver: str, channel: str | None, head_layers: int, mlp_layers: int):
        suffix = f".{channel}" if channel else ""
        out_of = [u for u in ["in"] + [f"m{m}" for m in range(mlp_layers)]
                  if f"{u}->{receiver}{suffix}" not in kept]
        total = sum((values[u] - current[u] for u in out_of), torch.zeros(()))
        for layer in range(head_layers):
            picked = [(values[u] if f"{u}->{receiver}{suffix}" not in kept else current[u])
                      for u in heads(layer)]
            if normed:
                attn = model.blocks[layer]
                mixed = attn.ln1_post(sum(picked) + attn.attn.b_O)
                total = total + mixed - current[f"attn{layer}"]
            else:
                total = total + sum(p - current[u] for p, u in zip(picked, heads(layer), strict=True))
        return total

    def record(name):
        def hook(x, hook):
            current[name] = x
        return hook

    def record_z(layer):
        def hook(z, hook):
            for h in range(H):
                current[f"a{layer}.{h}"] = z[:, :, h] @ model.blocks[layer].attn.W_O[h]
        return hook

    def fix_heads(layer, channel):
        def hook(x, hook):  # [batch, pos, head, d_model]
            x = x.clone()
            for h in range(H):
                x[:, :, h] = x[:, :, h] + correction(f"a{layer}.{h}", channel, layer, layer * has_mlp)
            return x
        return hook

    def fix_mlp(layer):
        heads_read = layer if parallel else layer + 1
        return lambda x, hook: x + correction(f"m{layer}", None, heads_read, layer)

    hooks = [("hook_embed", record("in"))]
    for layer in range(L):
        hooks += [(f"blocks.{layer}.hook_{c}_input", fix_heads(layer, c)) for c in "qkv"]
        hooks += [(f"blocks.{layer}.attn.hook_z", record_z(layer)),
                  (f"blocks.{layer}.hook_attn_out", record(f"attn{layer}"))]
        if not cfg.attn_only:
            hooks += [(f"blocks.{layer}.hook_mlp_in", fix_mlp(layer)),
                      (f"blocks.{layer}.hook_mlp_out", record(f"m{layer}"))]
    n_mlp = 0 if cfg.attn_only else L
    hooks.append((f"blocks.{L - 1}.hook_resid_post",
                  lambda x, hook: x + correction("out", None, L, n_mlp)))
    grouped = cfg.n_kv_heads != cfg.n_heads
    model.set_use_split_qkv_input(True)
    if grouped:
        model.set_ungroup_grouped_query_attention(True)
    if not cfg.attn_only:
        model.set_use_hook_mlp_in(True)
    try:
        return model.run_with_hooks(xr, fwd_hooks=hooks)
    finally:
        model.set_use_split_qkv_input(False)
        if grouped:
            model.set_ungroup_grouped_query_attention(False)
        if not cfg.attn_only:
            model.set_use_hook_mlp_in(False)


def _circuits(graph, n=3, seed=0) -> list[Hypothesis]:
    """Random circuits, pruned to the edges on their input-to-output paths: on those, hook-based
    edge ablation is the path semantics (a node whose every input edge is ablated computes its
    function of ablated inputs under hooks, a counterfactual copy (a_v) in the treeified model;
    under `resample` the two agree, under ablation only on pruned circuits)."""
    gen = torch.Generator().manual_seed(seed)
    edges = list(graph.edges)
    out = []
    for i, keep in enumerate((0.2, 0.5, 0.8)[:n]):
        chosen = [e for e in edges if torch.rand((), generator=gen) < keep]
        out.append(circuit_hypothesis(graph, f"c{i}", prune(graph, chosen)))
    return out


@pytest.mark.parametrize("kind", ABLATIONS)
@pytest.mark.parametrize("family", list(FAMILIES))
def test_ablated_circuits_equal_hook_based_edge_ablation(family, kind):
    model = tiny_model(family, n_layers=2, n_heads=2)
    graph = Graph.from_model(model)
    data = _dataset(model, n=6, T=5)
    xr = data.reference
    ablation = ablation_values(model, xr, kind)
    runs = Runs.ablated(model, xr, ablation)
    values = _values(model, xr, kind)
    circuits = _circuits(graph)
    assert any(h.pattern not in ("none", "all") for h in circuits)
    got = evaluate_logits(model, graph, [h.compile(graph) for h in circuits], runs,
                          PositionContext({}, xr.shape[0], xr.shape[1], xr.device))
    clean = model(xr)
    for h, logits in zip(circuits, got, strict=True):
        want = _ablation_hook_run(model, set(h.facts.edges), xr, values)
        assert not torch.allclose(want, clean)  # a real ablation
        torch.testing.assert_close(logits, want, rtol=1e-10, atol=1e-10,
                                   msg=lambda m, h=h: f"{family} {kind} {h.name}: {m}")
    # the ends: every edge kept is the clean run, none the fully ablated model
    every = {str(e) for e in graph.edges}
    torch.testing.assert_close(_ablation_hook_run(model, every, xr, values), clean,
                               rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(runs.logits["c"], _ablation_hook_run(model, set(), xr, values),
                               rtol=1e-10, atol=1e-10)


def test_evaluate_rows_under_ablation_are_the_hook_run_s_and_independent_of_batching():
    model = tiny_model("mlp", n_layers=2, n_heads=2)
    graph = Graph.from_model(model)
    data = _dataset(model, n=6, T=5)
    hyps = [Hypothesis("all", "all"), Hypothesis("none", "none"), *_circuits(graph, n=2)]
    for kind in ABLATIONS:
        whole = evaluate(model, data, hyps, "kl", intervention=kind).to_pydict()
        split = evaluate(model, data, hyps, "kl", intervention=kind, batch_size=2).to_pydict()
        assert whole["ue"] == pytest.approx(split["ue"], abs=1e-12)
        n = len(data)
        ue = dict(zip(whole["hypothesis"][::n], [whole["ue"][i * n:(i + 1) * n]
                                                   for i in range(len(hyps))], strict=True))
        assert max(map(abs, ue["all"])) < 1e-12
        assert ue["none"] == pytest.approx(whole["te"][:n], abs=1e-12)
    resample = evaluate(model, data, hyps, "kl").to_pydict()
    mean = evaluate(model, data, hyps, "kl", intervention="mean").to_pydict()
    assert resample["te"] != pytest.approx(mean["te"])


def test_an_ablation_does_not_read_the_counterfactual_prompts():
    model = tiny_model("mlp")
    data = _dataset(model)
    other = _dataset(model, seed=1)
    swapped = type(data)(data.reference, other.counterfactual, data.scored, data.masks,
                         example_ids=data.example_ids)
    hyps = [Hypothesis("none", "none")]
    assert (evaluate(model, data, hyps, intervention="zero").to_pydict()
            == evaluate(model, swapped, hyps, intervention="zero").to_pydict())


def test_unknown_interventions_are_refused_by_name():
    model = tiny_model("mlp")
    with pytest.raises(PathPatchError, match="unknown intervention 'median'.*'mean_positional'"):
        evaluate(model, _dataset(model), [Hypothesis("all", "all")], intervention="median")
    assert Intervention.parse("zero") is Intervention.ZERO


def test_a_metric_that_reads_the_counterfactual_prompts_is_refused_under_ablation():
    """A user metric may read the batch; under an x_c-free intervention x_c is no part of the
    run, so reading `batch.counterfactual` (any use of it) raises by name, while a metric that
    reads only the clean side runs, and under resample the same metric reads x_c as before."""
    from pathpatch.engine.metrics import Metric

    model = tiny_model("mlp")
    data = _dataset(model)
    hyps = [Hypothesis("none", "none")]

    def reads_xc(clean, other, batch):
        return (clean - other).abs().mean((1, 2)) * (batch.counterfactual[:, 0] >= 0)

    def clean_only(clean, other, batch):
        return (clean - other).abs().mean((1, 2)) * (batch.reference[:, 0] >= 0)

    xc_metric = Metric.from_fn("tests:reads_xc", reads_xc)
    with pytest.raises(PathPatchError, match="metric 'tests:reads_xc' read the batch's "
                                             "counterfactual prompts.*intervention 'mean'"):
        evaluate(model, data, hyps, xc_metric, intervention="mean")
    rows = evaluate(model, data, hyps, Metric.from_fn("tests:clean", clean_only),
                    intervention="mean").to_pydict()
    assert min(rows["te"]) > 0
    assert min(evaluate(model, data, hyps, xc_metric).to_pydict()["te"]) > 0
