"""The shape and options of a transformer, as one frozen dataclass: what `Transformer` builds.

Field names are TransformerLens's (`HookedTransformerConfig` in 3.x), so a checkpoint JSON written
for TransformerLens 3 loads unchanged and the bundled models keep their weight names and digests.
`support.py` classifies every field (computed exactly, or an inert label); a value the model cannot
be built with is refused when the config is made, never approximated.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pathpatch.errors import PathPatchError

if TYPE_CHECKING:  # read without torch: `pathpatch graph` and `explain` start without it
    import torch

NORMALIZATIONS = ("LN", "RMS", "LNPre", "RMSPre", None)
POSITIONAL_EMBEDDINGS = ("standard", "rotary")
ACTIVATIONS = ("gelu", "gelu_new", "gelu_pytorch_tanh", "gelu_fast", "relu", "silu")

# TransformerLens 3 fields a checkpoint JSON may carry that change nothing here: tokenization,
# initialization, labels and hook switches (hooks are switched on the model, never on its config)
INERT_TL3_FIELDS = frozenset({
    "seed", "init_weights", "init_mode", "initializer_range", "device", "dtype", "model_name",
    "tokenizer_name", "default_prepend_bos", "tokenizer_prepends_bos", "trust_remote_code",
    "from_checkpoint", "checkpoint_index", "checkpoint_label_type", "checkpoint_value", "n_params",
    "use_attn_result", "use_split_qkv_input", "use_attn_in", "use_hook_mlp_in", "use_hook_tokens",
    "ungroup_grouped_query_attention", "n_devices", "attention_dir",
})

# TransformerLens 3 options that change the forward and that pathpatch does not compute: refused
# by name unless at TransformerLens 3's default (then they change nothing)
REFUSED_TL3_FIELDS: dict[str, tuple[Any, str]] = {
    "use_attention_sinks": (False, "attention sinks (a learned extra softmax column)"),
    "use_logn_attn": (False, "log-n scaling of queries by position"),
    "clip_qkv": (None, "q/k/v clamped after the projection"),
    "num_experts": (None, "mixture-of-experts MLPs"),
    "experts_per_token": (None, "mixture-of-experts MLPs"),
    "use_yarn_rope": (False, "YaRN rotary scaling"),
    "use_dynamic_ntk_rope": (False, "dynamic NTK rotary scaling"),
    "post_embedding_ln": (False, "a norm of the token embedding"),
    "load_in_4bit": (False, "4-bit quantized weights"),
}


@dataclass(frozen=True)
class ModelConfig:
    """A decoder-only transformer: `Transformer(cfg)` builds it, `Adapter` reads it."""

    n_layers: int
    d_model: int
    n_ctx: int  # the longest sequence (positional rows or rotary range), never a sequence length
    d_head: int
    d_vocab: int  # token ids
    n_heads: int
    d_mlp: int | None = None
    act_fn: str | None = None
    d_vocab_out: int = -1  # logits per position; -1: d_vocab
    eps: float = 1e-5
    attn_only: bool = False
    normalization_type: str | None = "LN"  # before each sublayer and at the end
    final_rms: bool = False  # the final norm is RMS even where normalization_type is not
    positional_embedding_type: str = "standard"  # learned rows added to `in`, or rotary
    rotary_dim: int | None = None  # rotated dims of each head (the first rotary_dim)
    rotary_base: float = 10000.0
    rotary_base_local: float | None = None  # local (windowed) layers' own base (Gemma-3)
    rotary_adjacent_pairs: bool = False  # GPT-J pairs (2i, 2i+1); else NeoX halves
    rotary_scaling_factor: float = 1.0  # linear rope scaling of global layers
    use_NTK_by_parts_rope: bool = False  # Llama-3's rope scaling
    NTK_by_parts_factor: float = 8.0
    NTK_by_parts_low_freq_factor: float = 1.0
    NTK_by_parts_high_freq_factor: float = 4.0
    NTK_original_ctx_len: int = 8192
    rotary_layers: tuple[bool, ...] | None = None  # per layer, whether it rotates (SmolLM3); None: all
    gated_mlp: bool = False
    parallel_attn_mlp: bool = False  # the MLP reads the layer's input beside the heads (NeoX)
    n_key_value_heads: int | None = None  # grouped-query attention; None: one kv head per head
    use_local_attn: bool = False
    window_size: int | None = None
    attn_types: tuple[str, ...] | None = None  # per layer "local" or "global"
    use_qk_norm: bool = False  # an RMS norm of each head's q and k (Qwen3, Gemma-3)
    qk_norm_over_heads: bool = False  # the q/k norm acts on all heads' projection together (OLMo-2)
    use_normalization_before_and_after: bool = False  # norms after attention and MLP too (Gemma)
    post_norm_only: bool = False  # norms after attention and MLP only, none before (OLMo-2)
    use_attn_scale: bool = True
    attn_scale: float = -1.0  # scores are divided by it; -1: sqrt(d_head)
    scale_attn_by_inverse_layer_idx: bool = False  # GPT-2 option: scale times (layer + 1)
    attn_scores_soft_cap: float = -1.0  # cap * tanh(scores / cap); -1: none
    output_logits_soft_cap: float = -1.0
    original_architecture: str | None = None  # a label: the Hugging Face class it came from
    dtype: torch.dtype | None = None  # the weights'; None: float32 (`Transformer` sets it)
    device: str = "cpu"

    def __post_init__(self) -> None:
        def fix(name: str, value: Any) -> None:
            object.__setattr__(self, name, value)

        if self.d_vocab_out == -1:
            fix("d_vocab_out", self.d_vocab)
        if self.attn_scale == -1.0:
            fix("attn_scale", float(self.d_head) ** 0.5)
        if self.attn_types is not None:
            fix("attn_types", tuple(self.attn_types))
        if self.rotary_layers is not None:
            fix("rotary_layers", tuple(bool(r) for r in self.rotary_layers))
        if self.positional_embedding_type == "rotary" and self.rotary_dim is None:
            fix("rotary_dim", self.d_head)
        problems = []
        if self.normalization_type not in NORMALIZATIONS:
            problems.append(f"normalization_type={self.normalization_type!r} (supported: LN, RMS, "
                            "LNPre, RMSPre, None)")
        if self.positional_embedding_type not in POSITIONAL_EMBEDDINGS:
            problems.append(f"positional_embedding_type={self.positional_embedding_type!r} "
                            "(supported: standard, rotary)")
        if not self.attn_only and (self.d_mlp is None or self.act_fn not in ACTIVATIONS):
            problems.append(f"an MLP needs d_mlp and act_fn in {ACTIVATIONS} (got d_mlp="
                            f"{self.d_mlp!r}, act_fn={self.act_fn!r})")
        if self.n_key_value_heads is not None and self.n_heads % self.n_key_value_heads:
            problems.append(f"n_heads={self.n_heads} is not a multiple of n_key_value_heads="
                            f"{self.n_key_value_heads}")
        if self.use_local_attn and (self.window_size is None or self.attn_types is None
                                    or len(self.attn_types) != self.n_layers):
            problems.append("local attention needs window_size and attn_types for every layer")
        if self.rotary_layers is not None and len(self.rotary_layers) != self.n_layers:
            problems.append(f"rotary_layers has {len(self.rotary_layers)} entries for "
                            f"{self.n_layers} layers")
        if self.post_norm_only and self.use_normalization_before_and_after:
            problems.append("post_norm_only and use_normalization_before_and_after exclude "
                            "each other")
        if problems:
            raise PathPatchError("invalid model config: " + "; ".join(problems))

    @classmethod
    def from_dict(cls, fields: dict[str, Any], **overrides: Any) -> ModelConfig:
        """A config from JSON-like fields (TransformerLens 3 names accepted; its inert ones
        ignored); unknown fields are an error naming them."""
        known = {f.name for f in dataclasses.fields(cls)} - {"dtype", "device"}
        refused = [f"{name}={fields[name]!r}: {why} is not computed exactly"
                   for name, (default, why) in REFUSED_TL3_FIELDS.items()
                   if name in fields and fields[name] != default]
        if refused:
            raise PathPatchError("unsupported model architecture: " + "; ".join(refused))
        unknown = sorted(set(fields) - known - INERT_TL3_FIELDS - set(REFUSED_TL3_FIELDS))
        if unknown:
            raise PathPatchError(
                f"unknown model config field(s) {', '.join(unknown)}: expected fields such as "
                "n_layers, d_model, n_heads, d_head, d_mlp, n_ctx, d_vocab, attn_only "
                "(pathpatch.model.ModelConfig lists them all)")
        kwargs = {k: v for k, v in fields.items() if k in known}
        kwargs.update(overrides)
        try:
            return cls(**kwargs)
        except TypeError as err:
            raise PathPatchError(f"invalid model config {fields}: {err}") from None

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    @property
    def n_kv_heads(self) -> int:
        return self.n_key_value_heads or self.n_heads

    @property
    def has_mlp(self) -> bool:
        return not self.attn_only

    @property
    def mlp_beside_heads(self) -> bool:
        """Each MLP reads its layer's input beside the heads (GPT-J, GPT-NeoX): the graph's wiring."""
        return bool(self.parallel_attn_mlp) and self.has_mlp

    @property
    def heads_normed(self) -> bool:
        """A norm acts on the sum of each layer's heads, and another on each MLP's output, before
        the residual stream (Gemma-2, OLMo-2)."""
        return bool(self.use_normalization_before_and_after or self.post_norm_only)

    @property
    def rotary(self) -> bool:
        """Some layer rotates q and k."""
        return any(self.rotates(layer) for layer in range(self.n_layers))

    def describe(self) -> str:
        """One line on how the model computes (what `pathpatch graph` prints under the graph)."""
        parts = [f"norm {self.normalization_type or 'none'}"]
        if self.rotary:
            still = [layer for layer in range(self.n_layers) if not self.rotates(layer)]
            parts.append(f"rotary on {self.rotary_dim} of {self.d_head} head dims"
                         + (f" (none in layers {', '.join(map(str, still))})" if still else ""))
        if self.n_kv_heads != self.n_heads:
            parts.append(f"grouped-query attention ({self.n_kv_heads} kv heads for {self.n_heads})")
        local = [layer for layer in range(self.n_layers) if self.is_local(layer)]
        if local:
            parts.append(f"a window of {self.window_size} keys in layer{'s' * (len(local) > 1)} "
                         + ", ".join(map(str, local)))
        if self.use_qk_norm:
            parts.append("q/k norms" + (" over all heads" if self.qk_norm_over_heads else ""))
        if self.heads_normed:
            parts.append("norms after attention and after the MLP"
                         + (" only" if self.post_norm_only else ""))
        if self.attn_scores_soft_cap > 0 or self.output_logits_soft_cap > 0:
            parts.append("soft caps")
        if self.has_mlp:
            parts.append(("gated " if self.gated_mlp else "") + f"{self.act_fn} MLPs"
                         + (" in parallel with attention" if self.mlp_beside_heads else ""))
        return "architecture: " + "; ".join(parts)

    def keys_per_query(self, layer: int, seq_len: int) -> float:
        """Keys a query attends to in `layer`, on average over `seq_len` positions: (T + 1) / 2
        causally, fewer within a window (position i sees min(i + 1, window) keys, as
        `Attention.allowed_keys` masks them)."""
        if not self.is_local(layer):
            return (seq_len + 1) / 2
        return sum(min(i + 1, self.window_size) for i in range(seq_len)) / seq_len

    def is_local(self, layer: int) -> bool:
        return bool(self.use_local_attn and self.attn_types and self.attn_types[layer] == "local")

    def rotates(self, layer: int) -> bool:
        """Whether `layer`'s heads rotate q and k."""
        if self.positional_embedding_type != "rotary":
            return False
        return self.rotary_layers is None or self.rotary_layers[layer]
