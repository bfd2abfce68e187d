"""The engine's batched products in the layouts that run them well: the mixing product, and
per-head products written into a bank's slots (`bmm_into`).

Building a stage's inputs applies one coefficient matrix coef [inputs, sources] (a few dozen
rows, some dozens of sources) to sources that are residual-stream vectors at every position.
Laid out source-major, [sources, batch*pos*d_model], that is one very wide product (~200k
columns on GPT-2 small), which BLAS runs far below its speed on a forward's products. Laid out
position-major, [batch*pos, sources, d_model], it is one small product per position with the
coefficients shared: a batched product that runs near a forward's GEMM speed on CPU and maps to
one strided-batched call on GPU (figures: docs/MEASUREMENTS.md). The engine keeps its banks
position-major for this. The mixing has no counterpart in a forward, so this changes no
like-for-like comparison: the products a forward also does (MLPs, q/k/v, unembedding) stay on
the same `torch.mm`/`addmm` calls as the forward.
"""

from __future__ import annotations

import torch


def mix(coef: torch.Tensor, source: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """coef [M, K] applied at every position of source [P, K, d]: [P, M, d], written into `out`
    (contiguous) when given, else a new tensor.

    `source` may be a strided view (a slice of a bank's slots): each position's [K, d] rows only
    need a unit stride along d."""
    return torch.bmm(coef.expand(source.shape[0], *coef.shape), source, out=out)


def mix_add_(out: torch.Tensor, coef: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
    """out [P, M, d] += coef [M, K] at every position of source [P, K, d], in place."""
    return out.baddbmm_(coef.expand(source.shape[0], *coef.shape), source)


def bmm_into(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """out [P, n, d] = a [n, P, k] @ b [n, k, d] with the n products' outputs side by side per
    position (a bank's slots, a strided view), written in place: no temporary, so no fresh pages
    (docs/MEASUREMENTS.md)."""
    torch.bmm(a, b, out=out.transpose(0, 1))
