"""Local Hugging Face directories of each family, offline, on tiny random models made here: the
loaded model's logits equal the HF model's own, and the engine on it equals TransformerLens's
activation patching and hook runs (node removals, single edges into q, k and v)."""

from __future__ import annotations

import pytest
import torch
import transformers as tr

from pathpatch.engine.evaluation import evaluate
from pathpatch.errors import PathPatchError
from pathpatch.language.hypotheses import Hypothesis
from pathpatch.model.graph import Graph
from pathpatch.model.loading import load_model
from tests.pathpatch.test_engine import _edge_hook_run
from tests.pathpatch.test_support import _engine, _patched

SEQ = 10  # longer than every window below
SMALL = dict(vocab_size=61, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
             intermediate_size=48, max_position_embeddings=128)

CONFIGS = {
    # GQA, q/k/v/o biases, Llama-3 rope scaling, head_dim != hidden / heads (TransformerLens's
    # own mapping ignores all four)
    "llama": lambda: tr.LlamaConfig(
        **SMALL, num_key_value_heads=2, head_dim=12, attention_bias=True,
        rope_parameters={"rope_type": "llama3", "rope_theta": 5000.0, "factor": 8.0,
                         "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 16}),
    "llama, linear rope scaling": lambda: tr.LlamaConfig(
        **SMALL, num_key_value_heads=4,
        rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0}),
    "mistral, sliding window": lambda: tr.MistralConfig(**SMALL, num_key_value_heads=1,
                                                        sliding_window=3),
    "qwen2, window in its upper layer": lambda: tr.Qwen2Config(
        **SMALL, num_key_value_heads=2, use_sliding_window=True, sliding_window=4,
        max_window_layers=1),
    "qwen3": lambda: tr.Qwen3Config(**SMALL, num_key_value_heads=2, head_dim=8),
    "gpt-neox (pythia), partial rotary, its rope_theta": lambda: tr.GPTNeoXConfig(
        **SMALL, rope_parameters={"rope_type": "default", "rope_theta": 500.0,
                                  "partial_rotary_factor": 0.25}),
    "gpt-neox, sequential residual": lambda: tr.GPTNeoXConfig(**SMALL, use_parallel_residual=False),
    # norms after attention and the MLP, (1 + weight) norms, a scaled embedding, its own attention
    # scale, windows in alternate layers, both soft caps (small, so that they bite); the eager
    # attention is the one that applies the attention cap
    "gemma2, window in layer 0, soft caps": lambda: tr.Gemma2Config(
        **SMALL, num_key_value_heads=2, head_dim=8, query_pre_attn_scalar=12, sliding_window=4,
        attn_logit_softcapping=2.0, final_logit_softcapping=3.0, attn_implementation="eager"),
    "gpt2": lambda: tr.GPT2Config(vocab_size=61, n_embd=32, n_layer=2, n_head=4, n_positions=64),
    # Gemma-3: q/k norms per head (1 + weight), a rotary base of its own in local layers, linear
    # scaling in global ones, windows, the logits' soft cap (its attention keeps a cap in its
    # config that transformers never applies: set here, so that following it would fail)
    "gemma3 text, q/k norms, local rotary base, windows, soft caps": lambda: tr.Gemma3TextConfig(
        **SMALL, num_key_value_heads=2, head_dim=8, query_pre_attn_scalar=12, sliding_window=4,
        layer_types=["sliding_attention", "full_attention"],
        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 100.0},
                         "full_attention": {"rope_type": "linear", "rope_theta": 5000.0,
                                            "factor": 2.0}},
        attn_logit_softcapping=2.0, final_logit_softcapping=3.0, attn_implementation="eager"),
    # Phi-3: fused q/k/v and gate/up projections, GQA, a window over every layer
    "phi3, fused projections, window": lambda: tr.Phi3Config(
        **SMALL, num_key_value_heads=2, sliding_window=4, pad_token_id=0, bos_token_id=1,
        eos_token_id=2),
    # OLMo-2: norms after the sublayers only, q/k norms over all heads' projection, GQA
    "olmo2, q/k norms over all heads": lambda: tr.Olmo2Config(**SMALL, num_key_value_heads=2),
    # OLMo-3: OLMo-2's layout with a window in its first layer
    "olmo3, windows": lambda: tr.Olmo3Config(
        **SMALL, num_key_value_heads=2, sliding_window=4,
        layer_types=["sliding_attention", "full_attention"]),
    # SmolLM3: its second layer does not rotate
    "smollm3, a layer without rotary": lambda: tr.SmolLM3Config(
        **SMALL, num_key_value_heads=2, no_rope_layers=[1, 0], pad_token_id=0, bos_token_id=1,
        eos_token_id=2),
}


