"""LayerNorm folded into the q/k/v projections, so the engine's many input rows are never normalized
element by element.

A mixed head copy reads up to three different residual rows (q, k, v), so a stage of a dense
circuit has 3 x heads rows where a forward has one: applying LayerNorm to each row would cost more
than the projections. With W' = diag(w) W, u = 1^T W' and c = b_ln W + b_proj,

    LN(x) @ W + b_proj = (x @ W' - mean(x) u) / sqrt(var(x) + eps) + c,

which needs only two statistics per row and token (one pass over the row) on top of the product
the forward does anyway. Half precision keeps TransformerLens's own LayerNorm (it upcasts; the
folded form would cancel in low precision).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pathpatch.arch import Adapter, QKVWeights

_CENTERING = {"LN": True, "LNPre": True, "RMS": False, "RMSPre": False}


@dataclass(frozen=True)
class QKVProjection:
    """One layer's q/k/v projections of every head, keyed `head * 3 + channel` (q=0, k=1, v=2)."""

    rows: torch.Tensor  # [3 * heads, d_model, d_head]: one matrix per (head, channel)
    joined: torch.Tensor  # [d_model, 3 * heads * d_head]: all of them side by side
    u: torch.Tensor | None  # [3 * heads, d_head]: column sums of `rows`, when the norm centers
    c: torch.Tensor  # [3 * heads, d_head]: bias after the projection
    eps: float
    scaled: bool  # the folded norm divides by the row's RMS / std
    normalize_first: bool  # half precision: apply the model's LayerNorm, then the plain product

    def stats(self, x: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(mean, 1 / std) of each row and token of x [..., d_model], each [..., 1]."""
        if not self.scaled:
            return None, None
        # E[x^2] - mean^2: two fast reductions (var_mean is ~30x slower on CPU). Residual streams
        # have |mean| << std, so the cancellation is harmless in fp32 (the benchmark's check
        # against TransformerLens's own LayerNorm: 2e-6 on GPT-2-shaped logits)
        var = torch.linalg.vector_norm(x, dim=-1, keepdim=True).square_().div_(x.shape[-1])
        mean = None
        if self.u is not None:
            mean = x.mean(dim=-1, keepdim=True)
            var.sub_(mean.square()).clamp_(min=0)
        return mean, var.add_(self.eps).rsqrt_()

    def finish(self, proj: torch.Tensor, keys, mean: torch.Tensor | None, inv: torch.Tensor | None
               ) -> torch.Tensor:
        """proj [n, tokens, d_head] = x @ W' of n rows -> the normalized projection, in place."""
        if mean is not None:
            proj.sub_(mean * self.u[keys][:, None, :])
        if inv is not None:
            proj.mul_(inv)
        return proj.add_(self.c[keys][:, None, :])


class FoldedWeights:
    """Folded projections of one model, computed once per layer on first use.

    Make one per evaluation (weights must not change while it lives) and hand it to every group.
    """

    def __init__(self, model):
        self.arch = Adapter.of(model)
        self._qkv: dict[int, QKVProjection] = {}

    def qkv(self, layer: int) -> QKVProjection:
        if layer not in self._qkv:
            self._qkv[layer] = _fold(self.arch.qkv_weights(layer))
        return self._qkv[layer]


def _fold(weights: QKVWeights) -> QKVProjection:
    W, b, norm, eps = weights.W, weights.b, weights.norm, weights.eps
    half = W.dtype not in (torch.float32, torch.float64)
    if norm is None or half:
        u, c, scaled = None, b, False
    else:
        ln_b, ln_w = weights.norm_b, weights.norm_w
        c = b if ln_b is None else b + torch.einsum("d,hcde->hce", ln_b, W)
        if ln_w is not None:
            W = W * ln_w[:, None]
        u = W.sum(dim=-2) if _CENTERING[norm] else None
        scaled = True
    H, _, d, dh = W.shape
    rows = W.reshape(3 * H, d, dh).contiguous()
    return QKVProjection(
        rows=rows, joined=rows.permute(1, 0, 2).reshape(d, 3 * H * dh).contiguous(),
        u=None if u is None else u.reshape(3 * H, dh), c=c.reshape(3 * H, dh), eps=eps,
        scaled=scaled, normalize_first=half and norm is not None,
    )
