"""How a model computes, as the engine needs it: the one place it reads a model.

The engine recomputes parts of a forward pass for its mixed copies (a head from its q/k/v
inputs to its output, an MLP from its input, the unembedding) and reads the clean and
counterfactual runs from hooks. Everything it needs from the model goes through `Adapter`:
which hooks hold what, the q/k/v weights and the norm in front of them, the norms and rotation
of q and k, the keys a query may see (causal, or a window), the attention scale and soft cap,
each head's output matrix, the MLP with its norm, the final norm with the unembedding, and the
graph's wiring (sequential, or attention and MLP in parallel). `group_evaluation.py`, `runs.py`
and `folding.py` never read model modules or hook names themselves, so another architecture, or
another backend than pathpatch's `Transformer`, is one adapter.

What is computed exactly, and what is refused by name, is `support.py`'s table, which
`Graph.from_model` applies before any adapter is used.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from pathpatch.model.transformer import softcap

_KEPT = "_pathpatch_adapter"
"""The model attribute `Adapter.of` keeps the model's adapter in."""

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
    norm: str | None  # "LN", "RMS" or None
    norm_w: torch.Tensor | None  # [d_model]
    norm_b: torch.Tensor | None  # [d_model]
    eps: float

    @property
    def group(self) -> int:
        """Query heads per kv head (1 without grouped-query attention)."""
        return self.W_Q.shape[0] // self.W_K.shape[0]


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
    """One pathpatch `Transformer`, read the way the engine needs it."""

    def __init__(self, model):
        self.model = model
        self.cfg = cfg = model.cfg
        self.graph = None
        """The model's `Graph`, made and checked once by `Graph.from_model` and kept here."""
        self.n_layers = cfg.n_layers
        self.n_heads = cfg.n_heads
        self.d_model = cfg.d_model
        self.d_vocab = cfg.d_vocab  # token ids a dataset may hold
        self.d_vocab_out = cfg.d_vocab_out  # logits per position
        self.n_ctx = cfg.n_ctx
        """The longest sequence the model takes: a limit to check, never the sequence length
        (Llama-3's is 131,072)."""
        self.has_mlp = cfg.has_mlp
        self.parallel = cfg.mlp_beside_heads
        """The MLP of a layer reads the layer's input, beside its heads (GPT-J, GPT-NeoX)."""
        self.rotary = cfg.rotary
        self.qk_norm = bool(cfg.use_qk_norm)
        self.qk_norm_over_heads = self.qk_norm and bool(cfg.qk_norm_over_heads)
        """The q/k norm acts on all heads' projection of a row's input (OLMo-2): `project_rows`
        callers scale each q/k row by `over_heads_inv_rms` of its own input (`norm_over_heads`)."""
        self.transforms_qk = self.rotary or self.qk_norm
        """q and k rows change after their projection (`finish_qk`)."""
        self.caps_scores = cfg.attn_scores_soft_cap > 0
        """Attention scores go through cap * tanh(x / cap) before the mask (Gemma-2)."""
        self.n_kv_heads = cfg.n_kv_heads
        self.heads_normed = cfg.heads_normed
        """A norm acts on the sum of each layer's heads, and another on each MLP's output, before
        the residual stream (Gemma-2, OLMo-2): the MLP's is part of its node (`mlp`), the heads'
        is computed once per combination of head copies a receiver reads (`norm_heads_sum`)."""

    @classmethod
    def of(cls, model) -> Adapter:
        """The adapter of `model`: made once per model and kept on it, so every caller in a
        process reads the same one (and `graph`, checked once, with it).

        Kept on the model itself (an attribute), not in a table keyed by models: the adapter
        refers to its model, so a table would keep every model alive; on the model the pair is
        one garbage cycle that goes with it. It is safe while the model changes: the adapter
        holds only what its config says (shapes, flags) and reads weights, dtype and device
        from the model at each call, so `model.to(dtype)`, `load_state_dict` or training leave
        it valid; a model given another config (`model.cfg = ...`, a new frozen object) gets a
        new adapter, and so a new graph, checked again. A copy of the model (`copy.deepcopy`)
        carries a copy that refers to the copy.

        Warning:
            Sets one plain attribute on the model (`_pathpatch_adapter`), kept for its life: no
            parameter, buffer, hook or switch, so its forward and state dict are unchanged."""
        kept = model.__dict__.get(_KEPT)
        if kept is None or kept.cfg is not model.cfg:
            kept = cls(model)
            object.__setattr__(model, _KEPT, kept)  # a plain attribute, not a submodule
        return kept

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
        # an MLP keeps up to two d_mlp-wide tensors at once (gated: the activated gate and the
        # up projection); four counted, as a margin for the allocator
        hidden = 4 * cfg.d_mlp if self.has_mlp else 0
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
        `split_input_hook` and `mlp_split_input_hook`; the model is as before afterwards.

        Warning:
            Switches the model's hook points for the duration, restored in `finally`."""
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
        `unembed`, as every mixed copy's do."""
        names = self.run_hooks()
        _, cache = self.model.run_with_cache(tokens, names_filter=lambda n: n in names,
                                             return_type=None)
        cache = dict(cache.items())
        final = cache[self.output_input_hook()]
        logits = self.unembed(final.reshape(-1, final.shape[-1]))
        return logits.view(*final.shape[:-1], -1), cache

    def residual_with_hooks(self, tokens: torch.Tensor, hooks: list) -> torch.Tensor:
        """[batch, pos, d_model] the residual stream `unembed` reads, from a forward with `hooks`
        ((hook name, function) pairs) attached for its duration."""
        return self.model.run_with_hooks(tokens, fwd_hooks=hooks, return_type="residual")

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
        attn, ln = block.attn, block.ln1
        W_K, W_V, b_K, b_V = attn.kv_weights()  # per kv head, never repeated
        return QKVWeights(
            W_Q=attn.W_Q, W_K=W_K, W_V=W_V, b_Q=attn.b_Q, b_K=b_K, b_V=b_V,
            norm=ln.kind if ln is not None else None,
            norm_w=getattr(ln, "w", None), norm_b=getattr(ln, "b", None),
            eps=float(getattr(ln, "eps", 0.0)),
        )

    def norm_before_heads(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        """The heads' norm as the model's own module (half precision: `folding.py`)."""
        return _call(self.model.blocks[layer].ln1, x)

    def finish_qk(self, layer: int, x: torch.Tensor, channel: str) -> torch.Tensor:
        """q or k rows [rows, batch, pos, d_head] as attention reads them: the head's q/k norm
        (Qwen3, Gemma-3), then rotation of each row by its own position. Both act per position,
        so they commute with picking versions per destination (q) or per source (k) afterwards."""
        attn = self.model.blocks[layer].attn
        if self.qk_norm and not self.qk_norm_over_heads:
            x = (attn.q_norm if channel == "q" else attn.k_norm)(x)
        if attn.rotates:
            x = attn.apply_rotary(x.permute(1, 2, 0, 3)).permute(2, 0, 1, 3)
        return x

    def norm_over_heads(self, layer: int, rows: torch.Tensor, x: torch.Tensor, channel: str,
                        heads: torch.Tensor) -> torch.Tensor:
        """q or k rows [rows, tokens, d_head] of heads `heads` [rows] (query heads; k: their kv
        heads are read) under OLMo-2's norm over all heads: each row times the inverse RMS of its
        own input's projection through every head (x [rows, tokens, d_model], or [tokens,
        d_model] shared by all rows), times its head's slice of the norm weight."""
        W, b, norm = self.model.blocks[layer].attn.qk_projection(channel)
        if channel == "k":
            heads = heads // (self.n_heads // self.n_kv_heads)
        # every head's projection of each input, W read in place: [..., heads, tokens, d_head]
        full = torch.matmul(x.unsqueeze(-3), W) + b.unsqueeze(-2)
        if full.dtype not in (torch.float32, torch.float64):
            full = full.float()
        inv = torch.rsqrt(full.pow(2).mean((-3, -1)).unsqueeze(-1) + norm.eps).to(rows.dtype)
        weight = norm.w.view(W.shape[0], -1)[heads.to(norm.w.device)]  # [rows, d_head]
        return rows * inv * weight[:, None, :]

    def allowed_keys(self, layer: int, n_pos: int, device) -> torch.Tensor | None:
        """[dest, src] bool, the keys a query may attend to in `layer`, from the model's own mask
        (local layers: a window); None where that is plain causal attention."""
        attn = self.model.blocks[layer].attn
        if attn.attn_type != "local":
            return None
        return attn.allowed_keys(n_pos, device)

    def cap_scores(self, scores: torch.Tensor) -> torch.Tensor:
        """Attention scores (already divided by the scale) through the model's soft cap."""
        return softcap(scores, self.model.cfg.attn_scores_soft_cap)

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
        """The post-attention norm (Gemma's `post_attention_layernorm`, OLMo-2's) of heads' sums x."""
        return self.model.blocks[layer].ln1_post(x)

    # --- MLPs and the output -------------------------------------------------------------------

    def mlp(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        """The MLP node's output from its input rows x [..., pos, d_model] (norms included)."""
        block = self.model.blocks[layer]
        return _call(block.ln2_post, block.mlp(_call(block.ln2, x)))

    def unembed(self, rows: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [rows, vocab] of residual rows [rows, d_model] (final norm and soft cap
        included), written into `out` [rows, vocab] when given."""
        normed = _call(self.model.ln_final, rows)
        unembed = self.model.unembed
        logits = torch.addmm(unembed.b_U, normed, unembed.W_U, out=out)
        cap = self.model.cfg.output_logits_soft_cap
        if out is None:  # out of place: attribution differentiates through it
            return softcap(logits, cap)
        if cap > 0:  # cap * tanh(x / cap), in the caller's buffer
            logits.div_(cap).tanh_().mul_(cap)
        return logits


def _call(norm, x: torch.Tensor) -> torch.Tensor:
    """A norm module, or identity for models built without normalization."""
    return x if norm is None else norm(x)