def _random_hf(config) -> tr.PreTrainedModel:
    """The HF model of `config` with every weight random (norm weights and biases too)."""
    torch.manual_seed(0)
    model = tr.AutoModelForCausalLM.from_config(config).eval()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            p.copy_(1 + 0.3 * noise if "norm" in name and name.endswith("weight") else 0.3 * noise)
    return model


@pytest.fixture(scope="module", params=list(CONFIGS))
def saved(request, tmp_path_factory):
    """(family, HF model, its directory); the path names the family ("llama", "gemma"...), which
    TransformerLens's own loader would route by name."""
    hf = _random_hf(CONFIGS[request.param]())
    folder = tmp_path_factory.mktemp(request.param.split(",")[0].replace(" ", "-") + "-model")
    hf.save_pretrained(folder)
    return request.param, hf, folder


def _tokens(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 61, (3, SEQ), generator=gen) for _ in range(2)]


def test_loaded_model_equals_the_hf_model(saved):
    family, hf, folder = saved
    model = load_model(str(folder))
    xr, _ = _tokens()
    with torch.no_grad():
        want = hf(xr).logits
    torch.testing.assert_close(model(xr), want, atol=2e-5, rtol=2e-5, msg=lambda m: f"{family}: {m}")
    assert not hasattr(model, "tokenizer")  # no tokenizer: no padding-derived rotary offsets
    summary = model.cfg.describe()
    assert ("rotary" in summary) == (family != "gpt2")
    assert ("window" in summary) == ("window" in family)
    assert ("in parallel with attention" in summary) == family.startswith("gpt-neox (pythia)")


def test_engine_on_the_loaded_model_equals_transformer_lens_patching(saved):
    """Float64: each head and MLP removed = TransformerLens patching of hook_z / hook_mlp_out;
    single edges into q, k and v of a late head = a hook on the split input."""
    family, _, folder = saved
    model = load_model(str(folder), dtype=torch.float64)
    graph = Graph.from_model(model)
    xr, xc = _tokens(1)
    _, cf_cache = model.run_with_cache(xc)
    hyps, want = [], []
    for layer in range(model.cfg.n_layers):
        for head in (0, model.cfg.n_heads - 1):
            hyps.append(Hypothesis(f"~a{layer}.{head}", f"~a{layer}.{head}"))
            want.append(_patched(model, xr, cf_cache, f"blocks.{layer}.attn.hook_z", head))
        hyps.append(Hypothesis(f"~m{layer}", f"~m{layer}"))
        want.append(_patched(model, xr, cf_cache, f"blocks.{layer}.hook_mlp_out"))
    for name in ("in->a1.3.q", "a0.1->a1.2.k", "m0->a1.0.v" if not graph.parallel else "in->a1.0.v"):
        edge = next(e for e in graph.edges if str(e) == name)
        hyps.append(Hypothesis(f"remove {name}", f"remove({name})"))
        want.append(_edge_hook_run(model, edge, xr, xc))
    outs, cgs = _engine(model, hyps, xr, xc)
    for h, cg, out, ref in zip(hyps, cgs, outs, want, strict=True):
        assert cg.n_mixed > 0, h.name
        torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10,
                                   msg=lambda m, h=h: f"{family}, {h.name}: {m}")


def _hf_layers(hf):
    net = getattr(hf, "model", None) or getattr(hf, "transformer", None) or hf.gpt_neox
    return getattr(net, "layers", None) or net.h


# where each family's modules hold a head's output (the input columns of the output projection)
# and an MLP node's output (after Gemma's and OLMo's norm after the MLP)
_HEADS_INTO = ("self_attn.o_proj", "attn.c_proj", "attention.dense")


