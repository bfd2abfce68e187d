"""Tiny random models, built offline, for checking the engine by hand and by the oracle."""

import pytest
import torch

from pathpatch.model.config import ModelConfig
from pathpatch.model.transformer import Transformer

FAMILIES = {
    "attn-only": dict(attn_only=True, normalization_type="LN"),
    "attn-only-noln": dict(attn_only=True, normalization_type=None),
    "mlp": dict(attn_only=False, normalization_type="LN", d_mlp=12, act_fn="gelu"),
    # Llama / Mistral / Qwen2 style: RMSNorm, gated SiLU MLP, rotary, one kv head for two
    "llama": dict(attn_only=False, normalization_type="RMS", d_mlp=12, act_fn="silu",
                  gated_mlp=True, positional_embedding_type="rotary", rotary_dim=4,
                  n_key_value_heads=1),
    # Mistral / Qwen3 style: the llama family with a window of 2 in layer 0 and q/k norms
    "window": dict(attn_only=False, normalization_type="RMS", d_mlp=12, act_fn="silu",
                   gated_mlp=True, positional_embedding_type="rotary", rotary_dim=4,
                   n_key_value_heads=1, use_local_attn=True, window_size=2,
                   attn_types=["local", "global"], use_qk_norm=True),
    # Gemma-2 style: norms after attention and after the MLP, gated tanh-GELU MLP, rotary, one kv
    # head for two, a window in layer 0, an attention scale of its own, both soft caps (small, so
    # that they bite on these weights)
    "gemma": dict(attn_only=False, normalization_type="RMS", d_mlp=12, act_fn="gelu_pytorch_tanh",
                  gated_mlp=True, positional_embedding_type="rotary", rotary_dim=4,
                  n_key_value_heads=1, use_local_attn=True, window_size=2,
                  attn_types=["local", "global"], use_normalization_before_and_after=True,
                  attn_scale=3.0, attn_scores_soft_cap=1.5, output_logits_soft_cap=2.0,
                  final_rms=True),
    # OLMo-2 / SmolLM3 / Gemma-3 style: norms after the sublayers only, q/k norms over all heads'
    # projection, one kv head for two, layer 1 without rotation, a window and a rotary base of
    # its own in layer 0
    "olmo": dict(attn_only=False, normalization_type="RMS", d_mlp=12, act_fn="silu",
                 gated_mlp=True, positional_embedding_type="rotary", rotary_dim=4,
                 n_key_value_heads=1, post_norm_only=True, use_qk_norm=True,
                 qk_norm_over_heads=True, rotary_layers=[True, False], use_local_attn=True,
                 window_size=2, attn_types=["local", "global"], rotary_base_local=50.0,
                 final_rms=True),
    # Pythia / GPT-NeoX style: parallel attention + MLP, partial rotary
    "neox": dict(attn_only=False, normalization_type="LN", d_mlp=12, act_fn="gelu",
                 parallel_attn_mlp=True, positional_embedding_type="rotary", rotary_dim=2),
}


def tiny_model(family: str, *, n_layers=2, n_heads=2, d_model=8, d_vocab=7, seed=0,
               dtype=torch.float64) -> Transformer:
    """A random model whose weights are large enough that every path matters (per-layer
    options repeat their pattern over `n_layers`)."""
    options = {key: [value[layer % len(value)] for layer in range(n_layers)]
               if key in ("attn_types", "rotary_layers") else value
               for key, value in FAMILIES[family].items()}
    cfg = ModelConfig(n_layers=n_layers, n_heads=n_heads, d_model=d_model, d_head=4, n_ctx=16,
                      d_vocab=d_vocab, dtype=dtype, **options)
    model = Transformer(cfg, init=False)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.7)
    return model.eval()


@pytest.fixture(params=list(FAMILIES))
def family(request) -> str:
    return request.param


def train_tokenizer(corpus: list[str], folder, vocab_size: int) -> str:
    """A small byte-level BPE tokenizer in GPT-2's format, trained offline on `corpus` and saved
    in `folder` (a task generator loads it like a cached one)."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(corpus, vocab_size=vocab_size, min_frequency=1,
                            special_tokens=["<|endoftext|>"])
    fast = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token="<|endoftext|>")
    fast.save_pretrained(folder)
    return str(folder)
