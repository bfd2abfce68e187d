"""What each computation a mixed copy repeats costs, from a model's config alone.

Read without torch or weights, so that a plan, `pathpatch explain` and the scheduler's cost
estimate (`copies.estimate_cost`) price a hypothesis on a model too large to load here.
"""

from __future__ import annotations

from dataclasses import dataclass

from pathpatch.model.config import ModelConfig


@dataclass(frozen=True)
class UnitCosts:
    """Multiply-adds per token of each computation a mixed copy repeats, on one model at one
    sequence length: what the cost estimate (`copies.estimate_cost`) counts copies in."""

    projection: float  # one q, k or v row of one head: d_model x d_head (on average over q, k, v)
    attention: tuple[float, ...]  # per layer: one head's scores (or weighted values) per query
    head_output: int  # one head's z through W_O
    mlp: int  # one MLP (gated: three matrices)
    unembed: int
    mixing_term: int  # one bank entry added into one input row
    forward: float  # a plain forward


def unit_costs(cfg: ModelConfig, seq_len: int) -> UnitCosts:
    """Per-token multiply-adds at `seq_len` (never `n_ctx`: Llama-3's is 131,072). A query
    attends to (seq_len + 1) / 2 keys on average, fewer in a window (`keys_per_query`); a
    forward projects k and v at kv size."""
    d, dh, heads, kv_heads = cfg.d_model, cfg.d_head, cfg.n_heads, cfg.n_kv_heads
    attention = tuple(dh * cfg.keys_per_query(layer, seq_len) for layer in range(cfg.n_layers))
    mlp = (3 if cfg.gated_mlp else 2) * d * cfg.d_mlp if cfg.has_mlp else 0
    per_layer = [(heads + 2 * kv_heads) * d * dh + heads * (2 * a + dh * d) + mlp
                 for a in attention]
    projection = d * dh
    if cfg.use_qk_norm and cfg.qk_norm_over_heads:
        # a q (k) row also projects its input through every (kv) head
        projection = d * dh * (3 + heads + kv_heads) / 3
    return UnitCosts(projection=projection, attention=attention, head_output=dh * d, mlp=mlp,
                     unembed=d * cfg.d_vocab, mixing_term=d, forward=sum(per_layer) + d * cfg.d_vocab)
