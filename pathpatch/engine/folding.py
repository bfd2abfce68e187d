"""LayerNorm folded into the q/k/v projections, so the engine's many input rows are never normalized
element by element.

A mixed head copy reads up to three different residual rows (q, k, v), so a stage of a dense
circuit has 3 x heads rows where a forward has one: applying LayerNorm to each row would cost more
than the projections. With W' = diag(w) W, u = 1^T W' and c = b_ln W + b_proj,

    LN(x) @ W + b_proj = (x @ W' - mean(x) u) / sqrt(var(x) + eps) + c,

which needs only two statistics per row and token on top of the product the forward does anyway.
Rows that each read their own input (a dense circuit's) take the centering into the weights,
x @ W' - mean(x) u = x @ (W' - u / d); each row's mean and norm are then two reductions, run
in the position-major layout the mixing product wrote the rows in (over a transposed view they
are slower, and so is a d_head + 1 column product that gives the mean too: docs/MEASUREMENTS.md).
Half precision keeps TransformerLens's own LayerNorm (it upcasts; the folded form would cancel
in low precision).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pathpatch.model.adapter import Adapter, QKVWeights

_CENTERING = {"LN": True, "LNPre": True, "RMS": False, "RMSPre": False}


@dataclass(frozen=True)
class QKVProjection:
    """One layer's q/k/v projections of every head, keyed `head * 3 + channel` (q=0, k=1, v=2).

    The matrices are stored once each: under grouped-query attention the k and v of a kv head
    serve every query head of its group, so `index` maps each key to its stored matrix (None:
    one stored matrix per key, in key order).
    """

    rows: torch.Tensor  # [stored, d_model, d_head]: one matrix per stored projection
    joined: torch.Tensor  # [d_model, stored * d_head]: all of them side by side
    u: torch.Tensor | None  # [stored, d_head]: column sums of `rows`, when the norm centers
    c: torch.Tensor  # [stored, d_head]: bias after the projection
    eps: float
    scaled: bool  # the folded norm divides by the row's RMS / std
    normalize_first: bool  # half precision: apply the model's LayerNorm, then the plain product
    n_keys: int  # 3 * heads
    index: torch.Tensor | None = None  # [n_keys] stored matrix of each key
    centered: torch.Tensor | None = None  # [stored, d_model, d_head]: W' - u / d

    def stored(self, keys):
        """The stored matrices of `keys` (a slice or an index tensor of keys)."""
        return keys if self.index is None else self.index[keys]

    def project(self, x: torch.Tensor, keys) -> torch.Tensor:
        """x [tokens, d_model] through the projections of `keys` (None: every key), unnormalized:
        [keys, tokens, d_head]. Each stored matrix is applied once, whatever reads it."""
        tokens, d = x.shape
        if self.index is None and keys is None:  # the forward's own wide product
            return (x @ self.joined).view(tokens, self.n_keys, -1).transpose(0, 1)
        stored = self.stored(slice(None) if keys is None else keys)
        if self.index is None:
            weight = self.joined.view(d, self.n_keys, -1)[:, stored].reshape(d, -1)
            return (x @ weight).view(tokens, -1, self.rows.shape[-1]).transpose(0, 1)
        distinct, inverse = torch.unique(stored, return_inverse=True)
        weight = self.joined.view(d, self.rows.shape[0], -1)[:, distinct].reshape(d, -1)
        p = (x @ weight).view(tokens, len(distinct), -1)
        return p[:, inverse].transpose(0, 1)

    def project_rows(self, x: torch.Tensor, keys) -> torch.Tensor:
        """x [n, tokens, d_model], one input per key of `keys`, through its key's projection with
        the norm folded in: [n, tokens, d_head], a new tensor."""
        if self.centered is None:
            return self.finish(self._products(x, keys, self.rows), keys, *self.stats(x))
        _, inv = self.stats(x)
        return self._products(x, keys, self.centered).mul_(inv).add_(
            self.c[self.stored(keys)][:, None, :])

    def _products(self, x: torch.Tensor, keys, weights: torch.Tensor) -> torch.Tensor:
        """x [n, tokens, d_model] @ the stored matrix (of `weights`) of each key of `keys`.

        Under grouped-query attention a slice of whole heads reads the stored k/v matrices in
        place: per channel and kv head one product over its group's query heads, the matrix
        expanded (strided views of x and of the output). Gathering a matrix per key instead
        copies each kv head's matrices once per query head of its group, 50 MB a layer on
        Llama-3.2-1B (docs/MEASUREMENTS.md).
        """
        if self.index is None or not _whole_heads(keys):
            return torch.bmm(x, weights[self.stored(keys)])
        n, tokens, _ = x.shape
        first, stop = keys.start // 3, keys.stop // 3  # heads [first, stop)
        group = int((self.index[1::3] == self.index[1]).sum())  # query heads per kv head
        out = x.new_empty(n, tokens, weights.shape[-1])
        x3, out3 = x.unflatten(0, (stop - first, 3)), out.unflatten(0, (stop - first, 3))
        q = self.index[3 * first:3 * stop:3]  # one stored matrix per head, consecutive
        torch.bmm(x3[:, 0], weights[int(q[0]):int(q[-1]) + 1], out=out3[:, 0])
        for kv in range(first // group, (stop - 1) // group + 1):
            heads = slice(max(first, kv * group), min(stop, (kv + 1) * group))
            rows = slice(heads.start - first, heads.stop - first)
            for channel in (1, 2):  # the kv head's matrix, read by each head of its group
                w = weights[self.index[3 * heads.start + channel]]
                torch.bmm(x3[rows, channel], w.expand(heads.stop - heads.start, *w.shape),
                          out=out3[rows, channel])
        return out

    def stats(self, x: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(mean, 1 / std) of each row and token of x [..., d_model], each [..., 1]."""
        if not self.scaled:
            return None, None
        # rows given as a transposed view of position-major inputs are reduced in that layout
        transposed = x.dim() == 3 and x.stride(0) < x.stride(1)
        if transposed:
            x = x.transpose(0, 1)
        # E[x^2] - mean^2: two fast reductions, where var_mean is much slower on CPU. Residual
        # streams have |mean| << std, so the cancellation is harmless in fp32 (`bench engine`
        # checks the result against TransformerLens's own LayerNorm)
        var = torch.linalg.vector_norm(x, dim=-1, keepdim=True).square_().div_(x.shape[-1])
        mean = None
        if self.u is not None:
            mean = x.mean(dim=-1, keepdim=True)
            var.sub_(mean.square()).clamp_(min=0)
        inv = var.add_(self.eps).rsqrt_()
        if transposed:
            return None if mean is None else mean.transpose(0, 1), inv.transpose(0, 1)
        return mean, inv

    def finish(self, proj: torch.Tensor, keys, mean: torch.Tensor | None, inv: torch.Tensor | None
               ) -> torch.Tensor:
        """proj [n, tokens, d_head] = x @ W' of n rows -> the normalized projection, in place."""
        stored = self.stored(keys)
        if mean is not None:
            proj.sub_(mean * self.u[stored][:, None, :])
        if inv is not None:
            proj.mul_(inv)
        return proj.add_(self.c[stored][:, None, :])


