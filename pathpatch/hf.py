"""Local Hugging Face model directories, loaded offline: GPT-2, Llama, Mistral, Qwen2, Qwen3,
GPT-NeoX (Pythia) and Gemma-2.

Each family's `config.json` is mapped to HookedTransformerConfig fields here, field by field,
rather than through TransformerLens's `convert_hf_model_config`, which routes by the *name* of
the path (a directory whose path contains "llama" or "gemma" takes those branches and crashes)
and drops options that change the forward (Llama's `head_dim`, `attention_bias` and non-llama3
rope scaling, GPT-NeoX's `rope_theta`, Qwen2's sliding window). Every option of the HF config
that changes the forward is either mapped or refused by name; weights are converted here too,
biases included. Nothing touches the hub (`local_files_only`). The model carries no tokenizer:
pathpatch's datasets are token ids, and without a tokenizer TransformerLens never derives
attention masks from padding (a left-padding tokenizer would shift rotary positions).

`n_ctx` is the model's maximum context (Llama-3: 131,072), never a sequence length: the engine's
costs use the dataset's length, and TransformerLens builds its rotary tables lazily.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import einops
import torch

from pathpatch.errors import PathPatchError

# HF activation names -> TransformerLens's (only those both compute identically)
_ACTIVATIONS = {"gelu": "gelu", "gelu_new": "gelu_new", "gelu_pytorch_tanh": "gelu_pytorch_tanh",
                "gelu_fast": "gelu_fast", "relu": "relu", "silu": "silu", "swish": "silu"}


@dataclass(frozen=True)
class Family:
    """How one HF `model_type` becomes a HookedTransformer."""

    arch: Callable[[Any, str], dict[str, Any]]
    """(HF config object, where) -> HookedTransformerConfig fields; refuses what it cannot map."""
    weights: Callable[[Any, Any], dict[str, torch.Tensor]]
    """(HF model, TransformerLens cfg) -> state dict in TransformerLens names."""


def load_hf_directory(path: Path, device, dtype: torch.dtype):
    """A HookedTransformer with the weights of the HF model saved in directory `path`."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from pathpatch.models import _load_weights, build_model

    config_path = path / "config.json"
    if not config_path.is_file():
        raise PathPatchError(
            f"{path} is a directory without config.json: expected a Hugging Face model directory "
            f"(save_pretrained output) of model_type {', '.join(sorted(FAMILIES))}")
    try:
        model_type = json.loads(config_path.read_text()).get("model_type")
    except json.JSONDecodeError as err:
        raise PathPatchError(f"{config_path} is not valid JSON: {err}") from None
    if model_type in REFUSED_FAMILIES:
        raise PathPatchError(f"{path}: model_type {model_type!r} is not supported yet: "
                             f"{REFUSED_FAMILIES[model_type]}")
    family = FAMILIES.get(model_type)
    if family is None:
        raise PathPatchError(
            f"{path}: model_type {model_type!r} is not supported; local Hugging Face directories "
            f"must be one of {', '.join(sorted(FAMILIES))}. Other architectures: save a state "
            "dict in HookedTransformer format as .safetensors + .json")
    try:
        hf_config = AutoConfig.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, KeyError) as err:
        raise PathPatchError(f"{path}: config.json could not be read as a {model_type} config: "
                             f"{err}") from None
    arch = family.arch(hf_config, str(path))
    try:
        hf_model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True,
                                                        dtype=torch.float32)
    except (OSError, ValueError) as err:  # weights missing or not matching the config
        raise PathPatchError(f"{path}: the weights could not be loaded: {err}") from None
    model = build_model(arch, device=device, dtype=dtype, init_weights=False)
    with torch.no_grad():
        state_dict = {k: v.detach() for k, v in family.weights(hf_model, model.cfg).items()}
    _load_weights(model, state_dict, str(path))
    return model


# --- configs ---------------------------------------------------------------------------------


def _refuse(where: str, field: str, value: Any, why: str) -> PathPatchError:
    return PathPatchError(f"{where}: {field}={value!r}: {why} is not computed exactly")


def _activation(c, where: str) -> str:
    act = (getattr(c, "hidden_activation", None) or getattr(c, "hidden_act", None)
           or getattr(c, "activation_function", None))
    if act not in _ACTIVATIONS:
        raise _refuse(where, "hidden_act", act, "this activation")
    return _ACTIVATIONS[act]


