"""Every ModelConfig field classified, and each class checked: EXACT features against activation
patching by hooks (TransformerLens 4's hook machinery on the model), INERT fields by changing them,
REFUSED values by their errors; every architecture TransformerLens 4's bridge supports classified."""

import dataclasses
import re
from pathlib import Path

import pytest
import torch

from pathpatch.engine.group_evaluation import evaluate_logits
from pathpatch.engine.positions import PositionContext
from pathpatch.engine.runs import Runs
from pathpatch.errors import PathPatchError
from pathpatch.language.hypotheses import Hypothesis
from pathpatch.model import families
from pathpatch.model.config import ACTIVATIONS, NORMALIZATIONS, ModelConfig
from pathpatch.model.graph import Graph
from pathpatch.model.support import FIELDS, Support, check_supported
from pathpatch.model.transformer import Transformer
from tests.pathpatch.test_engine import _edge_hook_run

B, T = 3, 6
BASE = dict(n_layers=3, n_heads=2, d_model=8, d_head=4, n_ctx=16, d_vocab=7, d_mlp=12, act_fn="gelu",
            normalization_type="LN", dtype=torch.float64)


def _model(**overrides) -> Transformer:
    """A float64 model whose every parameter (norm weights and biases included) is random."""
    cfg = ModelConfig(**{**BASE, **overrides})
    model = Transformer(cfg, init=False)
    gen = torch.Generator().manual_seed(0)
    scale = 0.7 if cfg.normalization_type else 0.3  # without norms, larger weights saturate softmax
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64) * scale)
    return model.eval()


def _tokens(model):
    gen = torch.Generator().manual_seed(1)
    return [torch.randint(0, model.cfg.d_vocab, (B, T), generator=gen) for _ in range(2)]


def _engine(model, hypotheses, xr, xc):
    graph = Graph.from_model(model)
    copy_graphs = [h.compile(graph) for h in hypotheses]
    outs = evaluate_logits(model, graph, copy_graphs, Runs(model, xr, xc),
                           PositionContext({}, B, T, xr.device))
    return outs, copy_graphs


def _patched(model, xr, cf_cache, hook_name: str, head: int | None = None) -> torch.Tensor:
    """Activation patching by hooks: the clean run with one activation from x_c."""
    fired = []

    def hook(x, hook):
        fired.append(hook_name)
        if head is None:
            return cf_cache[hook_name]
        x = x.clone()
        x[:, :, head] = cf_cache[hook_name][:, :, head]  # [batch, pos, head, d_head]
        return x

    logits = model.run_with_hooks(xr, fwd_hooks=[(hook_name, hook)])
    assert fired == [hook_name]
    return logits