def _hf_patched(hf, xr, xc, layer: int, head: int | None, d_head: int) -> torch.Tensor:
    """The Hugging Face model's own run on x_r with one node's output from x_c, by PyTorch hooks
    on its modules (neither pathpatch's model nor TransformerLens is involved)."""
    block = _hf_layers(hf)[layer]
    if head is None:
        module = getattr(block, "post_feedforward_layernorm", None) or block.mlp
    else:
        module = next(m for path in _HEADS_INTO if (m := _submodule(block, path)) is not None)
    saved = {}
    if head is None:
        handle = module.register_forward_hook(lambda m, args, out: saved.setdefault("x", out))
    else:
        handle = module.register_forward_pre_hook(lambda m, args: saved.setdefault("x", args[0]))
    hf(xc)
    handle.remove()
    cf = saved["x"]
    if head is None:
        handle = module.register_forward_hook(lambda m, args, out: cf)
    else:
        columns = slice(head * d_head, (head + 1) * d_head)

        def patch(m, args):
            x = args[0].clone()
            x[..., columns] = cf[..., columns]
            return (x,)
        handle = module.register_forward_pre_hook(patch)
    try:
        return hf(xr).logits
    finally:
        handle.remove()


def _submodule(module, path: str):
    for part in path.split("."):
        module = getattr(module, part, None)
        if module is None:
            return None
    return module


def test_node_removals_equal_the_hf_models_own_patched_runs(saved):
    """Each head of the last layer and each MLP removed: the engine on the loaded model (float32)
    equals the Hugging Face model patched by hooks on its own modules (the output projection's
    input columns of that head; the MLP's output after its norm)."""
    family, _, folder = saved
    hf = tr.AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager").eval()
    model = load_model(str(folder))
    xr, xc = _tokens()
    hyps, want = [], []
    with torch.no_grad():
        clean = hf(xr).logits
        for head in range(model.cfg.n_heads):
            hyps.append(Hypothesis(f"~a1.{head}", f"~a1.{head}"))
            want.append(_hf_patched(hf, xr, xc, 1, head, model.cfg.d_head))
        for layer in range(model.cfg.n_layers):
            hyps.append(Hypothesis(f"~m{layer}", f"~m{layer}"))
            want.append(_hf_patched(hf, xr, xc, layer, None, model.cfg.d_head))
        outs, cgs = _engine(model, hyps, xr, xc)
    for h, out, ref, cg in zip(hyps, outs, want, cgs, strict=True):
        assert cg.n_mixed > 0, h.name  # a real recomputation, not a cached run
        assert (ref - clean).abs().max() > 0.01, h.name  # a real patch
        torch.testing.assert_close(out, ref, atol=5e-5, rtol=5e-5,
                                   msg=lambda m, h=h: f"{family}, {h.name}: {m}")


def test_equal_inputs_give_the_clean_run_and_bfloat16_runs(saved):
    from pathpatch.data.pairs import PairDataset

    family, _, folder = saved
    model = load_model(str(folder), dtype=torch.float64)
    xr, _ = _tokens(2)
    hyps = [Hypothesis("~a1.*", "~a1.*"), Hypothesis("remove", "remove(a0.2->a1.1.k)")]
    outs, cgs = _engine(model, hyps, xr, xr.clone())
    for cg, out in zip(cgs, outs, strict=True):
        assert cg.n_mixed > 0
        torch.testing.assert_close(out, model(xr), rtol=1e-10, atol=1e-10)
    data = PairDataset(xr, _tokens(3)[0], torch.ones_like(xr, dtype=torch.bool))
    low = load_model(str(folder), dtype=torch.bfloat16)
    rows = evaluate(low, data, hyps, "kl").to_pydict()
    exact = evaluate(load_model(str(folder)), data, hyps, "kl").to_pydict()
    assert all(torch.isfinite(torch.tensor(rows["ue"])))
    assert torch.allclose(torch.tensor(rows["ue"]), torch.tensor(exact["ue"]), rtol=0.2, atol=0.05)


def test_graph_follows_the_wiring():
    """A parallel model's MLPs read their layer's input: no edges from the same layer's heads."""
    hf = _random_hf(CONFIGS["gpt-neox (pythia), partial rotary, its rope_theta"]())
    sequential = _random_hf(CONFIGS["gpt-neox, sequential residual"]())
    import tempfile

    with tempfile.TemporaryDirectory() as a, tempfile.TemporaryDirectory() as b:
        hf.save_pretrained(a)
        sequential.save_pretrained(b)
        parallel_graph = Graph.from_model(load_model(a))
        sequential_graph = Graph.from_model(load_model(b))
    assert parallel_graph.parallel and not sequential_graph.parallel
    names = {str(e) for e in parallel_graph.edges}
    assert "a1.0->m1" not in names and "a0.0->m1" in names and "in->m0" in names
    assert "a1.0->m1" in {str(e) for e in sequential_graph.edges}
    # 4 heads x 2 layers: the parallel graph lacks the 4 same-layer head -> MLP edges per layer
    assert len(sequential_graph.edges) - len(parallel_graph.edges) == 2 * 4