def _rope(c, d_head: int, where: str) -> dict[str, Any]:
    """Rotary fields from the HF config's rope parameters (transformers 5 `rope_parameters`, or
    the older `rope_theta` / `rope_scaling` / `rotary_pct`)."""
    params = dict(getattr(c, "rope_parameters", None) or {})
    legacy = getattr(c, "rope_scaling", None)
    if isinstance(legacy, Mapping):
        params = {**legacy, **params}
    theta = params.get("rope_theta", getattr(c, "rope_theta", None)
                       or getattr(c, "rotary_emb_base", None) or 10000.0)
    fraction = params.get("partial_rotary_factor", getattr(c, "partial_rotary_factor", None)
                          or getattr(c, "rotary_pct", None) or 1.0)
    out: dict[str, Any] = {"positional_embedding_type": "rotary", "rotary_base": float(theta),
                           "rotary_dim": int(d_head * fraction), "rotary_adjacent_pairs": False}
    kind = params.get("rope_type", params.get("type", "default"))
    if kind == "llama3":
        out.update(use_NTK_by_parts_rope=True, NTK_by_parts_factor=float(params["factor"]),
                   NTK_by_parts_low_freq_factor=float(params["low_freq_factor"]),
                   NTK_by_parts_high_freq_factor=float(params["high_freq_factor"]),
                   NTK_original_ctx_len=int(params["original_max_position_embeddings"]))
    elif kind == "linear":
        out["rotary_scaling_factor"] = float(params["factor"])
    elif kind != "default":
        raise _refuse(where, "rope_type", kind, "this rotary scaling (supported: default, "
                      "linear, llama3)")
    return out


def _windows(c, n_layers: int) -> dict[str, Any]:
    """Sliding-window layers as TransformerLens local attention (Mistral, Qwen2, Qwen3)."""
    window = getattr(c, "sliding_window", None)
    layer_types = getattr(c, "layer_types", None)
    if layer_types is not None:
        local = [t == "sliding_attention" for t in layer_types]
    else:  # Mistral: every layer, whenever a window is set
        local = [window is not None] * n_layers
    if not any(local) or window is None:
        return {}
    return {"use_local_attn": True, "window_size": int(window),
            "attn_types": ["local" if is_local else "global" for is_local in local]}


def _llama_arch(c, where: str) -> dict[str, Any]:
    """Llama, Mistral, Qwen2, Qwen3: RMSNorm, gated MLP, rotary, grouped-query attention."""
    if getattr(c, "mlp_bias", False):
        raise _refuse(where, "mlp_bias", True, "biases inside a gated MLP (TransformerLens's gated "
                      "MLP adds one bias after the product)")
    n_heads = c.num_attention_heads
    d_head = getattr(c, "head_dim", None) or c.hidden_size // n_heads
    n_kv = getattr(c, "num_key_value_heads", None) or n_heads
    return {
        "n_layers": c.num_hidden_layers, "d_model": c.hidden_size, "n_heads": n_heads,
        "d_head": d_head, "d_mlp": c.intermediate_size, "d_vocab": c.vocab_size,
        "n_ctx": c.max_position_embeddings, "eps": c.rms_norm_eps,
        "act_fn": _activation(c, where), "normalization_type": "RMS", "final_rms": True,
        "gated_mlp": True, "n_key_value_heads": None if n_kv == n_heads else n_kv,
        "use_qk_norm": c.model_type == "qwen3",
        "original_architecture": (c.architectures or [type(c).__name__])[0],
        **_rope(c, d_head, where), **_windows(c, c.num_hidden_layers),
    }


def _gemma2_arch(c, where: str) -> dict[str, Any]:
    """Gemma-2: the Llama layout plus norms after attention and after the MLP, embeddings scaled
    by sqrt(d_model), its own attention scale, attention and logit soft caps, windows in
    alternate layers."""
    arch = _llama_arch(c, where)
    arch["use_qk_norm"] = False
    scale = getattr(c, "query_pre_attn_scalar", None) or arch["d_head"]
    return {**arch, "use_normalization_before_and_after": True, "attn_scale": float(scale) ** 0.5,
            "attn_scores_soft_cap": float(getattr(c, "attn_logit_softcapping", None) or -1.0),
            "output_logits_soft_cap": float(getattr(c, "final_logit_softcapping", None) or -1.0)}


