"""Hugging Face checkpoints as pathpatch models: one entry per family, config and weights.

Each family's `config.json` is mapped to ModelConfig fields here, field by field (TransformerLens 3's
`convert_hf_model_config` routed by the *name* of the path and dropped options that change the
forward; TransformerLens 4's bridge applies processing that must be undone). Every option of the HF
config that changes the forward is either mapped or refused by name; weights are converted here
too, biases included, from the checkpoint's own dtype straight to the one asked for. Nothing
touches the hub (`local_files_only`). The model carries no tokenizer: pathpatch's datasets are
token ids, so no attention mask is ever derived from padding.

`ARCHITECTURES` classifies every architecture TransformerLens 4's bridge supports: computed here,
or refused by name with the reason (not a causal transformer, multimodal, mixture of experts, or
a transformer whose options are not mapped yet). A new family is one `FAMILIES` entry and its tests.

`n_ctx` is the model's maximum context (Llama-3: 131,072), never a sequence length: the engine's
costs use the dataset's length, and rotary tables grow lazily.
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
from pathpatch.model.config import ModelConfig

# HF activation names -> TransformerLens's (only those both compute identically)
_ACTIVATIONS = {"gelu": "gelu", "gelu_new": "gelu_new", "gelu_pytorch_tanh": "gelu_pytorch_tanh",
                "gelu_fast": "gelu_fast", "relu": "relu", "silu": "silu", "swish": "silu"}


@dataclass(frozen=True)
class Family:
    """How one HF `model_type` becomes a pathpatch `Transformer`."""

    arch: Callable[[Any, str], dict[str, Any]]
    """(HF config object, where) -> ModelConfig fields; refuses what it cannot map."""
    weights: Callable[[Any, Any], dict[str, torch.Tensor]]
    """(HF model, ModelConfig) -> state dict in pathpatch's (TransformerLens's) names."""


def read_hf_directory(path: Path, dtype: torch.dtype) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """(ModelConfig, state dict) of the HF model saved in directory `path`, its weights in
    `dtype`. Refuses an unsupported architecture from config.json alone, before any weights load."""
    from transformers import AutoModelForCausalLM

    family, arch = _read_hf_config(path)
    try:  # only its weights are read, in `dtype` straight from the checkpoint's own
        hf_model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=dtype)
    except (OSError, ValueError) as err:  # weights missing or not matching the config
        raise PathPatchError(f"{path}: the weights could not be loaded: {err}") from None
    cfg = ModelConfig.from_dict(arch, dtype=dtype)
    with torch.no_grad():
        state_dict = {k: v.detach() for k, v in family.weights(hf_model, cfg).items()}
    return cfg, state_dict


def read_hf_config(path: Path) -> ModelConfig:
    """The ModelConfig of the HF model in directory `path` from its config.json alone (no
    weights read, none needed: a plan needs the architecture only)."""
    _, arch = _read_hf_config(path)
    return ModelConfig.from_dict(arch)


def _read_hf_config(path: Path) -> tuple[Family, dict[str, Any]]:
    """(the family, ModelConfig fields) of directory `path`'s config.json; refuses an
    unsupported architecture by name."""
    from transformers import AutoConfig

    config_path = path / "config.json"
    if not config_path.is_file():
        raise PathPatchError(
            f"{path} is a directory without config.json: expected a Hugging Face model directory "
            f"(save_pretrained output) of model_type {', '.join(sorted(FAMILIES))}")
    try:
        raw = json.loads(config_path.read_text())
    except json.JSONDecodeError as err:
        raise PathPatchError(f"{config_path} is not valid JSON: {err}") from None
    model_type = raw.get("model_type")
    for architecture in raw.get("architectures") or [_causal_lm_class(model_type)]:
        refusal = refusal_of(architecture)
        if refusal:
            raise PathPatchError(f"{path}: {refusal}")
    if model_type in REFUSED_FAMILIES:
        raise PathPatchError(f"{path}: model_type {model_type!r} is not supported: "
                             f"{REFUSED_FAMILIES[model_type]}")
    family = FAMILIES.get(model_type)
    if family is None:
        raise PathPatchError(
            f"{path}: model_type {model_type!r} is not supported; local Hugging Face directories "
            f"must be one of {', '.join(sorted(FAMILIES))}. Other architectures: save a state "
            "dict in pathpatch's format as .safetensors + .json")
    try:
        hf_config = AutoConfig.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, KeyError) as err:
        raise PathPatchError(f"{path}: config.json could not be read as a {model_type} config: "
                             f"{err}") from None
    return family, family.arch(hf_config, str(path))


# --- configs ---------------------------------------------------------------------------------


def _refuse(where: str, field: str, value: Any, why: str) -> PathPatchError:
    return PathPatchError(f"{where}: {field}={value!r}: {why} is not computed exactly")


def _activation(c, where: str) -> str:
    act = (getattr(c, "hidden_activation", None) or getattr(c, "hidden_act", None)
           or getattr(c, "activation_function", None))
    if act not in _ACTIVATIONS:
        raise _refuse(where, "hidden_act", act, "this activation")
    return _ACTIVATIONS[act]


_LAYER_TYPES = ("full_attention", "sliding_attention")


def _rope(c, d_head: int, where: str, layer_type: str = "full_attention") -> dict[str, Any]:
    """Rotary fields from the HF config's rope parameters (transformers 5 `rope_parameters`, per
    layer type where a family has them, or the older `rope_theta` / `rope_scaling` /
    `rotary_pct`). Local layers with a base of their own (Gemma-3, OLMo-3) get
    `rotary_base_local`; any other difference between layer types is refused."""
    params = dict(getattr(c, "rope_parameters", None) or {})
    if any(t in params for t in _LAYER_TYPES):  # one set per layer type
        per_type = {t: dict(params.get(t) or params.get("full_attention") or {}) for t in _LAYER_TYPES}
        out = _rope_of(c, per_type["full_attention"], d_head, where)
        used = set(getattr(c, "layer_types", None) or ["full_attention"])
        if "sliding_attention" in used:
            local = _rope_of(c, per_type["sliding_attention"], d_head, where)
            if local["rotary_dim"] != out["rotary_dim"] or local.get("use_NTK_by_parts_rope") or \
                    local.get("rotary_scaling_factor", 1.0) != 1.0:
                raise _refuse(where, "rope_parameters['sliding_attention']",
                              per_type["sliding_attention"], "a scaled rotation in local layers")
            if local["rotary_base"] != out["rotary_base"]:
                out["rotary_base_local"] = local["rotary_base"]
        return out
    return _rope_of(c, params, d_head, where)


def _rope_of(c, params: dict[str, Any], d_head: int, where: str) -> dict[str, Any]:
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


def _layer_flags(c, n_layers: int, where: str) -> dict[str, Any]:
    """Per-layer rotation (SmolLM3's `no_rope_layers`: 1 where a layer rotates)."""
    no_rope = getattr(c, "no_rope_layers", None)
    if no_rope is None:
        return {}
    if len(no_rope) != n_layers:
        raise _refuse(where, "no_rope_layers", no_rope, f"a list not of {n_layers} layers")
    return {"rotary_layers": [bool(flag) for flag in no_rope]}


def _windows(c, n_layers: int) -> dict[str, Any]:
    """Sliding-window layers as local attention (Mistral, Qwen2, Qwen3, Gemma, Phi-3, OLMo-3)."""
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


def _gemma3_arch(c, where: str) -> dict[str, Any]:
    """Gemma-3 text: Gemma-2's layout with q/k norms per head (scaled by 1 + weight, folded into
    the weights), a rotary base of its own in local layers, soft caps only where set."""
    if getattr(c, "use_bidirectional_attention", False):
        raise _refuse(where, "use_bidirectional_attention", True, "bidirectional attention")
    arch = _gemma2_arch(c, where)
    arch["use_qk_norm"] = True
    # Gemma-3's attention keeps `attn_logit_softcapping` in its config but never applies it
    # (transformers' Gemma3Attention passes no softcap): the checkpoint's model has none
    arch["attn_scores_soft_cap"] = -1.0
    return arch


def _olmo2_arch(c, where: str) -> dict[str, Any]:
    """OLMo-2 / OLMo-3: no norm before a sublayer, one after each (on the heads' sum, and part
    of the MLP), q/k norms over all heads' projection; OLMo-3 adds windowed layers."""
    arch = _llama_arch(c, where)
    return {**arch, "post_norm_only": True, "use_qk_norm": True, "qk_norm_over_heads": True}


def _smollm3_arch(c, where: str) -> dict[str, Any]:
    """SmolLM3: the Llama layout with some layers that do not rotate (`no_rope_layers`)."""
    arch = _llama_arch(c, where)
    if not getattr(c, "use_sliding_window", False):
        for key in ("use_local_attn", "window_size", "attn_types"):
            arch.pop(key, None)
    return {**arch, **_layer_flags(c, c.num_hidden_layers, where)}


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
    """ModelConfig fields for a Hugging Face GPT-2 config (as a dict)."""
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
        if hasattr(layer, "input_layernorm"):  # OLMo-2 has norms after the sublayers only
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


def _gemma3_weights(hf, cfg) -> dict[str, torch.Tensor]:
    """Gemma-2's conversion plus the q/k norms, which scale by 1 + weight too."""
    sd = _gemma2_weights(hf, cfg)
    for i, layer in enumerate(hf.model.layers):
        sd[f"blocks.{i}.attn.q_norm.w"] = layer.self_attn.q_norm.weight + 1
        sd[f"blocks.{i}.attn.k_norm.w"] = layer.self_attn.k_norm.weight + 1
    return sd


def _olmo2_weights(hf, cfg) -> dict[str, torch.Tensor]:
    """The Llama conversion with OLMo-2's norms after attention and after the MLP."""
    sd = _llama_weights(hf, cfg)
    for i, layer in enumerate(hf.model.layers):
        p = f"blocks.{i}"
        sd[f"{p}.ln1_post.w"] = layer.post_attention_layernorm.weight
        sd[f"{p}.ln2_post.w"] = layer.post_feedforward_layernorm.weight
    return sd


def _phi3_weights(hf, cfg) -> dict[str, torch.Tensor]:
    """Phi-3's fused projections split: qkv_proj rows are [q heads | k heads | v heads], and
    gate_up_proj rows [gate | up]."""
    n_kv = cfg.n_key_value_heads or cfg.n_heads
    kv = "_" if cfg.n_key_value_heads is not None else ""
    dh, m = cfg.d_head, cfg.d_mlp
    sd = {"embed.W_E": hf.model.embed_tokens.weight, "ln_final.w": hf.model.norm.weight,
          "unembed.W_U": hf.lm_head.weight.T,
          "unembed.b_U": torch.zeros(cfg.d_vocab, dtype=hf.lm_head.weight.dtype)}
    for i, layer in enumerate(hf.model.layers):
        a, mlp, p = layer.self_attn, layer.mlp, f"blocks.{i}"
        sd[f"{p}.ln1.w"] = layer.input_layernorm.weight
        sd[f"{p}.ln2.w"] = layer.post_attention_layernorm.weight
        W_q, W_k, W_v = a.qkv_proj.weight.split([cfg.n_heads * dh, n_kv * dh, n_kv * dh])
        for name, W, heads in (("Q", W_q, cfg.n_heads), ("K", W_k, n_kv), ("V", W_v, n_kv)):
            key = "" if name == "Q" else kv
            sd[f"{p}.attn.{key}W_{name}"] = einops.rearrange(W, "(n h) m -> n m h", n=heads)
            sd[f"{p}.attn.{key}b_{name}"] = torch.zeros(heads, dh, dtype=W.dtype)
        sd[f"{p}.attn.W_O"] = einops.rearrange(a.o_proj.weight, "m (n h) -> n h m", n=cfg.n_heads)
        sd[f"{p}.attn.b_O"] = _bias(a.o_proj, cfg.d_model)
        W_gate, W_up = mlp.gate_up_proj.weight.split([m, m])
        sd[f"{p}.mlp.W_in"], sd[f"{p}.mlp.W_gate"] = W_up.T, W_gate.T
        sd[f"{p}.mlp.W_out"] = mlp.down_proj.weight.T
        sd[f"{p}.mlp.b_in"] = torch.zeros(m, dtype=W_up.dtype)
        sd[f"{p}.mlp.b_out"] = torch.zeros(cfg.d_model, dtype=W_up.dtype)
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
    """GPT-2's Conv1D weights are stored [in, out]; c_attn's columns are [q | k | v], each
    (head, d_head). GPT-2 has no unembedding bias (zero here) and ties W_U to W_E."""
    net, H = hf.transformer, cfg.n_heads
    sd = {"embed.W_E": net.wte.weight, "pos_embed.W_pos": net.wpe.weight,
          "ln_final.w": net.ln_f.weight, "ln_final.b": net.ln_f.bias,
          "unembed.W_U": hf.lm_head.weight.T,
          "unembed.b_U": torch.zeros(cfg.d_vocab_out, dtype=net.wte.weight.dtype)}
    for i, block in enumerate(net.h):
        p = f"blocks.{i}"
        sd[f"{p}.ln1.w"], sd[f"{p}.ln1.b"] = block.ln_1.weight, block.ln_1.bias
        sd[f"{p}.ln2.w"], sd[f"{p}.ln2.b"] = block.ln_2.weight, block.ln_2.bias
        W = einops.rearrange(block.attn.c_attn.weight, "m (qkv i h) -> qkv i m h", qkv=3, i=H)
        b = einops.rearrange(block.attn.c_attn.bias, "(qkv i h) -> qkv i h", qkv=3, i=H)
        for k, name in enumerate("QKV"):
            sd[f"{p}.attn.W_{name}"], sd[f"{p}.attn.b_{name}"] = W[k], b[k]
        sd[f"{p}.attn.W_O"] = einops.rearrange(block.attn.c_proj.weight, "(i h) m -> i h m", i=H)
        sd[f"{p}.attn.b_O"] = block.attn.c_proj.bias
        sd[f"{p}.mlp.W_in"], sd[f"{p}.mlp.b_in"] = block.mlp.c_fc.weight, block.mlp.c_fc.bias
        sd[f"{p}.mlp.W_out"], sd[f"{p}.mlp.b_out"] = block.mlp.c_proj.weight, block.mlp.c_proj.bias
    return sd


FAMILIES: dict[str, Family] = {
    "gpt2": Family(_gpt2_arch, _gpt2_weights),
    "llama": Family(_llama_arch, _llama_weights),
    "mistral": Family(_llama_arch, _llama_weights),
    "qwen2": Family(_llama_arch, _llama_weights),
    "qwen3": Family(_llama_arch, _llama_weights),
    "gpt_neox": Family(_neox_arch, _neox_weights),
    "gemma2": Family(_gemma2_arch, _gemma2_weights),
    "gemma3_text": Family(_gemma3_arch, _gemma3_weights),
    "olmo2": Family(_olmo2_arch, _olmo2_weights),
    "olmo3": Family(_olmo2_arch, _olmo2_weights),
    "phi3": Family(_llama_arch, _phi3_weights),  # a window over every layer, as Mistral's
    "smollm3": Family(_smollm3_arch, _llama_weights),
}
REFUSED_FAMILIES = {
    "gemma3": "a multimodal Gemma-3 checkpoint (vision tower and text model); save its text model "
              "(model_type gemma3_text) to load it",
}


# --- every option of the families' Hugging Face configs, classified --------------------------

_SHAPE = "mapped: a shape"
_WINDOWS = "mapped: which layers attend within a window, and its size"
_WEIGHTS = "read through the weights: biases converted where the checkpoint has them"
_DROPOUT = "inert: dropout (models are evaluated in eval mode)"
_LABEL = "inert: ids, labels, bookkeeping or generation settings"
HF_CONFIG_FIELDS: dict[str, str] = {
    **dict.fromkeys(["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "head_dim",
                     "max_position_embeddings", "n_embd", "n_head", "n_inner", "n_layer",
                     "n_positions"], _SHAPE),
    **dict.fromkeys(["rms_norm_eps", "layer_norm_eps", "layer_norm_epsilon"], "mapped: eps"),
    **dict.fromkeys(["hidden_act", "hidden_activation", "activation_function"],
                    "mapped: the MLP's activation (others refused)"),
    "rope_parameters": "mapped: rotary base, partial rotary, scaling default/linear/llama3 "
                       "(others refused), per layer type",
    "original_max_position_embeddings": "inert: read only by rotary scalings that are refused "
                                        "(Phi-3's longrope)",
    **dict.fromkeys(["sliding_window", "layer_types", "use_sliding_window", "max_window_layers",
                     "_sliding_window_pattern"], _WINDOWS),
    "no_rope_layers": "mapped: layers that do not rotate (SmolLM3)",
    "no_rope_layer_interval": "mapped: through no_rope_layers, which transformers derives from it",
    "attention_bias": _WEIGHTS,
    "mlp_bias": "refused: biases inside a gated MLP",
    "query_pre_attn_scalar": "mapped: Gemma's attention scale",
    "attn_logit_softcapping": "mapped: Gemma-2's attention soft cap (Gemma-3's transformers "
                              "never applies its own)",
    "final_logit_softcapping": "mapped: Gemma's logit soft cap",
    "use_bidirectional_attention": "refused: bidirectional attention (Gemma-3)",
    "use_parallel_residual": "mapped: GPT-NeoX's parallel attention and MLP",
    "scale_attn_weights": "mapped: GPT-2's attention scale",
    "scale_attn_by_inverse_layer_idx": "mapped: GPT-2's attention scale per layer",
    "reorder_and_upcast_attn": "inert: GPT-2's attention computed in float32 (the same scores)",
    "add_cross_attention": "refused: cross-attention (GPT-2 as a decoder of an encoder)",
    "tie_word_embeddings": "read through the weights: a tied embedding stays one tensor",
    "pretraining_tp": "inert: not read by transformers 5's Llama",
    **dict.fromkeys(["attention_dropout", "attn_pdrop", "embd_pdrop", "resid_pdrop",
                     "hidden_dropout", "classifier_dropout", "summary_first_dropout"], _DROPOUT),
    **dict.fromkeys(["summary_activation", "summary_proj_to_labels", "summary_type",
                     "summary_use_proj"], "inert: GPT-2's sequence-summary head, not the LM head"),
    **dict.fromkeys(["bos_token_id", "eos_token_id", "pad_token_id", "id2label", "label2id",
                     "problem_type", "architectures", "model_type", "_name_or_path",
                     "transformers_version", "dtype", "use_cache", "return_dict",
                     "output_attentions", "output_hidden_states", "is_decoder",
                     "is_encoder_decoder", "chunk_size_feed_forward", "initializer_range"],
                    _LABEL),
}
"""How each option of the computed families' transformers configs is treated: mapped to a
`ModelConfig` field, read through the weights, refused at values not computed, or inert.
`tests/pathpatch/test_support.py` fails when a family's config has an option this table lacks."""


# --- every architecture TransformerLens 4's bridge supports, classified --------------------------

_NOT_TRANSFORMER = "not a transformer (state-space or recurrent layers have no heads to patch)"
_HYBRID = "a hybrid of attention and state-space or recurrent layers"
_ENCODER = "an encoder (bidirectional attention, no next-token output)"
_ENCODER_DECODER = "an encoder-decoder (cross-attention)"
_MULTIMODAL = "multimodal (a vision or audio tower feeds the language model)"
_NON_CAUSAL = "a diffusion or non-causal language model"
_MOE = "mixture-of-experts MLPs (a router per token) are not computed yet"
_NOT_MAPPED = ("a causal transformer whose options (ALiBi, parallel blocks, biases, norms, "
               "attention variants) are not mapped yet")

COMPUTED = {
    "GPT2LMHeadModel": "gpt2", "LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2", "Qwen3ForCausalLM": "qwen3", "GPTNeoXForCausalLM": "gpt_neox",
    "NeoXForCausalLM": "gpt_neox", "Gemma2ForCausalLM": "gemma2", "Gemma3ForCausalLM": "gemma3_text",
    "Phi3ForCausalLM": "phi3", "SmolLM3ForCausalLM": "smollm3", "Olmo2ForCausalLM": "olmo2",
    "Olmo3ForCausalLM": "olmo3",
}
"""Architectures loaded by a `FAMILIES` entry, all computed exactly."""

REFUSED: dict[str, str] = {
    **dict.fromkeys([
        "MambaForCausalLM", "Mamba2ForCausalLM", "FalconMambaForCausalLM", "RwkvForCausalLM",
        "RWKV7ForCausalLM", "HyenaDNAForCausalLM", "RavenForCausalLM", "HrmTextForCausalLM",
        "OuroForCausalLM"], _NOT_TRANSFORMER),
    **dict.fromkeys([
        "JambaForCausalLM", "Zamba2ForCausalLM", "FalconH1ForCausalLM", "BambaForCausalLM",
        "GraniteMoeHybridForCausalLM", "NemotronHForCausalLM", "OlmoHybridForCausalLM",
        "Lfm2ForCausalLM", "Lfm2MoeForCausalLM", "RecurrentGemmaForCausalLM", "Qwen3NextForCausalLM",
        "Qwen3_5ForCausalLM", "Qwen3_5MoeForCausalLM"], _HYBRID),
    **dict.fromkeys([
        "BertForMaskedLM", "BertLMHeadModel", "RobertaForMaskedLM", "HubertForCTC", "HubertModel",
        "Wav2Vec2ForCTC", "Wav2Vec2ForPreTraining", "Wav2Vec2Model", "ViTModel",
        "ViTForImageClassification", "DeiTModel", "DeiTForImageClassification",
        "ASTForAudioClassification"], _ENCODER),
    **dict.fromkeys([
        "BartForConditionalGeneration", "BlenderbotForConditionalGeneration",
        "LEDForConditionalGeneration", "LongT5ForConditionalGeneration",
        "M2M100ForConditionalGeneration", "MarianMTModel", "MBartForConditionalGeneration",
        "PegasusForConditionalGeneration", "T5ForConditionalGeneration",
        "MT5ForConditionalGeneration", "T5WithLMHeadModel", "T5GemmaForConditionalGeneration",
        "T5Gemma2ForConditionalGeneration", "SwitchTransformersForConditionalGeneration",
        "Florence2ForConditionalGeneration"], _ENCODER_DECODER),
    **dict.fromkeys([
        "Gemma3ForConditionalGeneration", "Gemma3nForConditionalGeneration",
        "Gemma4ForConditionalGeneration", "Gemma4UnifiedForConditionalGeneration",
        "Glm4vForConditionalGeneration", "GlmAsrForConditionalGeneration",
        "Idefics3ForConditionalGeneration", "Llama4ForConditionalGeneration",
        "LlavaForConditionalGeneration", "LlavaNextForConditionalGeneration",
        "LlavaOnevisionForConditionalGeneration", "Mistral3ForConditionalGeneration",
        "Qwen2_5_VLForConditionalGeneration", "Qwen2AudioForConditionalGeneration",
        "Qwen3VLForConditionalGeneration", "Qwen3VLMoeForConditionalGeneration",
        "Qwen3_5ForConditionalGeneration", "Qwen3_5MoeForConditionalGeneration",
        "Emu3ForConditionalGeneration", "AudioFlamingo3ForConditionalGeneration",
        "MusicFlamingoForConditionalGeneration", "MuseGlimmerForConditionalGeneration"], _MULTIMODAL),
    **dict.fromkeys(["BD3LM", "DreamModel", "GiddForDiffusionLM", "LLaDAModelLM",
                     "LLaDA2MoeModelLM"], _NON_CAUSAL),
    **dict.fromkeys([
        "AfmoeForCausalLM", "DeepseekV2ForCausalLM", "DeepseekV3ForCausalLM",
        "DeepseekV4ForCausalLM", "Ernie4_5_MoeForCausalLM", "Glm4MoeForCausalLM",
        "Glm4MoeLiteForCausalLM", "GlmMoeDsaForCausalLM", "GptOssForCausalLM",
        "GraniteMoeForCausalLM", "JetMoeForCausalLM", "JetMoEForCausalLM", "Llama4ForCausalLM",
        "MiniMaxM2ForCausalLM", "MixtralForCausalLM", "OlmoeForCausalLM", "PhiMoEForCausalLM",
        "Qwen2MoeForCausalLM", "Qwen3MoeForCausalLM", "FlexOlmoForCausalLM", "LagunaForCausalLM"],
        _MOE),
    **dict.fromkeys([
        "ApertusForCausalLM", "ArceeForCausalLM", "BaiChuanForCausalLM", "BaichuanForCausalLM",
        "BitNetForCausalLM", "BloomForCausalLM", "BloomModel", "CodeGenForCausalLM",
        "Cohere2ForCausalLM", "CohereForCausalLM", "Ernie4_5ForCausalLM", "ExaoneForCausalLM",
        "Exaone4ForCausalLM", "FalconForCausalLM", "GemmaForCausalLM", "Gemma1ForCausalLM",
        "Gemma4ForCausalLM", "GraniteForCausalLM", "GlmForCausalLM", "Glm4ForCausalLM",
        "GPTBigCodeForCausalLM", "GPT2LMHeadCustomModel", "GPTJForCausalLM",
        "HunYuanDenseV1ForCausalLM", "InternLM2ForCausalLM", "Jais2ForCausalLM",
        "Ministral3ForCausalLM", "VaultGemmaForCausalLM", "YoutuForCausalLM",
        "ModernBertDecoderForCausalLM", "NanoChatForCausalLM", "NemotronForCausalLM",
        "MPTForCausalLM", "MptForCausalLM", "NeoForCausalLM", "GPTNeoForCausalLM",
        "NeelSoluOldForCausalLM", "OlmoForCausalLM", "OpenAIGPTLMHeadModel", "OpenELMForCausalLM",
        "OPTForCausalLM", "PhiForCausalLM", "QwenForCausalLM", "SeedOssForCausalLM",
        "StableLmForCausalLM", "Starcoder2ForCausalLM", "XGLMForCausalLM", "NanoGPTForCausalLM",
        "MinGPTForCausalLM", "TransformerLensNative", "TransformerLensPretrain"], _NOT_MAPPED),
}
"""Architectures refused by name, before any weights load, with the reason."""


def _causal_lm_class(model_type: str | None) -> str:
    """The causal-LM class transformers builds for `model_type` (a config saved without its
    `architectures`), or "" where it has none."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(model_type or "", "")


def refusal_of(architecture: str) -> str | None:
    """Why `architecture` (a Hugging Face class name) is refused, or None where it is computed or
    unknown to the bridge (then its `model_type` decides)."""
    reason = REFUSED.get(architecture)
    if reason is None:
        return None
    return (f"architecture {architecture} is not supported: {reason}. pathpatch computes "
            f"{', '.join(sorted(set(COMPUTED.values())))} exactly (docs/MODELS.md)")