# Every accepted feature class, each on top of BASE (a GPT-2-style block: LayerNorm, GELU MLP)
FEATURES = {
    "LayerNorm, GELU MLP": {},
    "LNPre, ReLU": dict(normalization_type="LNPre", act_fn="relu"),
    "RMSNorm, SiLU": dict(normalization_type="RMS", act_fn="silu"),
    "RMSPre, gelu_new (fused GELU)": dict(normalization_type="RMSPre", act_fn="gelu_new"),
    "no norm, gelu_fast": dict(normalization_type=None, act_fn="gelu_fast"),
    "gelu_pytorch_tanh": dict(act_fn="gelu_pytorch_tanh"),
    "attention-only, LayerNorm": dict(attn_only=True),
    "attention-only, no norm": dict(attn_only=True, normalization_type=None),
    "final_rms over LayerNorm": dict(final_rms=True),
    "final_rms over LNPre": dict(normalization_type="LNPre", final_rms=True),
    "gated MLP": dict(normalization_type="RMS", gated_mlp=True, act_fn="silu"),
    "no attention scale": dict(use_attn_scale=False),
    "custom attention scale": dict(attn_scale=2.5),
    "attention scale by inverse layer": dict(scale_attn_by_inverse_layer_idx=True),
    "d_vocab_out != d_vocab": dict(d_vocab_out=5),
    "n_heads * d_head != d_model": dict(d_head=6),
    "large eps": dict(eps=0.5),
    "n_key_value_heads = n_heads": dict(n_key_value_heads=2),
    # rotary embeddings: TransformerLens's own tables, rotated by the model's apply_rotary
    "rotary, NeoX half-split": dict(positional_embedding_type="rotary", rotary_dim=4),
    "rotary, partial rotary_dim": dict(positional_embedding_type="rotary", rotary_dim=2),
    "rotary, GPT-J adjacent pairs": dict(positional_embedding_type="rotary", rotary_dim=4,
                                         rotary_adjacent_pairs=True),
    "rotary, other base": dict(positional_embedding_type="rotary", rotary_dim=4, rotary_base=100),
    "rotary, Llama-3 NTK-by-parts": dict(
        positional_embedding_type="rotary", rotary_dim=4, use_NTK_by_parts_rope=True,
        NTK_by_parts_factor=8.0, NTK_by_parts_low_freq_factor=1.0,
        NTK_by_parts_high_freq_factor=4.0, NTK_original_ctx_len=8),
    "rotary, linear scaling": dict(positional_embedding_type="rotary", rotary_dim=4,
                                   rotary_scaling_factor=2.0),
    # local attention: the model's own window mask per layer
    "local attention, window 2 in layers 0 and 2": dict(
        use_local_attn=True, window_size=2, attn_types=["local", "global", "local"]),
    "local attention + rotary, its own base": dict(
        use_local_attn=True, window_size=3, attn_types=["global", "local", "local"],
        positional_embedding_type="rotary", rotary_dim=4, rotary_base_local=50),
    # Gemma-2's soft caps (small caps, so that they bite on these random weights)
    "attention soft cap": dict(attn_scores_soft_cap=1.5),
    "output logit soft cap": dict(output_logits_soft_cap=2.0),
    "both soft caps, local attention, rotary": dict(
        attn_scores_soft_cap=1.5, output_logits_soft_cap=2.0, use_local_attn=True, window_size=2,
        attn_types=["local", "global", "local"], positional_embedding_type="rotary",
        rotary_dim=4),
    # q/k norms inside each head
    "q/k norms": dict(normalization_type="RMS", use_qk_norm=True),
    "Qwen3-like (q/k norms, rotary, GQA)": dict(
        normalization_type="RMS", gated_mlp=True, act_fn="silu", use_qk_norm=True,
        positional_embedding_type="rotary", rotary_dim=4, n_heads=4, n_key_value_heads=2),
    # wiring and grouped-query attention
    "parallel attention + MLP": dict(parallel_attn_mlp=True),
    "grouped-query attention": dict(n_heads=4, n_key_value_heads=2),
    "multi-query attention": dict(n_heads=4, n_key_value_heads=1),
    "Llama-like (RMS, gated SiLU, rotary, GQA)": dict(
        normalization_type="RMS", gated_mlp=True, act_fn="silu", positional_embedding_type="rotary",
        rotary_dim=4, n_heads=4, n_key_value_heads=2, final_rms=True),
    "GPT-NeoX-like (parallel, partial rotary)": dict(
        parallel_attn_mlp=True, positional_embedding_type="rotary", rotary_dim=2),
    "local attention + rotary, linear scaling of global layers": dict(
        use_local_attn=True, window_size=3, attn_types=["global", "local", "local"],
        positional_embedding_type="rotary", rotary_dim=4, rotary_base_local=50,
        rotary_scaling_factor=2.0),
    "layers without rotation (SmolLM3)": dict(
        positional_embedding_type="rotary", rotary_dim=4, rotary_layers=[True, False, True]),
    # norms after the sublayers: the attention's acts on the sum of the layer's heads
    "norms after attention and MLP, RMSPre before": dict(use_normalization_before_and_after=True,
                                                         normalization_type="RMSPre"),
    "norms after attention and MLP, parallel": dict(use_normalization_before_and_after=True,
                                                    normalization_type="RMS", parallel_attn_mlp=True),
    "Gemma-2-like (post-norms, gated tanh-GELU, rotary, GQA, windows, caps)": dict(
        normalization_type="RMS", use_normalization_before_and_after=True, gated_mlp=True,
        act_fn="gelu_pytorch_tanh", positional_embedding_type="rotary", rotary_dim=4, n_heads=4,
        n_key_value_heads=2, use_local_attn=True, window_size=2,
        attn_types=["local", "global", "local"], attn_scale=3.0, attn_scores_soft_cap=1.5,
        output_logits_soft_cap=2.0, final_rms=True),
    "Gemma-3-like (q/k norms per head, local rotary base, post-norms, GQA, windows)": dict(
        normalization_type="RMS", use_normalization_before_and_after=True, gated_mlp=True,
        act_fn="gelu_pytorch_tanh", positional_embedding_type="rotary", rotary_dim=4, n_heads=4,
        n_key_value_heads=2, use_local_attn=True, window_size=2, use_qk_norm=True,
        attn_types=["local", "local", "global"], rotary_base_local=10.0, rotary_base=1000.0,
        attn_scale=3.0, final_rms=True),
    "norms after the sublayers only (OLMo-2's layout, q/k norms per head)": dict(
        normalization_type="RMS", post_norm_only=True, gated_mlp=True, act_fn="silu",
        positional_embedding_type="rotary", rotary_dim=4, use_qk_norm=True),
    "norms after the sublayers only, LayerNorm": dict(post_norm_only=True),
    "OLMo-2-like (norms after only, q/k norms over all heads, GQA)": dict(
        normalization_type="RMS", post_norm_only=True, gated_mlp=True, act_fn="silu",
        positional_embedding_type="rotary", rotary_dim=4, use_qk_norm=True,
        qk_norm_over_heads=True, n_heads=4, n_key_value_heads=2),
    "q/k norms over all heads, with a norm before the heads": dict(
        normalization_type="RMS", use_qk_norm=True, qk_norm_over_heads=True),
}
EDGES = ("in->a1.0.k", "a0.1->a2.1.q", "in->a2.0.v")