def _neox_arch(c, where: str) -> dict[str, Any]:
    """GPT-NeoX / Pythia: LayerNorm, parallel attention + MLP (or not), partial rotary."""
    n_heads = c.num_attention_heads
    d_head = c.hidden_size // n_heads
    return {
        "n_layers": c.num_hidden_layers, "d_model": c.hidden_size, "n_heads": n_heads,
        "d_head": d_head, "d_mlp": c.intermediate_size, "d_vocab": c.vocab_size,
        "n_ctx": c.max_position_embeddings, "eps": c.layer_norm_eps,
        "act_fn": _activation(c, where), "normalization_type": "LN",
        "parallel_attn_mlp": bool(getattr(c, "use_parallel_residual", True)),
        "original_architecture": "GPTNeoXForCausalLM", **_rope(c, d_head, where),
    }


def gpt2_arch(hf_config: Mapping[str, Any]) -> dict[str, Any]:
    """HookedTransformerConfig fields for a Hugging Face GPT-2 config (as a dict)."""
    n_embd, n_head = hf_config["n_embd"], hf_config["n_head"]
    return {
        "n_layers": hf_config["n_layer"],
        "d_model": n_embd,
        "n_heads": n_head,
        "d_head": n_embd // n_head,
        "d_mlp": hf_config.get("n_inner") or 4 * n_embd,
        "n_ctx": hf_config.get("n_positions", 1024),
        "d_vocab": hf_config["vocab_size"],
        "eps": hf_config.get("layer_norm_epsilon", 1e-5),
        "act_fn": hf_config.get("activation_function", "gelu_new"),
        "use_attn_scale": hf_config.get("scale_attn_weights", True),
        "scale_attn_by_inverse_layer_idx": hf_config.get("scale_attn_by_inverse_layer_idx", False),
        "normalization_type": "LN",
        "positional_embedding_type": "standard",
        "original_architecture": "GPT2LMHeadModel",
    }


def _gpt2_arch(c, where: str) -> dict[str, Any]:
    if getattr(c, "add_cross_attention", False):
        raise PathPatchError(f"{where}: GPT-2 with cross-attention (an encoder-decoder part) is "
                             "not supported; pathpatch loads decoder-only language models")
    return gpt2_arch(c.to_dict())


# --- weights ---------------------------------------------------------------------------------


def _bias(linear, n: int) -> torch.Tensor:
    """A linear layer's bias, or zeros of size n where it has none."""
    if linear.bias is not None:
        return linear.bias
    return torch.zeros(n, dtype=linear.weight.dtype)


def _llama_weights(hf, cfg) -> dict[str, torch.Tensor]:
    n_kv = cfg.n_key_value_heads or cfg.n_heads
    kv = "_" if cfg.n_key_value_heads is not None else ""  # TransformerLens's GQA parameter names
    sd = {"embed.W_E": hf.model.embed_tokens.weight, "ln_final.w": hf.model.norm.weight,
          "unembed.W_U": hf.lm_head.weight.T,
          "unembed.b_U": torch.zeros(cfg.d_vocab, dtype=hf.lm_head.weight.dtype)}
    for i, layer in enumerate(hf.model.layers):
        a, mlp, p = layer.self_attn, layer.mlp, f"blocks.{i}"
        sd[f"{p}.ln1.w"] = layer.input_layernorm.weight
        sd[f"{p}.ln2.w"] = layer.post_attention_layernorm.weight
        for name, proj, heads in (("Q", a.q_proj, cfg.n_heads), ("K", a.k_proj, n_kv),
                                  ("V", a.v_proj, n_kv)):
            key = "" if name == "Q" else kv
            sd[f"{p}.attn.{key}W_{name}"] = einops.rearrange(proj.weight, "(n h) m -> n m h",
                                                            n=heads)
            sd[f"{p}.attn.{key}b_{name}"] = _bias(proj, heads * cfg.d_head).reshape(heads, -1)
        sd[f"{p}.attn.W_O"] = einops.rearrange(a.o_proj.weight, "m (n h) -> n h m", n=cfg.n_heads)
        sd[f"{p}.attn.b_O"] = _bias(a.o_proj, cfg.d_model)
        if cfg.use_qk_norm:
            sd[f"{p}.attn.q_norm.w"] = a.q_norm.weight
            sd[f"{p}.attn.k_norm.w"] = a.k_norm.weight
        sd[f"{p}.mlp.W_in"] = mlp.up_proj.weight.T
        sd[f"{p}.mlp.W_gate"] = mlp.gate_proj.weight.T
        sd[f"{p}.mlp.W_out"] = mlp.down_proj.weight.T
        sd[f"{p}.mlp.b_in"] = torch.zeros(cfg.d_mlp, dtype=mlp.up_proj.weight.dtype)
        sd[f"{p}.mlp.b_out"] = torch.zeros(cfg.d_model, dtype=mlp.down_proj.weight.dtype)
    return sd


