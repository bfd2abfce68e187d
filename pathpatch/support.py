"""Which TransformerLens models the engine computes exactly: every `HookedTransformerConfig` field,
classified, and every value the engine would get wrong refused by name.

The engine recomputes part of a model's forward pass itself (attention from the q/k/v inputs to
z, each block's first norm folded into the projections, the residual stream as a sum of node
outputs, the unembedding) and calls TransformerLens's own modules for the rest (MLPs, the second
and final norms). A field that changes a recomputed part is either reproduced (EXACT) or accepted
only at the values the engine reproduces (REFUSED: any other value is an error before any work).
A field that only tokenization, loading, initialization, hooks or an already refused feature
reads is INERT. `tests/pathpatch/test_support.py` fails when TransformerLens has a field this
table does not classify, and checks each class: EXACT features against TransformerLens's own
activation patching, INERT fields by changing them, REFUSED values by their errors.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pathpatch.errors import PathPatchError


class Support(enum.Enum):
    EXACT = "computed exactly"
    """The engine reads the field (or calls the module it configures) and reproduces it."""
    REFUSED = "refused except at supported values"
    """The supported values are computed exactly; every other value is refused by name."""
    INERT = "does not affect the forward pass"
    """Read only by tokenization, loading, initialization, hook points, or a refused feature."""


@dataclass(frozen=True)
class Rule:
    """How the engine treats one config field."""

    support: Support
    why: str
    """What the field does and why the engine computes, refuses or ignores it."""
    supported: str = ""
    """REFUSED only: the values that are computed exactly, for the error message."""
    accepts: Callable[[Any, Any], bool] | None = None
    """REFUSED only: (value, cfg) -> whether the engine computes this value exactly."""


def _exact(why: str) -> Rule:
    return Rule(Support.EXACT, why)


def _inert(why: str) -> Rule:
    return Rule(Support.INERT, why)


def _only(supported: str, accepts: Callable[[Any, Any], bool], why: str) -> Rule:
    return Rule(Support.REFUSED, why, supported, accepts)


def _off(why: str) -> Rule:
    return _only("False", lambda value, cfg: not value, why)


_ROTARY = ("the rotary tables TransformerLens computes: the engine rotates q and k rows with the "
           "model's own apply_rotary, each by its position")
# Architectures whose forward TransformerLens changes by name (components/, utilities/architectures.py);
# another name changes at most the MLP module (GptOssForCausalLM), which the engine calls as built
_RENAMED_FORWARD = {
    "Olmo2ForCausalLM": "post-norm blocks and q/k norms over all heads",
    "Olmo3ForCausalLM": "post-norm blocks and q/k norms over all heads",
    "OlmoeForCausalLM": "q/k norms over all heads",
}

FIELDS: dict[str, Rule] = {
    # shapes: the engine reads every weight at its own shape
    "d_model": _exact("residual width"),
    "d_head": _exact("head width (d_head * n_heads may differ from d_model)"),
    "n_layers": _exact("layers of the graph"),
    "n_heads": _exact("heads per layer of the graph"),
    "d_mlp": _exact("MLP width (the MLP module is called as built)"),
    "d_vocab": _exact("embedding rows"),
    "d_vocab_out": _exact("unembedding columns"),
    "n_ctx": _exact("positional embedding rows; the positional embedding is equal in both runs"),
    "attn_only": _exact("the graph has no MLP nodes"),
    # norms
    "normalization_type": _exact(
        "LN, LNPre, RMS, RMSPre: ln1 folded into q/k/v (folding.py), ln2 and ln_final called as "
        "modules; None: identity"),
    "eps": _exact("read from each norm module"),
    "final_rms": _exact("ln_final is called as the module TransformerLens builds"),
    "post_embedding_ln": _exact(
        "a norm of the token embedding alone, before the positional embedding is added: part of "
        "`in`'s own output (hook_embed is after it)"),
    # MLPs: one node, its module called as built
    "act_fn": _exact("the MLP module is called (gelu_new, gelu_pytorch_tanh: torch's equal fused GELU)"),
    "gated_mlp": _exact("the gated MLP module is called"),
    "num_experts": _exact("the mixture-of-experts module is called per token"),
    "experts_per_token": _exact("read by the mixture-of-experts module"),
    "norm_topk_prob": _exact("read by the mixture-of-experts module"),
    # attention scale: read through attn.attn_scale, which TransformerLens computes from all three
    "use_attn_scale": _exact("attn.attn_scale (1 when off)"),
    "attn_scale": _exact("attn.attn_scale"),
    "scale_attn_by_inverse_layer_idx": _exact("attn.attn_scale (multiplied by layer + 1)"),
    "dtype": _exact("float32/float64 fold the first norm; half precision applies the module first"),
    # wiring and attention (arch.py)
    "parallel_attn_mlp": _exact(
        "each MLP reads its layer's input beside the heads: its senders are `in` and the nodes of "
        "earlier layers (graph.py), its input the layer's resid_pre"),
    "n_key_value_heads": _exact(
        "grouped-query attention: every query head keeps its own k and v channels, computed with "
        "its kv head's weights"),
    "use_local_attn": _exact(
        "local (windowed) attention layers: the engine masks with the model's own causal mask "
        "of each layer, window included (arch.allowed_keys)"),
    "window_size": _exact("the window of local layers (arch.allowed_keys)"),
    "attn_types": _exact("which layers are local (arch.allowed_keys)"),
    "use_qk_norm": _exact("q/k norms inside each head (Qwen3): applied to q and k rows after the "
                          "projection (arch.finish_qk)"),
    "attn_scores_soft_cap": _exact("cap * tanh(scores / cap) before the mask (Gemma-2), "
                                   "TransformerLens's own function (arch.cap_scores)"),
    "output_logits_soft_cap": _exact("cap * tanh(logits / cap) after the unembedding (Gemma-2)"),
    "use_normalization_before_and_after": _exact(
        "norms after attention and after the MLP (Gemma-2): the MLP's is part of its node; the "
        "attention's acts on the sum of the layer's heads, so each receiver reads one normalized "
        "sum per combination of head copies (copies.for_evaluation, arch.norm_heads_sum)"),
    # values the engine does not reproduce yet
    "positional_embedding_type": _only(
        "'standard' or 'rotary'", lambda value, cfg: value in ("standard", "rotary"),
        "position information inside attention other than rotary (ALiBi, shortformer, relative "
        "biases)"),
    "use_attention_sinks": _off("attention sinks (a learned extra softmax column)"),
    "use_logn_attn": _off("log-n scaling of queries by position"),
    "clip_qkv": _only("None", lambda value, cfg: value is None, "q/k/v clamped after the projection"),
    "attention_dir": _only("'causal'", lambda value, cfg: value == "causal", "bidirectional attention"),
    "load_in_4bit": _off("4-bit quantized weights"),
    "n_devices": _only("1", lambda value, cfg: value == 1, "a model split over several devices"),
    "original_architecture": _only(
        f"any but {', '.join(sorted(_RENAMED_FORWARD))}",
        lambda value, cfg: value not in _RENAMED_FORWARD,
        "the forward TransformerLens builds for "
        + "; ".join(f"{k} ({v})" for k, v in sorted(_RENAMED_FORWARD.items()))),
    # read by features refused above
    "ungroup_grouped_query_attention": _inert("the shape of the k/v hooks (the same values)"),
    "rotary_dim": _exact(_ROTARY),
    "rotary_base": _exact(_ROTARY),
    "rotary_base_local": _exact(_ROTARY + " (local layers)"),
    "rotary_scaling_factor": _exact(_ROTARY),
    "rotary_adjacent_pairs": _exact(_ROTARY),
    "use_NTK_by_parts_rope": _exact(_ROTARY),
    "NTK_by_parts_low_freq_factor": _exact(_ROTARY),
    "NTK_by_parts_high_freq_factor": _exact(_ROTARY),
    "NTK_by_parts_factor": _exact(_ROTARY),
    "NTK_original_ctx_len": _exact(_ROTARY),
    "use_dynamic_ntk_rope": _exact(_ROTARY),
    "use_yarn_rope": _exact(_ROTARY),
    "yarn_factor": _exact(_ROTARY),
    "yarn_attention_factor": _exact(_ROTARY),
    "yarn_beta_fast": _exact(_ROTARY),
    "yarn_beta_slow": _exact(_ROTARY),
    "yarn_original_max_position_embeddings": _exact(_ROTARY),
    "yarn_truncate": _exact(_ROTARY),
    "yarn_global_attn_only": _exact(_ROTARY + " (local layers)"),
    "train_seq_length": _exact("dynamic NTK rotary tables (" + _ROTARY + "); log-n attention is refused"),
    "relative_attention_max_distance": _inert("T5 encoder-decoder models only"),
    "relative_attention_num_buckets": _inert("T5 encoder-decoder models only"),
    "decoder_start_token_id": _inert("encoder-decoder models only"),
    "tie_word_embeddings": _inert("encoder-decoder and bridge models; HookedTransformer stores W_U"),
    "quantization_method": _inert("not read by HookedTransformer (load_in_4bit is refused)"),
    # hook points: the same values, other hooks
    "use_attn_result": _inert("per-head results hook (the same sum)"),
    "use_split_qkv_input": _inert("per-head q/k/v input hooks (the same inputs)"),
    "use_attn_in": _inert("per-head attention input hook"),
    "use_hook_mlp_in": _inert("MLP input hook"),
    "use_hook_tokens": _inert("token hook"),
    # tokenization, loading, initialization, bookkeeping
    "device": _inert("where the weights live; the engine computes on the model's device"),
    "default_prepend_bos": _inert("tokenization only"),
    "tokenizer_prepends_bos": _inert("tokenization only"),
    "tokenizer_name": _inert("tokenization only"),
    "trust_remote_code": _inert("loading only"),
    "model_name": _inert("a label"),
    "from_checkpoint": _inert("a label of the loaded checkpoint"),
    "checkpoint_index": _inert("a label of the loaded checkpoint"),
    "checkpoint_label_type": _inert("a label of the loaded checkpoint"),
    "checkpoint_value": _inert("a label of the loaded checkpoint"),
    "n_params": _inert("a derived count"),
    "init_mode": _inert("initialization only (weights are then set)"),
    "initializer_range": _inert("initialization only"),
    "init_weights": _inert("initialization only"),
    "seed": _inert("initialization only"),
    "uses_rms_norm": _inert("a TransformerLensConfig field HookedTransformer does not read"),
    "layer_norm_folding": _inert("a TransformerLensConfig field HookedTransformer does not read"),
}

_SUPPORTED = (
    "pathpatch computes causal transformers with standard or rotary positional embeddings "
    "exactly: LayerNorm, RMSNorm (with or without weights) or no norm; plain, gated, SoLU or "
    "mixture-of-experts MLPs, or none; sequential or parallel attention and MLP; grouped-query "
    "and local (windowed) attention; any attention scale (docs/MODELS.md classifies every "
    "TransformerLens option)"
)


def _default(field: dataclasses.Field) -> Any:
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return dataclasses.MISSING


def unsupported(cfg) -> list[str]:
    """Every config value the engine would not compute exactly, one readable phrase each."""
    problems = []
    for field in dataclasses.fields(cfg):
        value = getattr(cfg, field.name)
        rule = FIELDS.get(field.name)
        if rule is None:  # a TransformerLens option newer than this table
            default = _default(field)
            try:
                differs = default is dataclasses.MISSING or bool(value != default)
            except (TypeError, ValueError, RuntimeError):  # e.g. a tensor: not comparable
                differs = True
            if differs:
                problems.append(
                    f"{field.name}={value!r}: a TransformerLens option pathpatch has not examined"
                    f" (supported: its default, {default!r})")
        elif rule.support is Support.REFUSED and not rule.accepts(value, cfg):
            problems.append(f"{field.name}={value!r}: {rule.why} is not computed exactly"
                            f" (supported: {rule.supported})")
    return problems


def check_supported(cfg) -> None:
    """Refuse, naming every feature and value, a config the engine does not compute exactly."""
    problems = unsupported(cfg)
    if problems:
        raise PathPatchError(
            "unsupported model architecture: " + "; ".join(problems) + ". " + _SUPPORTED)


def check_model(model) -> None:
    """`check_supported` plus what a config cannot show: hooks left on the model change its
    forward in the cached runs but not in the engine's recomputation."""
    check_supported(model.cfg)
    hooked = sorted(
        name or "(model)" for name, module in model.named_modules()
        if module._forward_hooks or module._forward_pre_hooks
    )
    if hooked:
        raise PathPatchError(
            f"the model has forward hooks attached at {', '.join(hooked[:5])}"
            f"{' ...' if len(hooked) > 5 else ''}: the engine recomputes node copies without "
            "them, so results would mix hooked and unhooked runs; remove them first "
            "(model.reset_hooks(including_permanent=True))"
        )