@pytest.mark.parametrize("feature", list(FEATURES))
def test_accepted_feature_matches_transformer_lens_patching(feature):
    """Removing a head in each layer (and each MLP) equals TransformerLens patching its hook_z
    (hook_mlp_out) from x_c; single-edge removals equal a hook on the receiver's split input."""
    model = _model(**FEATURES[feature])
    xr, xc = _tokens(model)
    _, cf_cache = model.run_with_cache(xc)
    hyps, want = [], []
    for layer in range(model.cfg.n_layers):
        for head in range(model.cfg.n_heads):
            hyps.append(Hypothesis(f"~a{layer}.{head}", f"~a{layer}.{head}"))
            want.append(_patched(model, xr, cf_cache, f"blocks.{layer}.attn.hook_z", head))
        if not model.cfg.attn_only:
            hyps.append(Hypothesis(f"~m{layer}", f"~m{layer}"))
            want.append(_patched(model, xr, cf_cache, f"blocks.{layer}.hook_mlp_out"))
    graph = Graph.from_model(model)
    for name in EDGES:
        edge = next(e for e in graph.edges if str(e) == name)
        hyps.append(Hypothesis(f"remove {name}", f"remove({name})"))
        want.append(_edge_hook_run(model, edge, xr, xc))
    outs, cgs = _engine(model, hyps, xr, xc)
    clean = model(xr)
    for h, cg, out, ref in zip(hyps, cgs, outs, want, strict=True):
        assert cg.n_mixed > 0, h.name  # a real recomputation, not a cached run
        assert not torch.allclose(ref, clean, rtol=1e-7, atol=1e-7), h.name  # and a real patch
        torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10, msg=lambda m, h=h: f"{h.name}: {m}")


def test_every_activation_and_norm_the_model_offers_is_checked():
    checked = {f.get("act_fn", BASE["act_fn"]) for f in FEATURES.values()}
    assert set(ACTIVATIONS) <= checked, "new activations: add them to FEATURES"
    norms = {f.get("normalization_type", BASE["normalization_type"]) for f in FEATURES.values()}
    assert norms == set(NORMALIZATIONS)


def test_every_model_config_field_is_classified():
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    assert sorted(fields - set(FIELDS)) == [], "new ModelConfig options: classify them in support.py"
    assert sorted(set(FIELDS) - fields) == [], "options ModelConfig no longer has"
    counts = {s: sum(r.support is s for r in FIELDS.values()) for s in Support}
    assert counts[Support.EXACT] and counts[Support.INERT] and sum(counts.values()) == len(fields)
    for name, rule in FIELDS.items():
        assert rule.why, name
        assert (rule.accepts is not None) == (rule.support is Support.REFUSED), name


