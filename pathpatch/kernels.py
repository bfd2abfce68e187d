"""The mixing product, routed to the kernel that runs its thin shape well.

Building a stage's inputs is coef [inputs, sources] @ sources [sources, batch*pos*d_model]: about
36 rows, ~80 sources, ~200k columns on GPT-2 small. MKL, which `torch.mm` uses on CPU, runs that
shape at 80-100 GFLOP/s on the AMD CPU we measured, half its speed on a forward's products;
oneDNN (bundled with torch's CPU builds) runs it at 180-260. The mixing has no counterpart in a
forward, so this changes no like-for-like comparison: the products a forward also does (MLPs,
q/k/v, unembedding) stay on the same `torch.mm`/`addmm` calls as the forward.

oneDNN is used for float32 CPU products of at least `ONEDNN_MIN_MACS` multiply-adds when torch has
it. Smaller ones (every product of a small model, most of a single-edge removal's) take `torch.mm`:
oneDNN's fixed cost per call (~30 us here) outweighs its speed below ~2^23 multiply-adds (measured
per shape inside the engine: blas/oneDNN 0.3-0.8 below 2^23, 1.1 at 2^24, 1.4-1.8 above 2^26). So
do bfloat16 (`torch.mm` is faster than this op there: 3.4 against 5.0 ms on the shape above), CUDA,
float64 and builds without oneDNN. Set PATHPATCH_MIXING_KERNEL=blas to force `torch.mm` everywhere
(to compare the two).
"""

from __future__ import annotations

import functools
import os

import torch

ONEDNN_MIN_MACS = 1 << 24  # M*K*N at which oneDNN starts to win on this shape (module doc)


@functools.cache
def _onednn():
    """oneDNN's linear (X @ W.T), or None when this torch lacks it or it is switched off."""
    if os.environ.get("PATHPATCH_MIXING_KERNEL", "auto") == "blas":
        return None
    op = getattr(torch.ops.mkldnn, "_linear_pointwise", None)
    if op is None or not torch.backends.mkldnn.is_available():
        return None
    try:  # a private op: check once that it exists here and computes the product
        a, b = torch.arange(6.0).view(2, 3), torch.arange(12.0).view(3, 4)
        if not torch.equal(op(a, b.t(), None, "none", [], ""), a @ b):
            return None
    except (RuntimeError, TypeError):
        return None
    return op


def mixing_kernel() -> str:
    """Which kernel a large float32 CPU mixing product takes: "onednn" or "blas" (torch.mm)."""
    return "onednn" if _onednn() is not None else "blas"


def _onednn_for(coef: torch.Tensor, source: torch.Tensor):
    """oneDNN's linear when it should run coef @ source, else None (`torch.mm`)."""
    if source.device.type != "cpu" or source.dtype != torch.float32:
        return None
    if coef.shape[0] * coef.shape[1] * source.shape[1] < ONEDNN_MIN_MACS:
        return None
    return _onednn()


def _onednn_mm(op, coef: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
    """coef @ source through oneDNN's linear, which takes the weight as [N, K]."""
    return op(coef, source.t(), None, "none", [], "")


def mix(coef: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
    """coef [M, K] @ source [K, N], a new [M, N] tensor."""
    op = _onednn_for(coef, source)
    return coef @ source if op is None else _onednn_mm(op, coef, source)


def mix_add_(out: torch.Tensor, coef: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
    """out += coef @ source, in place."""
    op = _onednn_for(coef, source)
    if op is None:
        return out.addmm_(coef, source)
    return out.add_(_onednn_mm(op, coef, source))
