"""Every HookedTransformerConfig field classified, and each class checked: EXACT features against
TransformerLens's own activation patching, INERT fields by changing them, REFUSED values by their
errors (and, for the one the engine got wrong before, by how wrong it was)."""

import dataclasses
import re
from pathlib import Path

import pytest
import torch
import transformer_lens
from transformer_lens import HookedTransformer, HookedTransformerConfig
from transformer_lens.utilities.architectures import POST_NORM_ARCHITECTURES

import pathpatch.graph
from pathpatch.errors import PathPatchError
from pathpatch.graph import Graph
from pathpatch.hypotheses import Hypothesis
from pathpatch.positions import PositionContext
from pathpatch.runs import Runs
from pathpatch.stacking import evaluate_logits
from pathpatch.support import _RENAMED_FORWARD, FIELDS, Support, check_supported
from tests.pathpatch.test_engine import _edge_hook_run

B, T = 3, 6
BASE = dict(n_layers=3, n_heads=2, d_model=8, d_head=4, n_ctx=16, d_vocab=7, d_mlp=12, act_fn="gelu",
            normalization_type="LN", dtype=torch.float64)


def _model(**overrides) -> HookedTransformer:
    """A float64 model whose every parameter (norm weights and biases included) is random."""
    cfg = HookedTransformerConfig(**{**BASE, "seed": 0, **overrides})
    # TransformerLens's MoE builds its nn.Linear layers in float32 whatever cfg.dtype says (its own
    # float64 forward fails): cast every parameter
    model = HookedTransformer(cfg).to(torch.float64)
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
    """TransformerLens activation patching: the clean run with one activation from x_c."""
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
    "relu2": dict(act_fn="relu2"),
    "xielu": dict(act_fn="xielu"),
    "attention-only, LayerNorm": dict(attn_only=True),
    "attention-only, no norm": dict(attn_only=True, normalization_type=None),
    "final_rms over LayerNorm": dict(final_rms=True),
    "final_rms over LNPre": dict(normalization_type="LNPre", final_rms=True),
    "gated MLP": dict(normalization_type="RMS", gated_mlp=True, act_fn="silu"),
    "SoLU with its LayerNorm": dict(act_fn="solu_ln"),
    "SoLU": dict(act_fn="solu"),
    "mixture of experts": dict(normalization_type="RMS", act_fn="silu", num_experts=3, experts_per_token=2),
    "mixture of experts, normalized top-k": dict(act_fn="silu", num_experts=3, experts_per_token=2,
                                                 norm_topk_prob=True),
    "GPT-OSS mixture of experts": dict(normalization_type="RMS", original_architecture="GptOssForCausalLM",
                                       num_experts=3, experts_per_token=2),
    "no attention scale": dict(use_attn_scale=False),
    "custom attention scale": dict(attn_scale=2.5),
    "attention scale by inverse layer": dict(scale_attn_by_inverse_layer_idx=True),
    "d_vocab_out != d_vocab": dict(d_vocab_out=5),
    "n_heads * d_head != d_model": dict(d_head=6),
    "large eps": dict(eps=0.5),
    "post-embedding LayerNorm": dict(post_embedding_ln=True),
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
    "rotary, dynamic NTK past train_seq_length": dict(
        positional_embedding_type="rotary", rotary_dim=4, use_dynamic_ntk_rope=True,
        train_seq_length=4),
    "rotary, YaRN": dict(positional_embedding_type="rotary", rotary_dim=4, use_yarn_rope=True,
                         yarn_factor=2.0, yarn_attention_factor=1.2, yarn_beta_fast=16.0,
                         yarn_beta_slow=2.0, yarn_original_max_position_embeddings=8,
                         yarn_truncate=False),
    # local attention: the model's own window mask per layer
    "local attention, window 2 in layers 0 and 2": dict(
        use_local_attn=True, window_size=2, attn_types=["local", "global", "local"]),
    "local attention + rotary, its own base": dict(
        use_local_attn=True, window_size=3, attn_types=["global", "local", "local"],
        positional_embedding_type="rotary", rotary_dim=4, rotary_base_local=50),
    "YaRN on global layers only": dict(
        use_local_attn=True, window_size=3, attn_types=["local", "global", "local"],
        positional_embedding_type="rotary", rotary_dim=4, use_yarn_rope=True, yarn_factor=2.0,
        yarn_original_max_position_embeddings=8, yarn_global_attn_only=True),
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
    # norms after the sublayers: the attention's acts on the sum of the layer's heads
    # (TransformerLens builds them for RMS norms only: "LN" fails in its block)
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