def test_every_option_of_each_familys_hf_config_is_classified():
    """A newer transformers' option of a family computed here fails this test until it is mapped,
    refused or shown inert in `families.HF_CONFIG_FIELDS`."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    from tests.pathpatch.test_hf import CONFIGS

    configs = [CONFIG_MAPPING[model_type]() for model_type in families.FAMILIES]
    configs += [make() for make in CONFIGS.values()]
    unclassified = {(c.model_type, key) for c in configs for key in c.to_dict()
                    if key not in families.HF_CONFIG_FIELDS}
    assert sorted(unclassified) == []
    kinds = {why.split(":")[0] for why in families.HF_CONFIG_FIELDS.values()}
    assert kinds == {"mapped", "refused", "inert", "read through the weights"}


def test_every_architecture_the_bridge_supports_is_computed_or_refused_by_name():
    """TransformerLens 4's registry of bridge architectures: each one is a family pathpatch
    computes, or refused with its reason before any weights load."""
    from transformer_lens.factories.architecture_adapter_factory import SUPPORTED_ARCHITECTURES

    bridge = set(SUPPORTED_ARCHITECTURES)
    classified = set(families.COMPUTED) | set(families.REFUSED)
    assert sorted(bridge - classified) == [], "new bridge architectures: classify them in families.py"
    assert not set(families.COMPUTED) & set(families.REFUSED)
    assert set(families.COMPUTED.values()) <= set(families.FAMILIES)
    for name in families.REFUSED:
        message = families.refusal_of(name)
        assert name in message and families.REFUSED[name] in message and "gemma2" in message
    for name in ("MambaForCausalLM", "RwkvForCausalLM", "JambaForCausalLM", "BertForMaskedLM",
                 "T5ForConditionalGeneration", "LlavaForConditionalGeneration", "MixtralForCausalLM"):
        assert families.refusal_of(name) is not None, name


def _cfg(**overrides) -> ModelConfig:
    return ModelConfig(**{**BASE, **overrides})


# values a model cannot be built with: refused by name when the config is made (a checkpoint
# JSON of TransformerLens 3 fields included), before any weight is read
REFUSED_CONFIGS = {
    "normalization_type='LNPost'": dict(normalization_type="LNPost"),
    "positional_embedding_type='alibi'": dict(positional_embedding_type="alibi"),
    "an MLP needs d_mlp and act_fn": dict(act_fn="solu"),
    "n_heads=3 is not a multiple of n_key_value_heads=2": dict(n_heads=3, n_key_value_heads=2),
    "local attention needs window_size": dict(use_local_attn=True, attn_types=["local"] * 3),
}
REFUSED_TL3_VALUES = {"use_attention_sinks": True, "num_experts": 8, "use_yarn_rope": True,
                      "clip_qkv": 8.0, "post_embedding_ln": True}


def test_what_the_model_cannot_build_is_refused_by_name():
    assert not [name for name, rule in FIELDS.items() if rule.support is Support.REFUSED]
    check_supported(_cfg())  # the defaults are accepted
    for phrase, overrides in REFUSED_CONFIGS.items():
        with pytest.raises(PathPatchError, match="invalid model config") as err:
            _cfg(**overrides)
        assert phrase in str(err.value), str(err.value)
    for name, value in REFUSED_TL3_VALUES.items():
        with pytest.raises(PathPatchError, match=f"unsupported model architecture: {name}="):
            ModelConfig.from_dict({**BASE, name: value})
    fields = {k: v for k, v in BASE.items() if k != "dtype"}
    assert ModelConfig.from_dict({**fields, "use_attention_sinks": False}) == ModelConfig.from_dict(fields)


def test_disabled_soft_caps_are_accepted():
    check_supported(_cfg(attn_scores_soft_cap=0.0, output_logits_soft_cap=-1.0))


# a value other than the default for every INERT field; None: cannot be changed offline here
INERT_VALUES = {"original_architecture": "SomethingForCausalLM", "device": None}
# device: this machine has only a CPU


def test_inert_fields_do_not_change_the_forward_pass():
    inert = {name for name, rule in FIELDS.items() if rule.support is Support.INERT}
    assert set(INERT_VALUES) == inert
    base = _model()
    xr, _ = _tokens(base)
    want = base(xr)
    changed = 0
    for name, value in INERT_VALUES.items():
        if value is None:
            continue
        model = Transformer(_cfg(**{name: value}), init=False)
        assert getattr(model.cfg, name) == value, name
        model.load_state_dict(base.state_dict())
        torch.testing.assert_close(model.eval()(xr), want, rtol=1e-12, atol=1e-12,
                                   msg=lambda m, n=name: f"{n}: {m}")
        Graph.from_model(model)  # and accepted
        changed += 1
    assert changed >= len(INERT_VALUES) - 1


def test_an_unexamined_model_option_is_refused_unless_at_its_default():
    @dataclasses.dataclass(frozen=True)
    class NewerConfig(ModelConfig):
        brand_new_option: bool = False

    check_supported(NewerConfig(**BASE))
    with pytest.raises(PathPatchError, match="brand_new_option=True: .*not examined"):
        check_supported(NewerConfig(**BASE, brand_new_option=True))


GEMMA2 = "Gemma-2-like (post-norms, gated tanh-GELU, rotary, GQA, windows, caps)"


@pytest.mark.parametrize("feature", ["gated MLP", "RMSPre, gelu_new (fused GELU)", GEMMA2])
def test_cached_runs_keep_exactly_their_hooks_and_the_model_logits(feature):
    """The cached runs keep `run_hooks` and nothing else; `unembed`'s logits equal the
    model's own forward."""
    from pathpatch.model.adapter import Adapter

    model = _model(**FEATURES[feature])
    xr, _ = _tokens(model)
    arch = Adapter.of(model)
    logits, cache = arch.run(xr)
    want_logits, want = model.run_with_cache(xr)
    assert set(cache) == arch.run_hooks()
    for name, act in cache.items():
        torch.testing.assert_close(act, want[name], rtol=1e-10, atol=1e-10, msg=name)
    torch.testing.assert_close(logits, want_logits, rtol=1e-10, atol=1e-10)