@pytest.mark.parametrize(("config", "message"), [
    (lambda: tr.LlamaConfig(**SMALL, mlp_bias=True), "mlp_bias=True: biases inside a gated MLP"),
    (lambda: tr.LlamaConfig(**SMALL, rope_parameters={"rope_type": "yarn", "rope_theta": 1e4,
                                                      "factor": 2.0}),
     "rope_type='yarn': this rotary scaling"),
    (lambda: tr.MixtralConfig(**SMALL, num_local_experts=2),
     "MixtralForCausalLM is not supported: mixture-of-experts MLPs"),
    (lambda: tr.MambaConfig(vocab_size=61, hidden_size=32, num_hidden_layers=2),
     "MambaForCausalLM is not supported: not a transformer"),
    (lambda: tr.Gemma3TextConfig(**SMALL, head_dim=8, use_bidirectional_attention=True),
     "use_bidirectional_attention=True: bidirectional attention is not computed exactly"),
])
def test_what_is_not_computed_exactly_is_refused_by_name(config, message, tmp_path):
    folder = tmp_path / "gemma-or-llama"
    folder.mkdir()
    config().save_pretrained(folder)  # the config alone: refused before any weight is read
    with pytest.raises(PathPatchError, match=message):
        load_model(str(folder))


def test_an_edge_the_parallel_wiring_lacks_is_an_error_that_says_why():
    from tests.pathpatch.conftest import tiny_model

    graph = Graph.from_model(tiny_model("neox"))
    with pytest.raises(PathPatchError, match=r"a1\.0->m1 matches no edge.*an MLP reads its "
                                             r"layer's input, beside the heads"):
        Hypothesis("x", "remove(a1.0->m1)").compile(graph)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_weights_are_read_in_the_dtype_asked_for_never_through_a_narrower_one(dtype, tmp_path):
    """A float64 checkpoint loaded in float64 keeps its weights bit for bit (TransformerLens 3's
    path rounded them through float32: W_Q off by ~3e-8); one copy is held, in that dtype."""
    hf = _random_hf(CONFIGS["llama"]()).to(torch.float64)
    with torch.no_grad():  # bits a float32 cannot hold
        for p in hf.parameters():
            p.add_(torch.randn(p.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
                   * 1e-3)
    hf.save_pretrained(tmp_path)
    model = load_model(str(tmp_path), dtype=dtype)
    assert {p.dtype for p in model.parameters()} == {dtype}
    q = hf.model.layers[1].self_attn.q_proj.weight  # [(head, d_head), d_model]
    want = q.reshape(4, 12, 32).transpose(1, 2).to(dtype)  # [head, d_model, d_head]
    assert torch.equal(model.blocks[1].attn.W_Q, want)
    if dtype == torch.float64:
        assert not torch.equal(want, q.to(torch.float32).to(torch.float64).reshape(4, 12, 32)
                               .transpose(1, 2))  # the float32 detour would have changed it


def test_the_architecture_alone_is_read_from_config_json_without_weights(saved, tmp_path):
    """`load_architecture`: the same config, graph and parameter shapes as the loaded model,
    every parameter on the meta device, from a directory holding config.json only."""
    import shutil

    from pathpatch.model.graph import Graph
    from pathpatch.model.loading import load_architecture

    family, _, folder = saved
    alone = tmp_path / "config-only"
    alone.mkdir()
    shutil.copy(folder / "config.json", alone / "config.json")
    arch, model = load_architecture(str(alone)), load_model(str(folder))
    assert all(p.device.type == "meta" for p in arch.parameters())
    assert arch.cfg.replace(device="cpu") == model.cfg, family
    assert {n: p.shape for n, p in arch.named_parameters()} == {
        n: p.shape for n, p in model.named_parameters()}
    assert Graph.from_model(arch).edges == Graph.from_model(model).edges