def test_every_activation_and_norm_transformer_lens_offers_is_checked():
    from transformer_lens.utilities.activation_functions import SUPPORTED_ACTIVATIONS

    checked = {f.get("act_fn", BASE["act_fn"]) for f in FEATURES.values()}
    assert set(SUPPORTED_ACTIVATIONS) <= checked, "new activations: add them to FEATURES"
    norms = {f.get("normalization_type", BASE["normalization_type"]) for f in FEATURES.values()}
    assert norms == {"LN", "LNPre", "RMS", "RMSPre", None}


def test_every_transformer_lens_config_field_is_classified():
    fields = {f.name for f in dataclasses.fields(HookedTransformerConfig)}
    assert sorted(fields - set(FIELDS)) == [], "new TransformerLens options: classify them in support.py"
    assert sorted(set(FIELDS) - fields) == [], "options TransformerLens no longer has"
    counts = {s: sum(r.support is s for r in FIELDS.values()) for s in Support}
    assert all(counts.values()) and sum(counts.values()) == len(fields)
    for name, rule in FIELDS.items():
        assert rule.why, name
        assert (rule.accepts is not None) == (rule.support is Support.REFUSED), name


def test_architecture_names_that_change_the_forward_are_classified():
    """TransformerLens components that branch on original_architecture: each name is refused or
    changes only the MLP module (called as built)."""
    root = Path(transformer_lens.__file__).parent
    named = set()
    for path in [*root.glob("components/**/*.py"), *root.glob("factories/*.py")]:
        lines = path.read_text().splitlines()
        for i, line in enumerate(lines):
            if "original_architecture" in line:
                named |= set(re.findall(r"[\"'](\w+For\w+)[\"']", "\n".join(lines[i:i + 8])))
    named |= POST_NORM_ARCHITECTURES  # the blocks' `in POST_NORM_ARCHITECTURES`
    mlp_only = {"GptOssForCausalLM"}
    assert named >= set(_RENAMED_FORWARD) | mlp_only  # the scan sees what it should
    assert named - set(_RENAMED_FORWARD) - mlp_only == set()


def _cfg(**overrides) -> HookedTransformerConfig:
    return HookedTransformerConfig(**{**BASE, **overrides})


REFUSED_VALUES = {
    "positional_embedding_type": "alibi",
    "use_attention_sinks": True,
    "use_logn_attn": True,
    "clip_qkv": 8.0,
    "attention_dir": "bidirectional",
    "load_in_4bit": True,
    "n_devices": 2,
    "original_architecture": "Olmo2ForCausalLM",
}


def test_every_refused_field_has_a_refused_value_that_names_it():
    refused = {name for name, rule in FIELDS.items() if rule.support is Support.REFUSED}
    assert set(REFUSED_VALUES) == refused
    check_supported(_cfg())  # the defaults are accepted
    for name, value in REFUSED_VALUES.items():
        cfg = _cfg()
        setattr(cfg, name, value)
        with pytest.raises(PathPatchError) as err:
            check_supported(cfg)
        message = str(err.value)
        assert f"{name}={value!r}" in message and "supported:" in message, message
        assert FIELDS[name].why in message


def test_disabled_soft_caps_are_accepted():
    check_supported(_cfg(attn_scores_soft_cap=0.0, output_logits_soft_cap=-1.0))