def _gemma2_weights(hf, cfg) -> dict[str, torch.Tensor]:
    """Gemma-2's weights on the Llama layout: its RMS norms scale by (1 + weight), the embedding
    is multiplied by sqrt(d_model) (the unembedding, tied to it, is not), and its norms around
    the MLP have their own names."""
    sd = _llama_weights(hf, cfg)
    net = hf.model
    sd["embed.W_E"] = net.embed_tokens.weight * torch.tensor(cfg.d_model ** 0.5,
                                                             dtype=net.embed_tokens.weight.dtype)
    sd["ln_final.w"] = net.norm.weight + 1
    for i, layer in enumerate(net.layers):
        p = f"blocks.{i}"
        sd[f"{p}.ln1.w"] = layer.input_layernorm.weight + 1
        sd[f"{p}.ln1_post.w"] = layer.post_attention_layernorm.weight + 1
        sd[f"{p}.ln2.w"] = layer.pre_feedforward_layernorm.weight + 1
        sd[f"{p}.ln2_post.w"] = layer.post_feedforward_layernorm.weight + 1
    return sd


def _neox_weights(hf, cfg) -> dict[str, torch.Tensor]:
    net, H, dh = hf.gpt_neox, cfg.n_heads, cfg.d_head
    head = hf.lm_head if hasattr(hf, "lm_head") else hf.embed_out
    sd = {"embed.W_E": net.embed_in.weight, "ln_final.w": net.final_layer_norm.weight,
          "ln_final.b": net.final_layer_norm.bias, "unembed.W_U": head.weight.T,
          "unembed.b_U": torch.zeros(cfg.d_vocab, dtype=head.weight.dtype)}
    for i, layer in enumerate(net.layers):
        att, mlp, p = layer.attention, layer.mlp, f"blocks.{i}"
        sd[f"{p}.ln1.w"], sd[f"{p}.ln1.b"] = layer.input_layernorm.weight, layer.input_layernorm.bias
        sd[f"{p}.ln2.w"] = layer.post_attention_layernorm.weight
        sd[f"{p}.ln2.b"] = layer.post_attention_layernorm.bias
        # the fused projection's rows are ordered (head, q/k/v, d_head)
        W = einops.rearrange(att.query_key_value.weight, "(i qkv h) m -> qkv i m h", i=H, qkv=3)
        b = einops.rearrange(_bias(att.query_key_value, 3 * H * dh), "(i qkv h) -> qkv i h",
                             i=H, qkv=3)
        for k, name in enumerate("QKV"):
            sd[f"{p}.attn.W_{name}"], sd[f"{p}.attn.b_{name}"] = W[k], b[k]
        sd[f"{p}.attn.W_O"] = einops.rearrange(att.dense.weight, "m (i h) -> i h m", i=H)
        sd[f"{p}.attn.b_O"] = _bias(att.dense, cfg.d_model)
        sd[f"{p}.mlp.W_in"], sd[f"{p}.mlp.b_in"] = mlp.dense_h_to_4h.weight.T, mlp.dense_h_to_4h.bias
        sd[f"{p}.mlp.W_out"], sd[f"{p}.mlp.b_out"] = mlp.dense_4h_to_h.weight.T, mlp.dense_4h_to_h.bias
    return sd


def _gpt2_weights(hf, cfg) -> dict[str, torch.Tensor]:
    from transformer_lens.pretrained.weight_conversions import convert_gpt2_weights

    sd = dict(convert_gpt2_weights(hf, cfg))
    sd.setdefault("unembed.b_U", torch.zeros(cfg.d_vocab))  # GPT-2 has none; TransformerLens zero
    return sd


FAMILIES: dict[str, Family] = {
    "gpt2": Family(_gpt2_arch, _gpt2_weights),
    "llama": Family(_llama_arch, _llama_weights),
    "mistral": Family(_llama_arch, _llama_weights),
    "qwen2": Family(_llama_arch, _llama_weights),
    "qwen3": Family(_llama_arch, _llama_weights),
    "gpt_neox": Family(_neox_arch, _neox_weights),
    "gemma2": Family(_gemma2_arch, _gemma2_weights),
}
_GEMMA3 = ("Gemma-3's configs (a rotary base of their own for local layers, q/k norms scaled by "
           "1 + weight, multimodal checkpoints) are not mapped from Hugging Face directories yet")
REFUSED_FAMILIES = {"gemma3": _GEMMA3, "gemma3_text": _GEMMA3}