class FoldedWeights:
    """Folded projections of one model, computed once per layer on first use.

    Hand one to every group of an evaluation, and keep it across evaluations of one model
    (`engine.ModelState`); the weights must not change while it lives.
    """

    def __init__(self, model):
        self.arch = Adapter.of(model)
        self._qkv: dict[int, QKVProjection] = {}

    def qkv(self, layer: int) -> QKVProjection:
        if layer not in self._qkv:
            with torch.no_grad():  # constants of the engine: no autograd history kept alive
                self._qkv[layer] = _fold(self.arch.qkv_weights(layer))
        return self._qkv[layer]


def _whole_heads(keys) -> bool:
    """Whether `keys` is a unit-step slice of every channel of consecutive heads."""
    return (isinstance(keys, slice) and keys.step in (None, 1) and keys.start is not None
            and keys.stop is not None and keys.start % 3 == 0 and keys.stop % 3 == 0
            and keys.stop > keys.start)


def _fold(weights: QKVWeights) -> QKVProjection:
    H = weights.W_Q.shape[0]
    if weights.group == 1:  # one matrix per key, interleaved as the keys are
        W = torch.stack([weights.W_Q, weights.W_K, weights.W_V], dim=1)  # [head, 3, d, d_head]
        b = torch.stack([weights.b_Q, weights.b_K, weights.b_V], dim=1)
        index = None
    else:  # q of every head, then k and v of every kv head
        W = torch.cat([weights.W_Q, weights.W_K, weights.W_V])  # [stored, d, d_head]
        b = torch.cat([weights.b_Q, weights.b_K, weights.b_V])
        kv = torch.arange(H) // weights.group
        n_kv = weights.W_K.shape[0]
        index = torch.stack([torch.arange(H), H + kv, H + n_kv + kv], dim=1).reshape(-1)
    d, dh = W.shape[-2:]
    W, b = W.reshape(-1, d, dh), b.reshape(-1, dh)  # [stored, d, d_head], [stored, d_head]
    norm, eps = weights.norm, weights.eps
    half = W.dtype not in (torch.float32, torch.float64)
    if norm is None or half:
        u, c, scaled = None, b, False
    else:
        ln_b, ln_w = weights.norm_b, weights.norm_w
        c = b if ln_b is None else b + torch.einsum("d,sde->se", ln_b, W)
        if ln_w is not None:
            W = W * ln_w[:, None]
        u = W.sum(dim=-2) if _CENTERING[norm] else None
        scaled = True
    rows = W.contiguous()
    centered = None if u is None else rows - u[:, None, :] / d
    return QKVProjection(
        rows=rows, joined=rows.permute(1, 0, 2).reshape(d, -1).contiguous(), u=u, c=c, eps=eps,
        scaled=scaled, normalize_first=half and norm is not None, n_keys=3 * H,
        index=None if index is None else index.to(rows.device), centered=centered,
    )