# models the engine computed wrongly before they were refused (issue 12): bypassing the check
# shows the refusal is needed, and `Graph.from_model` refuses them by name
WRONG_BEFORE = {
    "original_architecture": dict(original_architecture="Olmo2ForCausalLM", normalization_type="RMS"),
}


@pytest.mark.parametrize("field", list(WRONG_BEFORE))
def test_features_the_engine_gets_wrong_are_refused(field, monkeypatch):
    model = _model(**WRONG_BEFORE[field])
    with pytest.raises(PathPatchError, match=f"unsupported model architecture: {field}="):
        Graph.from_model(model)
    monkeypatch.setattr(pathpatch.graph, "check_model", lambda model: None)
    xr, xc = _tokens(model)
    _, cf_cache = model.run_with_cache(xc)
    (out,), _ = _engine(model, [Hypothesis("~a0.0", "~a0.0")], xr, xc)
    want = _patched(model, xr, cf_cache, "blocks.0.attn.hook_z", 0)
    assert (out - want).abs().max().item() > 1e-3


# a value other than the default for every INERT field; None: cannot be changed offline here
INERT_VALUES = {
    "ungroup_grouped_query_attention": True,
    "relative_attention_max_distance": 8, "relative_attention_num_buckets": 4, "decoder_start_token_id": 0,
    "tie_word_embeddings": True, "quantization_method": "bitsandbytes", "use_attn_result": True,
    "use_split_qkv_input": True, "use_attn_in": True, "use_hook_mlp_in": True, "use_hook_tokens": True,
    "device": None, "default_prepend_bos": False, "tokenizer_prepends_bos": True, "tokenizer_name": None,
    "trust_remote_code": True, "model_name": "other", "from_checkpoint": True, "checkpoint_index": 3,
    "checkpoint_label_type": "step", "checkpoint_value": 100, "n_params": 1, "init_mode": "xavier_normal",
    "initializer_range": 0.5, "init_weights": False, "seed": 7, "uses_rms_norm": True,
    "layer_norm_folding": True,
}
# device: this machine has only a CPU; tokenizer_name: loading one needs the hub


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
        model = HookedTransformer(_cfg(**{name: value})).to(torch.float64)
        assert getattr(model.cfg, name) == value or name == "n_params", name
        model.load_state_dict(base.state_dict())
        torch.testing.assert_close(model.eval()(xr), want, rtol=1e-12, atol=1e-12,
                                   msg=lambda m, n=name: f"{n}: {m}")
        Graph.from_model(model)  # and accepted
        changed += 1
    assert changed >= len(INERT_VALUES) - 2


def test_an_unexamined_transformer_lens_option_is_refused_unless_at_its_default():
    @dataclasses.dataclass
    class NewerConfig(HookedTransformerConfig):
        brand_new_option: bool = False

    check_supported(NewerConfig(**BASE))
    with pytest.raises(PathPatchError, match="brand_new_option=True: .*not examined"):
        check_supported(NewerConfig(**BASE, brand_new_option=True))


@pytest.mark.parametrize("feature", ["gated MLP", "RMSPre, gelu_new (fused GELU)", "mixture of experts"])
def test_cached_runs_equal_transformer_lens_runs_and_leave_the_model_as_it_was(feature):
    """The cached runs compute MLPs through the adapter's products, not the modules' forwards
    (which copy weights): every kept activation and the logits equal TransformerLens's own run."""
    from pathpatch.arch import Adapter

    model = _model(**FEATURES[feature])
    xr, _ = _tokens(model)
    arch = Adapter.of(model)
    logits, cache = arch.run(xr)
    want_logits, want = model.run_with_cache(xr)
    assert set(cache) == arch.run_hooks()
    for name, act in cache.items():
        torch.testing.assert_close(act, want[name], rtol=1e-10, atol=1e-10, msg=name)
    torch.testing.assert_close(logits, want_logits, rtol=1e-10, atol=1e-10)
    assert all("forward" not in vars(block.mlp) for block in model.blocks)  # the classes' again


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
