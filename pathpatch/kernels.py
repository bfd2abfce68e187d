"""The mixing product, routed to the kernel that runs its thin shape well.

Building a stage's inputs is coef [inputs, sources] @ sources [sources, batch*pos*d_model]: a
few dozen rows, some dozens of sources, ~200k columns on GPT-2 small. MKL, which `torch.mm` uses
on CPU, runs that thin shape well below its speed on a forward's products; oneDNN (bundled with
torch's CPU builds) runs it faster (figures: docs/MEASUREMENTS.md). The mixing has no
counterpart in a forward, so this changes no like-for-like comparison: the products a forward
also does (MLPs, q/k/v, unembedding) stay on the same `torch.mm`/`addmm` calls as the forward.

oneDNN is used for float32 CPU products of at least `ONEDNN_MIN_MACS` multiply-adds when torch has
it. Smaller ones (every product of a small model, most of a single-edge removal's) take `torch.mm`,
because oneDNN's fixed cost per call outweighs its speed there. So do bfloat16 (where `torch.mm`
is the faster of the two), CUDA, float64 and builds without oneDNN. Set
PATHPATCH_MIXING_KERNEL=blas to force `torch.mm` everywhere (to compare the two).
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