def test_hooks_left_on_a_model_are_refused():
    model = _model()
    model.blocks[0].attn.hook_z.add_hook(lambda z, hook: z * 0, is_permanent=True)
    with pytest.raises(PathPatchError, match=r"forward hooks attached at blocks\.0\.attn\.hook_z"):
        Graph.from_model(model)
    model.reset_hooks(including_permanent=True)
    Graph.from_model(model)


def test_docs_list_every_field_with_its_class():
    text = (Path(__file__).parents[2] / "docs" / "MODELS.md").read_text()
    listed = dict(re.findall(r"^\| `(\w+)` \| (\w+) \|", text, flags=re.M))
    assert listed == {name: rule.support.name.lower() for name, rule in FIELDS.items()}
    counts = {s: sum(r.support is s for r in FIELDS.values()) for s in Support}
    for support, n in counts.items():
        assert f"**{support.name.lower()} ({n})**" in text
    assert f"({len(FIELDS)} fields)" in text


def test_the_norm_over_heads_a_few_rows_at_a_time_equals_all_at_once(monkeypatch):
    """OLMo-2's q/k norm over all heads bounds its transient by projecting a few rows at a time:
    one row at a time gives the same logits as all at once."""
    import pathpatch.engine.group_evaluation

    model = _model(**FEATURES["OLMo-2-like (norms after only, q/k norms over all heads, GQA)"])
    xr, xc = _tokens(model)
    hyps = [Hypothesis("~a1.0", "~a1.0"), Hypothesis("remove", f"remove({EDGES[0]}, {EDGES[1]})")]
    whole, cgs = _engine(model, hyps, xr, xc)
    monkeypatch.setattr(pathpatch.engine.group_evaluation, "_NORM_CHUNK_BYTES", 1)
    one_by_one, _ = _engine(model, hyps, xr, xc)
    for a, b, cg in zip(whole, one_by_one, cgs, strict=True):
        assert cg.n_mixed > 0
        torch.testing.assert_close(a, b, rtol=0, atol=0)
