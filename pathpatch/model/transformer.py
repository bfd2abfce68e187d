"""A decoder-only transformer with TransformerLens's hook addresses: pathpatch's own model.

TransformerLens 4 removed `HookedTransformer`; its `HookedRootModule` and `HookPoint` remain the
supported way to hook a module, so every model pathpatch computes is this one small module on them.
Weights keep TransformerLens's names and layouts (`blocks.{L}.attn.W_Q` [head, d_model, d_head]),
hooks its addresses (`blocks.{L}.attn.hook_z`), so the bundled checkpoints load unchanged and
`run_with_cache` / `run_with_hooks` work as before. Hugging Face checkpoints are converted into it
(`families.py`); exactness is judged against the Hugging Face model's own logits and patched runs.

It computes only what `ModelConfig` can say, and each option once: LayerNorm or RMSNorm (before,
after, or before and after each sublayer), learned or rotary positions (per layer, with its own
base in local layers), grouped-query attention, windows, q/k norms per head or over all heads,
soft caps, plain or gated MLPs, sequential or parallel attention and MLP.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformer_lens import HookedRootModule
from transformer_lens.hook_points import HookPoint

from pathpatch.model.config import ModelConfig


def softcap(x: torch.Tensor, cap: float) -> torch.Tensor:
    """cap * tanh(x / cap), or x where no cap is set (cap <= 0)."""
    return x if cap <= 0 else cap * torch.tanh(x / cap)


def activation(name: str, x: torch.Tensor) -> torch.Tensor:
    if name == "gelu":
        return F.gelu(x)
    if name in ("gelu_new", "gelu_pytorch_tanh"):  # both the tanh approximation, torch's fused one
        return F.gelu(x, approximate="tanh")
    if name == "gelu_fast":
        return 0.5 * x * (1.0 + torch.tanh(x * 0.7978845608 * (1.0 + 0.044715 * x * x)))
    if name == "relu":
        return F.relu(x)
    if name == "silu":
        return F.silu(x)
    raise ValueError(f"unknown activation {name!r}")


class Norm(nn.Module):
    """LayerNorm ("LN") or RMSNorm ("RMS") over the last dimension; "LNPre" and "RMSPre" without
    weights (a checkpoint whose norm weights were folded into the next matrices). Half precision
    is normalized in float32 and cast back before the weight, as TransformerLens did."""

    def __init__(self, kind: str, length: int, eps: float, dtype: torch.dtype):
        super().__init__()
        self.kind, self.eps, self.dtype = kind, eps, dtype
        if kind == "LN":
            self.w = nn.Parameter(torch.ones(length, dtype=dtype))
            self.b = nn.Parameter(torch.zeros(length, dtype=dtype))
        elif kind == "RMS":
            self.w = nn.Parameter(torch.ones(length, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype if self.kind.endswith("Pre") else self.w.dtype
        if dtype not in (torch.float32, torch.float64):
            x = x.to(torch.float32)
        if self.kind.startswith("LN"):
            x = x - x.mean(-1, keepdim=True)
        scale = (x.pow(2).mean(-1, keepdim=True) + self.eps).sqrt()
        x = (x / scale).to(dtype)
        if self.kind == "LN":
            return x * self.w + self.b
        return x * self.w if self.kind == "RMS" else x


def _norm(cfg: ModelConfig, kind: str | None, length: int | None = None) -> Norm | None:
    return None if kind is None else Norm(kind, length or cfg.d_model, cfg.eps, cfg.dtype)


def rotary_angles(cfg: ModelConfig, layer: int, n_pos: int) -> torch.Tensor:
    """[pos, rotary_dim / 2] angles of `layer`'s rotation, in float32 whatever the model's dtype,
    as transformers computes them (its `inv_freq` and scalings: default, linear, llama3), so a
    float64 checkpoint rotates exactly as its Hugging Face model does."""
    rd = cfg.rotary_dim
    local = cfg.is_local(layer)
    own_base = local and cfg.rotary_base_local is not None
    base = cfg.rotary_base_local if own_base else cfg.rotary_base
    inv_freq = 1.0 / (base ** (torch.arange(0, rd, 2, dtype=torch.int64).float() / rd))
    if cfg.use_NTK_by_parts_rope and not own_base:
        factor = cfg.NTK_by_parts_factor
        low, high = cfg.NTK_by_parts_low_freq_factor, cfg.NTK_by_parts_high_freq_factor
        old = cfg.NTK_original_ctx_len
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old / low, inv_freq / factor, inv_freq)
        smooth = (old / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < old / high) * ~(wavelen > old / low)
        inv_freq = torch.where(medium, smoothed, scaled)
    elif cfg.rotary_scaling_factor != 1.0 and not local:
        inv_freq = inv_freq / cfg.rotary_scaling_factor
    return torch.arange(n_pos, dtype=torch.float32)[:, None] * inv_freq[None, :]


class Attention(nn.Module):
    """One layer's heads. k/v weights are per kv head (`_W_K`, `_W_V` under grouped-query
    attention, TransformerLens's names); `W_K` / `W_V` repeat them per query head."""

    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.cfg, self.layer = cfg, layer
        H, kv, d, dh = cfg.n_heads, cfg.n_kv_heads, cfg.d_model, cfg.d_head
        self.grouped = kv != H
        k = "_" if self.grouped else ""

        def param(*shape: int) -> nn.Parameter:
            return nn.Parameter(torch.empty(*shape, dtype=cfg.dtype))

        self.W_Q, self.b_Q = param(H, d, dh), param(H, dh)
        setattr(self, f"{k}W_K", param(kv, d, dh))
        setattr(self, f"{k}W_V", param(kv, d, dh))
        setattr(self, f"{k}b_K", param(kv, dh))
        setattr(self, f"{k}b_V", param(kv, dh))
        self.W_O, self.b_O = param(H, dh, d), param(d)
        if cfg.use_qk_norm:
            over = cfg.qk_norm_over_heads
            self.q_norm = _norm(cfg, "RMS", H * dh if over else dh)  # per head, or over all
            self.k_norm = _norm(cfg, "RMS", kv * dh if over else dh)
        self.attn_scale = cfg.attn_scale if cfg.use_attn_scale else 1.0
        if cfg.scale_attn_by_inverse_layer_idx:
            self.attn_scale *= layer + 1
        self.attn_type = "local" if cfg.is_local(layer) else "global"
        self.rotates = cfg.rotates(layer)
        self._rotary: tuple[torch.Tensor, torch.Tensor] | None = None  # (cos, sin), grown lazily
        for name in ("q", "k", "v", "rot_q", "rot_k", "attn_scores", "pattern", "z", "result"):
            setattr(self, f"hook_{name}", HookPoint())

    # per query head, as TransformerLens offered them (repeated under grouped-query attention)
    W_K = property(lambda self: self._per_query_head("W_K"))
    W_V = property(lambda self: self._per_query_head("W_V"))
    b_K = property(lambda self: self._per_query_head("b_K"))
    b_V = property(lambda self: self._per_query_head("b_V"))

    def _per_query_head(self, name: str) -> torch.Tensor:
        if self.grouped:
            return self._repeat(self._parameters["_" + name])
        if name not in self._parameters:  # while __init__ registers it
            raise AttributeError(name)
        return self._parameters[name]

    def kv_weights(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(W_K, W_V, b_K, b_V) per kv head, never repeated."""
        k = "_" if self.grouped else ""
        return tuple(self._parameters[f"{k}{n}"] for n in ("W_K", "W_V", "b_K", "b_V"))

    def _repeat(self, x: torch.Tensor) -> torch.Tensor:
        return x.repeat_interleave(self.cfg.n_heads // self.cfg.n_kv_heads, dim=0)

    def rotary(self, n_pos: int, device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin) [pos, rotary_dim] for the first n_pos positions."""
        if self._rotary is None or self._rotary[0].shape[0] < n_pos or self._rotary[0].dtype != dtype:
            angles = rotary_angles(self.cfg, self.layer, max(n_pos, 64))
            if self.cfg.rotary_adjacent_pairs:
                angles = angles.repeat_interleave(2, dim=-1)
            else:
                angles = torch.cat([angles, angles], dim=-1)
            self._rotary = (angles.cos().to(dtype), angles.sin().to(dtype))  # float32 values
        cos, sin = self._rotary
        return cos[:n_pos].to(device), sin[:n_pos].to(device)

    def apply_rotary(self, x: torch.Tensor) -> torch.Tensor:
        """x [batch, pos, head, d_head], each position rotated by its own angle (identity in a
        layer without rotation)."""
        if not self.rotates:
            return x
        rd = self.cfg.rotary_dim
        cos, sin = self.rotary(x.shape[1], x.device, x.dtype)
        cos, sin = cos[:, None, :], sin[:, None, :]  # [pos, 1, rotary_dim]
        x_rot, x_pass = x[..., :rd], x[..., rd:]
        if self.cfg.rotary_adjacent_pairs:
            flipped = torch.stack([-x_rot[..., 1::2], x_rot[..., ::2]], dim=-1).flatten(-2)
        else:
            half = rd // 2
            flipped = torch.cat([-x_rot[..., half:], x_rot[..., :half]], dim=-1)
        return torch.cat([x_rot * cos + flipped * sin, x_pass], dim=-1)

    def norm_qk(self, x: torch.Tensor, channel: str) -> torch.Tensor:
        """The q or k norm of rows x [batch, pos, head, d_head]: per head, or over all heads."""
        norm = self.q_norm if channel == "q" else self.k_norm
        if self.cfg.qk_norm_over_heads:
            return norm(x.flatten(-2)).view(x.shape)
        return norm(x)

    def qk_projection(self, channel: str) -> tuple[torch.Tensor, torch.Tensor, Norm]:
        """(W [heads, d_model, d_head], b [heads, d_head], norm) of channel "q" or "k" (k per
        kv head)."""
        if channel == "q":
            return self.W_Q, self.b_Q, self.q_norm
        W_K, _, b_K, _ = self.kv_weights()
        return W_K, b_K, self.k_norm

    def norm_over_heads(self, x: torch.Tensor, channel: str) -> torch.Tensor:
        """q or k [batch, pos, n, d_head] of split inputs x [batch, pos, n, d_model] under a norm
        over all heads (OLMo-2): head h's row is the h-th slice of the norm of the projection of
        h's own input through every head, which is the model itself when all inputs are equal.
        n: query heads (q), kv heads or query heads (k, grouped or not)."""
        W, b, norm = self.qk_projection(channel)
        n, heads = x.shape[2], W.shape[0]
        full = torch.einsum("bpnd,jde->bpnje", x, W) + b  # [batch, pos, n, heads, d_head]
        own = torch.arange(n, device=x.device) // (n // heads)  # the head (kv head) row i feeds
        normed = norm(full.flatten(-2)).view(full.shape)
        return normed[:, :, torch.arange(n, device=x.device), own]  # [batch, pos, n, d_head]

    def allowed_keys(self, n_pos: int, device) -> torch.Tensor:
        """[dest, src] bool: causal, within the window in local layers."""
        pos = torch.arange(n_pos, device=device)
        mask = pos[None, :] <= pos[:, None]
        if self.attn_type == "local":
            mask &= pos[None, :] > pos[:, None] - self.cfg.window_size
        return mask

    def forward(self, q_in: torch.Tensor, k_in: torch.Tensor, v_in: torch.Tensor,
                use_attn_result: bool) -> torch.Tensor:
        """q_in, k_in, v_in: [batch, pos, d_model], or per head [batch, pos, head, d_model]
        (split inputs; k/v per kv head or per query head)."""
        cfg = self.cfg
        q = self.hook_q(self._project(q_in, self.W_Q, self.b_Q))  # [batch, pos, head, d_head]
        W_K, W_V, b_K, b_V = self.kv_weights()
        k = self.hook_k(self._project(k_in, W_K, b_K))  # [batch, pos, kv or head, d_head]
        v = self.hook_v(self._project(v_in, W_V, b_V))
        if cfg.use_qk_norm and cfg.qk_norm_over_heads and q_in.ndim == 4:
            q = self.norm_over_heads(q_in, "q")  # each head's own input version, all heads
            k = self.norm_over_heads(k_in, "k")
        elif cfg.use_qk_norm:
            q, k = self.norm_qk(q, "q"), self.norm_qk(k, "k")
        if self.rotates:
            q = self.hook_rot_q(self.apply_rotary(q))
            k = self.hook_rot_k(self.apply_rotary(k))
        group = q.shape[2] // k.shape[2]
        if group > 1:
            k, v = k.repeat_interleave(group, dim=2), v.repeat_interleave(group, dim=2)
        scores = torch.einsum("bqhe,bkhe->bhqk", q, k) / self.attn_scale
        scores = softcap(scores, cfg.attn_scores_soft_cap)
        mask = self.allowed_keys(q.shape[1], q.device)
        scores = self.hook_attn_scores(torch.where(mask, scores, float("-inf")))
        pattern = self.hook_pattern(torch.nan_to_num(F.softmax(scores, dim=-1), nan=0.0))
        z = self.hook_z(torch.einsum("bhqk,bkhe->bqhe", pattern, v))  # [batch, pos, head, d_head]
        if use_attn_result:
            result = self.hook_result(torch.einsum("bqhe,hed->bqhd", z, self.W_O))
            return result.sum(-2) + self.b_O
        return F.linear(z.flatten(-2), self.W_O.flatten(0, 1).T, self.b_O)

    def _project(self, x: torch.Tensor, W: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        if x.ndim == 3:  # one input for every head
            return torch.einsum("bpd,hde->bphe", x, W) + b
        if x.shape[2] != W.shape[0]:  # split inputs per query head, weights per kv head
            group = x.shape[2] // W.shape[0]
            W, b = W.repeat_interleave(group, dim=0), b.repeat_interleave(group, dim=0)
        return torch.einsum("bphd,hde->bphe", x, W) + b


class MLP(nn.Module):
    """A plain (W_in, act, W_out) or gated (act(x W_gate) * x W_in, W_out) MLP."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.act_fn_name = cfg.act_fn
        self.gated = cfg.gated_mlp
        d, m, dt = cfg.d_model, cfg.d_mlp, cfg.dtype
        self.W_in = nn.Parameter(torch.empty(d, m, dtype=dt))  # [d_model, d_mlp]
        self.b_in = nn.Parameter(torch.zeros(m, dtype=dt))
        if self.gated:
            self.W_gate = nn.Parameter(torch.empty(d, m, dtype=dt))
        self.W_out = nn.Parameter(torch.empty(m, d, dtype=dt))  # [d_mlp, d_model]
        self.b_out = nn.Parameter(torch.zeros(d, dtype=dt))

    def act_fn(self, x: torch.Tensor) -> torch.Tensor:
        return activation(self.act_fn_name, x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., d_model] (already normed) -> [..., d_model]."""
        flat = x.reshape(-1, x.shape[-1])
        if self.gated:
            hidden = self.act_fn(torch.mm(flat, self.W_gate))
            hidden.mul_(torch.mm(flat, self.W_in)).add_(self.b_in)
        else:
            hidden = self.act_fn(torch.addmm(self.b_in, flat, self.W_in))
        return torch.addmm(self.b_out, hidden, self.W_out).view(x.shape)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int, switches: dict[str, bool]):
        super().__init__()
        self.cfg, self.switches = cfg, switches
        pre = None if cfg.post_norm_only else cfg.normalization_type
        post = cfg.normalization_type if (cfg.use_normalization_before_and_after
                                          or cfg.post_norm_only) else None
        self.ln1 = _norm(cfg, pre)
        self.ln1_post = _norm(cfg, post)
        self.attn = Attention(cfg, layer)
        if not cfg.attn_only:
            self.ln2 = _norm(cfg, pre)
            self.ln2_post = _norm(cfg, post)
            self.mlp = MLP(cfg)
        for name in ("resid_pre", "q_input", "k_input", "v_input", "attn_out", "resid_mid",
                     "mlp_in", "mlp_out", "resid_post"):
            setattr(self, f"hook_{name}", HookPoint())

    def forward(self, resid_pre: torch.Tensor) -> torch.Tensor:
        cfg, sw = self.cfg, self.switches
        resid_pre = self.hook_resid_pre(resid_pre)  # [batch, pos, d_model]
        if sw["split_qkv_input"]:
            kv = cfg.n_heads if sw["ungroup_grouped_query_attention"] else cfg.n_kv_heads

            def per_head(x: torch.Tensor, n: int) -> torch.Tensor:
                return x[:, :, None, :].expand(-1, -1, n, -1).clone()  # [batch, pos, head, d_model]

            q_in = self.hook_q_input(per_head(resid_pre, cfg.n_heads))
            k_in = self.hook_k_input(per_head(resid_pre, kv))
            v_in = self.hook_v_input(per_head(resid_pre, kv))
        else:
            q_in = k_in = v_in = resid_pre
        attn_out = self.attn(_call(self.ln1, q_in), _call(self.ln1, k_in), _call(self.ln1, v_in),
                             sw["attn_result"])
        attn_out = self.hook_attn_out(_call(self.ln1_post, attn_out))
        if cfg.attn_only:
            return self.hook_resid_post(resid_pre + attn_out)
        if cfg.parallel_attn_mlp:  # the MLP reads the layer's input beside the heads
            resid_mid = resid_pre + attn_out
            mlp_in = resid_pre
        else:
            resid_mid = mlp_in = self.hook_resid_mid(resid_pre + attn_out)
        if sw["hook_mlp_in"]:  # a patch here changes the MLP's input only
            mlp_in = self.hook_mlp_in(mlp_in.clone())
        mlp_out = self.hook_mlp_out(_call(self.ln2_post, self.mlp(_call(self.ln2, mlp_in))))
        return self.hook_resid_post(resid_mid + mlp_out)


def _call(norm: nn.Module | None, x: torch.Tensor) -> torch.Tensor:
    return x if norm is None else norm(x)


class Embed(nn.Module):
    def __init__(self, rows: int, d_model: int, dtype: torch.dtype, name: str):
        super().__init__()
        self.register_parameter(name, nn.Parameter(torch.empty(rows, d_model, dtype=dtype)))
        self.name_ = name

    def forward(self, index: torch.Tensor) -> torch.Tensor:
        return F.embedding(index, self._parameters[self.name_])


class Unembed(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.W_U = nn.Parameter(torch.empty(cfg.d_model, cfg.d_vocab_out, dtype=cfg.dtype))
        self.b_U = nn.Parameter(torch.zeros(cfg.d_vocab_out, dtype=cfg.dtype))


_BIASES = {"b", "b_Q", "b_K", "b_V", "_b_K", "_b_V", "b_O", "b_in", "b_out", "b_U"}


class Transformer(HookedRootModule):
    """The model: `model(tokens)` gives logits [batch, pos, d_vocab_out]; `run_with_cache` and
    `run_with_hooks` (TransformerLens's `HookedRootModule`) read and patch its hooks.

    Hook switches (`set_use_split_qkv_input`, ...) live on the model, never on its config, so two
    models built from one config never share them.
    """

    def __init__(self, cfg: ModelConfig, *, init: bool = True,
                 generator: torch.Generator | None = None):
        """init=False leaves the weights unset (a state dict is loaded next); otherwise they are
        drawn from `generator` or torch's global RNG (`init_weights`)."""
        super().__init__()
        if cfg.dtype is None:
            cfg = cfg.replace(dtype=torch.float32)
        self.cfg = cfg
        self.switches = {"split_qkv_input": False, "ungroup_grouped_query_attention": False,
                         "hook_mlp_in": False, "attn_result": False}
        self.embed = Embed(cfg.d_vocab, cfg.d_model, cfg.dtype, "W_E")
        self.hook_embed = HookPoint()
        if cfg.positional_embedding_type == "standard":
            self.pos_embed = Embed(cfg.n_ctx, cfg.d_model, cfg.dtype, "W_pos")
            self.hook_pos_embed = HookPoint()
        self.blocks = nn.ModuleList(Block(cfg, layer, self.switches) for layer in range(cfg.n_layers))
        final = "RMS" if cfg.final_rms and cfg.normalization_type is not None else cfg.normalization_type
        self.ln_final = _norm(cfg, final)
        self.unembed = Unembed(cfg)
        self.to(cfg.device)
        self.setup()
        if init:
            self.init_weights(generator)

    def tie_unembedding(self) -> None:
        """W_U becomes a view of W_E transposed (a checkpoint that ties them, as GPT-2 and
        Llama-3.2 do): one copy of the embedding held, not two."""
        self.unembed.W_U = nn.Parameter(self.embed.W_E.t(), requires_grad=self.embed.W_E.requires_grad)

    def init_weights(self, generator: torch.Generator | None = None, std: float | None = None) -> None:
        """Random weights: normal(0, std) matrices (std 0.8 / sqrt(d_model) by default, as
        TransformerLens initialized), zero biases, unit norm weights."""
        std = 0.8 / self.cfg.d_model ** 0.5 if std is None else std
        with torch.no_grad():
            for name, p in self.named_parameters():
                leaf = name.rsplit(".", 1)[-1]
                if leaf == "w":  # norm weights
                    p.fill_(1.0)
                elif leaf in _BIASES:
                    p.zero_()
                else:
                    p.copy_(torch.randn(p.shape, generator=generator).to(p.dtype) * std)

    def forward(self, tokens: torch.Tensor, return_type: str | None = "logits") -> torch.Tensor | None:
        """tokens [batch, pos] -> logits [batch, pos, d_vocab_out]; return_type "residual": the
        last block's output [batch, pos, d_model] (before the final norm); None: nothing."""
        resid = self.hook_embed(self.embed(tokens))
        if self.cfg.positional_embedding_type == "standard":
            positions = torch.arange(tokens.shape[1], device=tokens.device)
            resid = resid + self.hook_pos_embed(self.pos_embed(positions))[None]
        for block in self.blocks:
            resid = block(resid)
        if return_type is None:
            return None
        if return_type == "residual":
            return resid
        normed = _call(self.ln_final, resid)
        logits = normed @ self.unembed.W_U + self.unembed.b_U
        return softcap(logits, self.cfg.output_logits_soft_cap)

    # --- hook switches (TransformerLens's names) -----------------------------------------------

    def set_use_split_qkv_input(self, on: bool) -> None:
        """Each head's q, k and v input at `blocks.{L}.hook_{q,k,v}_input` [batch, pos, head,
        d_model] (k/v per kv head unless ungrouped)."""
        self.switches["split_qkv_input"] = bool(on)

    def set_ungroup_grouped_query_attention(self, on: bool) -> None:
        """Split k/v inputs per query head rather than per kv head."""
        self.switches["ungroup_grouped_query_attention"] = bool(on)

    def set_use_hook_mlp_in(self, on: bool) -> None:
        """The MLP's input (before its norm) at `blocks.{L}.hook_mlp_in`."""
        if self.cfg.attn_only:
            raise ValueError("an attention-only model has no MLP input hook")
        self.switches["hook_mlp_in"] = bool(on)

    def set_use_attn_result(self, on: bool) -> None:
        """Each head's output [batch, pos, head, d_model] at `blocks.{L}.attn.hook_result`."""
        self.switches["attn_result"] = bool(on)
