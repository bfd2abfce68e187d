"""Which models the engine computes exactly: every `ModelConfig` field, classified, and every
value the engine would get wrong refused by name.

The engine recomputes part of a model's forward pass itself (attention from the q/k/v inputs to
z, each block's first norm folded into the projections, the residual stream as a sum of node
outputs, the unembedding) and calls the model's own modules for the rest (MLPs, the norms after
a sublayer, the final norm). A field that changes a recomputed part is either reproduced (EXACT)
or accepted only at the values the engine reproduces (REFUSED: any other value is an error before
any work). A field that only labels the model is INERT. `tests/pathpatch/test_support.py` fails
when `ModelConfig` has a field this table does not classify, and checks each class. Which Hugging
Face architectures load at all is `families.py`'s table.
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


_ROTARY = ("the rotation of q and k rows: the engine rotates them with the model's own "
           "apply_rotary, each by its position (adapter.finish_qk)")

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
        "LN, RMS: ln1 folded into q/k/v (folding.py), ln2, the norms after a sublayer and "
        "ln_final called as modules; None: identity"),
    "eps": _exact("read from each norm module"),
    "final_rms": _exact("ln_final is called as the module the model builds"),
    "use_normalization_before_and_after": _exact(
        "norms after attention and after the MLP too (Gemma-2/3): the MLP's is part of its node; "
        "the attention's acts on the sum of the layer's heads, so each receiver reads one "
        "normalized sum per combination of head copies (copies.for_evaluation, "
        "adapter.norm_heads_sum)"),
    "post_norm_only": _exact(
        "norms after attention and after the MLP only (OLMo-2/3): the same route as Gemma's "
        "norms after a sublayer, with no norm to fold before the heads"),
    # MLPs: one node, its module called as built
    "act_fn": _exact("the MLP module is called (gelu_new, gelu_pytorch_tanh: torch's fused "
                     "tanh GELU)"),
    "gated_mlp": _exact("the gated MLP module is called"),
    # attention
    "use_attn_scale": _exact("attn.attn_scale (1 when off)"),
    "attn_scale": _exact("attn.attn_scale"),
    "scale_attn_by_inverse_layer_idx": _exact("attn.attn_scale (multiplied by layer + 1)"),
    "dtype": _exact("float32/float64 fold the first norm; half precision applies the module first"),
    "parallel_attn_mlp": _exact(
        "each MLP reads its layer's input beside the heads: its senders are `in` and the nodes of "
        "earlier layers (graph.py), its input the layer's resid_pre"),
    "n_key_value_heads": _exact(
        "grouped-query attention: every query head keeps its own k and v channels, computed with "
        "its kv head's weights"),
    "use_local_attn": _exact(
        "local (windowed) attention layers: the engine masks with the model's own mask of each "
        "layer, window included (adapter.allowed_keys)"),
    "window_size": _exact("the window of local layers (adapter.allowed_keys)"),
    "attn_types": _exact("which layers are local (adapter.allowed_keys)"),
    "use_qk_norm": _exact("q/k norms inside each head (Qwen3, Gemma-3): applied to q and k rows "
                          "after the projection (adapter.finish_qk)"),
    "qk_norm_over_heads": _exact(
        "a q/k norm over all heads' projection together (OLMo-2/3): each q/k row is scaled by "
        "the RMS of its own input version's projection through every head, times its head's "
        "slice of the weight (adapter.norm_over_heads), which is the model itself when every "
        "head reads the same input"),
    "attn_scores_soft_cap": _exact("cap * tanh(scores / cap) before the mask (Gemma-2), "
                                   "the model's own function (adapter.cap_scores)"),
    "output_logits_soft_cap": _exact("cap * tanh(logits / cap) after the unembedding (Gemma-2)"),
    "positional_embedding_type": _exact(
        "standard: learned rows in `in`'s output; rotary: inside each head (" + _ROTARY + ")"),
    "rotary_dim": _exact(_ROTARY),
    "rotary_base": _exact(_ROTARY),
    "rotary_base_local": _exact(_ROTARY + " (local layers' own base, Gemma-3)"),
    "rotary_scaling_factor": _exact(_ROTARY),
    "rotary_adjacent_pairs": _exact(_ROTARY),
    "use_NTK_by_parts_rope": _exact(_ROTARY),
    "NTK_by_parts_low_freq_factor": _exact(_ROTARY),
    "NTK_by_parts_high_freq_factor": _exact(_ROTARY),
    "NTK_by_parts_factor": _exact(_ROTARY),
    "NTK_original_ctx_len": _exact(_ROTARY),
    "rotary_layers": _exact(_ROTARY + " (layers that do not rotate, SmolLM3)"),
    # labels
    "original_architecture": _inert("a label: the Hugging Face class the weights came from"),
    "device": _inert("where the weights live; the engine computes on the model's device"),
}

_SUPPORTED = (
    "pathpatch computes causal transformers with learned or rotary positions exactly: LayerNorm, "
    "RMSNorm or no norm, before, after, or before and after each sublayer; plain or gated MLPs, "
    "or none; sequential or parallel attention and MLP; grouped-query and local (windowed) "
    "attention; q/k norms per head; soft caps; any attention scale (docs/MODELS.md classifies "
    "every option)"
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
        if rule is None:  # a ModelConfig option newer than this table
            default = _default(field)
            try:
                differs = default is dataclasses.MISSING or bool(value != default)
            except (TypeError, ValueError, RuntimeError):  # e.g. a tensor: not comparable
                differs = True
            if differs:
                problems.append(
                    f"{field.name}={value!r}: a model option the engine has not examined"
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


def check_no_hooks(model) -> None:
    """Refuse a model with forward hooks left on it: they change its forward in the cached
    runs but not in the engine's recomputation (a walk over its modules, no model work)."""
    hooked = sorted(
        name or "(model)" for name, module in model.named_modules()
        if module._forward_hooks or module._forward_pre_hooks
    )  # HookPoints hold TransformerLens hooks as forward hooks too
    if hooked:
        raise PathPatchError(
            f"the model has forward hooks attached at {', '.join(hooked[:5])}"
            f"{' ...' if len(hooked) > 5 else ''}: the engine recomputes node copies without "
            "them, so results would mix hooked and unhooked runs; remove them first "
            "(model.reset_hooks(including_permanent=True))"
        )
