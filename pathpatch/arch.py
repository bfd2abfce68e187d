"""How a model computes, as the engine needs it: the one place it reads a model.

The engine recomputes parts of a forward pass for its mixed copies (a head from its q/k/v
inputs to its output, an MLP from its input, the unembedding) and reads the clean and
counterfactual runs from hooks. Everything it needs from the model goes through `Adapter`:
which hooks hold what, the q/k/v weights and the norm in front of them, the norms and rotation
of q and k, the keys a query may see (causal, or a window), the attention scale and soft cap,
each head's output matrix, the MLP with its norm, the final norm with the unembedding, and the
graph's wiring (sequential, or attention and MLP in parallel). `stacking.py`, `runs.py` and
`folding.py` never read TransformerLens modules or hook names themselves, so another
architecture, or another backend than TransformerLens's `HookedTransformer`, is one adapter.

What is computed exactly, and what is refused by name, is `support.py`'s table, which
`Graph.from_model` applies before any adapter is used.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformer_lens.utilities.activation_functions import apply_softcap, softcap_enabled

_TANH_GELU = {"gelu_new", "gelu_pytorch_tanh"}  # exactly torch's tanh approximation
EMBED_HOOK = "hook_embed"
"""The token embedding alone (the positional embedding, where there is one, is equal in both runs
and cancels; rotary models have none)."""


@dataclass(frozen=True)
class QKVWeights:
    """One layer's q/k/v projections and the norm that precedes them.

    k and v are per kv head: under grouped-query attention query head h reads kv head
    h // group, and the weights are never repeated per query head (for Llama-3-8B in float32
    that would be ~13 GB).
    """

    W_Q: torch.Tensor  # [head, d_model, d_head]
    W_K: torch.Tensor  # [kv_head, d_model, d_head]
    W_V: torch.Tensor  # [kv_head, d_model, d_head]
    b_Q: torch.Tensor  # [head, d_head]
    b_K: torch.Tensor  # [kv_head, d_head]
    b_V: torch.Tensor  # [kv_head, d_head]
    norm: str | None  # "LN", "LNPre", "RMS", "RMSPre" or None
    norm_w: torch.Tensor | None  # [d_model]
    norm_b: torch.Tensor | None  # [d_model]
    eps: float

    @property
    def group(self) -> int:
        """Query heads per kv head (1 without grouped-query attention)."""
        return self.W_Q.shape[0] // self.W_K.shape[0]


@dataclass(frozen=True)
class UnitCosts:
    """Multiply-adds per token of each computation a mixed copy repeats, on one model at one
    sequence length: what the cost estimate (`copies.estimate_cost`) counts copies in."""

    projection: int  # one q, k or v row of one head: d_model x d_head
    attention: tuple[float, ...]  # per layer: one head's scores (or weighted values) per query
    head_output: int  # one head's z through W_O
    mlp: int  # one MLP (gated: three matrices; mixture of experts: those a token uses)
    unembed: int
    mixing_term: int  # one bank entry added into one input row
    forward: float  # a plain forward


@dataclass(frozen=True)
class Footprint:
    """Elements per token that the engine holds for one model at one sequence length: what
    `engine.MemoryBudget` counts bytes in (`Adapter.footprint`)."""

    cached_run: int  # one cached run: the `run_hooks` activations, heads' sums where normed, logits
    bank: int  # the counterfactual deviation bank: every node's output, d_model wide each
    forward: int  # a forward's widest transient activations: MLP hidden, attention scores, logits
    d_model: int
    d_vocab: int  # logits per position
    itemsize: int  # bytes per element, the weights' dtype


class Adapter:
    """One TransformerLens `HookedTransformer`, read the way the engine needs it."""

    def __init__(self, model):
        self.model = model
        cfg = model.cfg
        self.n_layers = cfg.n_layers
        self.n_heads = cfg.n_heads
        self.d_vocab = cfg.d_vocab  # token ids a dataset may hold
        self.d_vocab_out = cfg.d_vocab_out  # logits per position
        self.n_ctx = cfg.n_ctx
        """The longest sequence the model takes: a limit to check, never the sequence length
        (Llama-3's is 131,072)."""
        self.has_mlp = not cfg.attn_only
        self.parallel = bool(cfg.parallel_attn_mlp) and self.has_mlp
        """The MLP of a layer reads the layer's input, beside its heads (GPT-J, GPT-NeoX)."""
        self.rotary = cfg.positional_embedding_type == "rotary"
        self.qk_norm = bool(cfg.use_qk_norm)
        self.transforms_qk = self.rotary or self.qk_norm
        """q and k rows change after their projection (`finish_qk`)."""
        self.caps_scores = softcap_enabled(cfg.attn_scores_soft_cap)
        """Attention scores go through cap * tanh(x / cap) before the mask (Gemma-2)."""
        self.n_kv_heads = cfg.n_key_value_heads or cfg.n_heads
        self.heads_normed = bool(cfg.use_normalization_before_and_after)
        """A norm acts on the sum of each layer's heads, and another on each MLP's output, before
        the residual stream (Gemma-2): the MLP's is part of its node (`mlp`), the heads' is
        computed once per combination of head copies a receiver reads (`norm_heads_sum`)."""

    @classmethod
    def of(cls, model) -> Adapter:
        """The adapter of `model`. Cheap (it reads the config), so not cached: a cache keyed by
        the model would keep every model alive through the adapter's reference to it."""
        return cls(model)

    def describe(self) -> str:
        """One line on how the model computes (what `pathpatch graph` prints under the graph)."""
        cfg = self.model.cfg
        parts = [f"norm {cfg.normalization_type or 'none'}"]
        if self.rotary:
            parts.append(f"rotary on {cfg.rotary_dim} of {cfg.d_head} head dims")
        if self.n_kv_heads != self.n_heads:
            parts.append(f"grouped-query attention ({self.n_kv_heads} kv heads for {self.n_heads})")
        local = [layer for layer in range(self.n_layers)
                 if getattr(self.model.blocks[layer].attn, "attn_type", "global") == "local"]
        if local:
            parts.append(f"a window of {cfg.window_size} keys in layers {', '.join(map(str, local))}")
        if self.qk_norm:
            parts.append("q/k norms")
        if self.heads_normed:
            parts.append("norms after attention and after the MLP")
        if self.caps_scores or softcap_enabled(cfg.output_logits_soft_cap):
            parts.append("soft caps")
        if self.has_mlp:
            parts.append(("gated " if cfg.gated_mlp else "") + f"{cfg.act_fn} MLPs"
                         + (" in parallel with attention" if self.parallel else ""))
        return "architecture: " + "; ".join(parts)

    def unit_costs(self, seq_len: int) -> UnitCosts:
        """Per-token multiply-adds at `seq_len` (never `n_ctx`: Llama-3's is 131,072). A query
        attends to (seq_len + 1) / 2 keys on average, fewer in a window (`allowed_keys`); a
        forward projects k and v at kv size."""
        cfg = self.model.cfg
        d, dh = cfg.d_model, cfg.d_head
        attention = []
        for layer in range(self.n_layers):
            allowed = self.allowed_keys(layer, seq_len, "cpu")  # None: plain causal
            keys = (seq_len + 1) / 2 if allowed is None else int(allowed.sum()) / seq_len
            attention.append(dh * keys)
        mlp = 0
        if self.has_mlp:
            mlp = (3 if cfg.gated_mlp else 2) * d * cfg.d_mlp
            if cfg.num_experts:
                mlp = cfg.experts_per_token * mlp + d * cfg.num_experts  # and the router
        per_layer = [(self.n_heads + 2 * self.n_kv_heads) * d * dh
                     + self.n_heads * (2 * a + dh * d) + mlp for a in attention]
        return UnitCosts(projection=d * dh, attention=tuple(attention), head_output=dh * d,
                         mlp=mlp, unembed=d * cfg.d_vocab, mixing_term=d,
                         forward=sum(per_layer) + d * cfg.d_vocab)

    def footprint(self, seq_len: int) -> Footprint:
        """What the engine holds per token at `seq_len` (never `n_ctx`): the cached runs keep
        exactly `run_hooks` (z per query head, every other hook d_model wide); the bank has a
        slot per node of the evaluation graph (`in`, heads, MLPs, Gemma-2's heads' sums, `out`)."""
        cfg = self.model.cfg
        d = cfg.d_model
        z_hooks = {self.z_hook(layer) for layer in range(self.n_layers)}
        cached = sum(self.n_heads * cfg.d_head if hook in z_hooks else d
                     for hook in self.run_hooks()) + self.d_vocab_out
        if self.heads_normed:
            cached += self.n_layers * d  # each layer's heads' sum (`Runs.residual_at`)
        nodes = 2 + self.n_layers * (self.n_heads + self.has_mlp + self.heads_normed)
        # TransformerLens keeps up to four d_mlp-wide tensors of an MLP (gated: gate, linear,
        # activation, product), per expert a token uses
        hidden = 4 * cfg.d_mlp * (cfg.experts_per_token or 1) if self.has_mlp else 0
        forward = hidden + self.n_heads * seq_len + 2 * self.d_vocab_out
        itemsize = next(self.model.parameters()).element_size()
        return Footprint(cached, nodes * d, forward, d, self.d_vocab_out, itemsize)

    # --- the cached runs -----------------------------------------------------------------------

    def z_hook(self, layer: int) -> str:
        return f"blocks.{layer}.attn.hook_z"

    def mlp_out_hook(self, layer: int) -> str:
        return f"blocks.{layer}.hook_mlp_out"

    def attn_out_hook(self, layer: int) -> str:
        """What a layer's attention adds to the residual stream (after its norm, if any)."""
        return f"blocks.{layer}.hook_attn_out"

    def head_input_hook(self, layer: int) -> str:
        """The residual stream the heads of `layer` read."""
        return f"blocks.{layer}.hook_resid_pre"

    def mlp_input_hook(self, layer: int) -> str:
        """The residual stream the MLP of `layer` reads: after its heads, or beside them."""
        return self.head_input_hook(layer) if self.parallel else f"blocks.{layer}.hook_resid_mid"

    def output_input_hook(self) -> str:
        return f"blocks.{self.n_layers - 1}.hook_resid_post"

    def pattern_hook(self, layer: int) -> str:
        """Attention patterns [batch, head, dest, src] (evidence, not the engine)."""
        return f"blocks.{layer}.attn.hook_pattern"

    def split_input_hook(self, layer: int, channel: str) -> str:
        """A head channel's own input [batch, pos, head, d_model], "q", "k" or "v" (hook runs
        with split inputs, which TransformerLens builds only when asked)."""
        return f"blocks.{layer}.hook_{channel}_input"

    def mlp_split_input_hook(self, layer: int) -> str:
        """The MLP's input before its norm (hook runs with `use_hook_mlp_in`)."""
        return f"blocks.{layer}.hook_mlp_in"

    @contextlib.contextmanager
    def split_inputs(self) -> Iterator[None]:
        """Within: hook runs see each query head's own q, k and v input (k/v per query head under
        grouped-query attention, as the graph's channels are) and the MLP's input, at
        `split_input_hook` and `mlp_split_input_hook`; the model is as before afterwards."""
        model = self.model
        grouped = self.n_kv_heads != self.n_heads
        model.set_use_split_qkv_input(True)
        if grouped:
            model.set_ungroup_grouped_query_attention(True)
        if self.has_mlp:
            model.set_use_hook_mlp_in(True)
        try:
            yield
        finally:
            model.set_use_split_qkv_input(False)
            if grouped:
                model.set_ungroup_grouped_query_attention(False)
            if self.has_mlp:
                model.set_use_hook_mlp_in(False)

    def run(self, tokens: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(logits, the `run_hooks` activations) of one plain forward. The logits come from
        `unembed` and the MLPs from `mlp`'s products, as every mixed copy's do
        (TransformerLens's own modules copy W_U and a gated MLP's weights transposed)."""
        names = self.run_hooks()
        with self._mlps_by_products():
            _, cache = self.model.run_with_cache(tokens, names_filter=lambda n: n in names,
                                                 return_type=None)
        cache = dict(cache.items())
        final = cache[self.output_input_hook()]
        logits = self.unembed(final.reshape(-1, final.shape[-1]))
        return logits.view(*final.shape[:-1], -1), cache

    def run_hooks(self) -> set[str]:
        """Every hook the cached runs keep."""
        names = {EMBED_HOOK, self.output_input_hook()}
        for layer in range(self.n_layers):
            names |= {self.head_input_hook(layer), self.z_hook(layer)}
            if self.heads_normed:
                names.add(self.attn_out_hook(layer))
            if self.has_mlp:
                names |= {self.mlp_input_hook(layer), self.mlp_out_hook(layer)}
        return names

    # --- heads ---------------------------------------------------------------------------------

    def qkv_weights(self, layer: int) -> QKVWeights:
        block = self.model.blocks[layer]
        attn, ln = block.attn, getattr(block, "ln1", None)
        # TransformerLens's grouped-query attention keeps kv-size weights under `_W_K`/`_W_V` and
        # repeats them per query head in its `W_K`/`W_V` properties: read the unrepeated ones
        kv = "_" if self.n_kv_heads != self.n_heads else ""
        return QKVWeights(
            W_Q=attn.W_Q, W_K=getattr(attn, f"{kv}W_K"), W_V=getattr(attn, f"{kv}W_V"),
            b_Q=attn.b_Q, b_K=getattr(attn, f"{kv}b_K"), b_V=getattr(attn, f"{kv}b_V"),
            norm=self.model.cfg.normalization_type if ln is not None else None,
            norm_w=getattr(ln, "w", None), norm_b=getattr(ln, "b", None),
            eps=float(getattr(ln, "eps", 0.0)),
        )

    def norm_before_heads(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        """The heads' norm as the model's own module (half precision: `folding.py`)."""
        return _call(getattr(self.model.blocks[layer], "ln1", None), x)

    def finish_qk(self, layer: int, x: torch.Tensor, channel: str) -> torch.Tensor:
        """q or k rows [rows, batch, pos, d_head] as attention reads them: the head's q/k norm
        (Qwen3), then rotation of each row by its own position. Both act per position, so they
        commute with picking versions per destination (q) or per source (k) afterwards."""
        attn = self.model.blocks[layer].attn
        if self.qk_norm:
            x = (attn.q_norm if channel == "q" else attn.k_norm)(x)
        if self.rotary:
            x = attn.apply_rotary(x.permute(1, 2, 0, 3), 0, None).permute(2, 0, 1, 3)
        return x

    def allowed_keys(self, layer: int, n_pos: int, device) -> torch.Tensor | None:
        """[dest, src] bool, the keys a query may attend to in `layer`, from the model's own mask
        (local layers: a window); None where that is plain causal attention."""
        attn = self.model.blocks[layer].attn
        if getattr(attn, "attn_type", "global") != "local":
            return None
        return attn._make_causal_mask(query_ctx_length=n_pos, key_ctx_length=n_pos,
                                      past_kv_pos_offset=0, device=device)[0, 0]

    def cap_scores(self, scores: torch.Tensor) -> torch.Tensor:
        """Attention scores (already divided by the scale) through the model's soft cap."""
        return apply_softcap(scores, self.model.cfg.attn_scores_soft_cap)

    def attn_scale(self, layer: int) -> float:
        return float(self.model.blocks[layer].attn.attn_scale)

    def W_O(self, layer: int) -> torch.Tensor:
        """[head, d_head, d_model]"""
        return self.model.blocks[layer].attn.W_O

    def heads_sum(self, layer: int, z: torch.Tensor) -> torch.Tensor:
        """[batch, pos, d_model] the layer's heads summed, b_O included, from z [batch, pos, head,
        d_head]: what its post-attention norm reads."""
        attn = self.model.blocks[layer].attn
        return torch.einsum("bphe,hed->bpd", z, attn.W_O) + attn.b_O

    def norm_heads_sum(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        """The post-attention norm (Gemma-2's `post_attention_layernorm`) of heads' sums x."""
        return self.model.blocks[layer].ln1_post(x)

    # --- MLPs and the output -------------------------------------------------------------------

    def mlp(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        """The MLP node's output from its input rows x [..., pos, d_model] (norm included)."""
        block = self.model.blocks[layer]
        out = _mlp_products(block.mlp, _call(getattr(block, "ln2", None), x))
        return block.ln2_post(out) if self.heads_normed else out

    @contextlib.contextmanager
    def _mlps_by_products(self) -> Iterator[None]:
        """Within: the model's MLP modules compute through `_mlp_products` (the hooks inside an
        MLP are then not called; the cached runs keep none of them)."""
        swapped = [block.mlp for block in self.model.blocks
                   if self.has_mlp and _has_products(block.mlp)]
        for mlp in swapped:  # an instance attribute shadows the class's forward
            mlp.forward = lambda x, mlp=mlp: _mlp_products(mlp, x)
        try:
            yield
        finally:
            for mlp in swapped:
                del mlp.forward

    def unembed(self, rows: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [rows, vocab] of residual rows [rows, d_model] (final norm and soft cap
        included), written into `out` [rows, vocab] when given."""
        normed = _call(getattr(self.model, "ln_final", None), rows)
        unembed = self.model.unembed  # its own forward copies W_U transposed on every call
        logits = torch.addmm(unembed.b_U, normed, unembed.W_U, out=out)
        cap = self.model.cfg.output_logits_soft_cap
        if out is None:  # out of place: attribution differentiates through it
            return apply_softcap(logits, cap)
        if softcap_enabled(cap):  # TransformerLens's cap * tanh(x / cap), in the caller's buffer
            logits.div_(cap).tanh_().mul_(cap)
        return logits


def _has_products(mlp) -> bool:
    """Whether `_mlp_products` computes this MLP module with plain products."""
    kind = type(mlp).__name__
    return ((kind == "MLP" and mlp.cfg.act_fn in _TANH_GELU)
            or (kind == "GatedMLP" and not mlp.cfg.is_layer_norm_activation()))


def _mlp_products(mlp, x: torch.Tensor) -> torch.Tensor:
    """mlp(x) for normed rows x [..., d_model]: plain products where TransformerLens's forward is
    slow (its gelu_new is four elementwise passes where torch's fused tanh GELU is equal; its
    gated MLP copies W_gate, W_in and W_out transposed on every call), else the module itself."""
    if not _has_products(mlp):
        return mlp(x)
    flat = x.reshape(-1, x.shape[-1])
    if type(mlp).__name__ == "MLP":
        hidden = F.gelu(torch.addmm(mlp.b_in, flat, mlp.W_in), approximate="tanh")
    else:
        hidden = mlp.act_fn(torch.mm(flat, mlp.W_gate))
        hidden.mul_(torch.mm(flat, mlp.W_in)).add_(mlp.b_in)
    return torch.addmm(mlp.b_out, hidden, mlp.W_out).view(x.shape)


def _call(norm, x: torch.Tensor) -> torch.Tensor:
    """A norm module, or identity for models built without normalization."""
    return x if norm is None else norm(x)
