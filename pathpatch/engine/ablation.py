"""What a path outside a hypothesis carries when no counterfactual prompt does: zero, the mean, or
the position-wise mean of each node's output (SPEC.md section 7, docs/PATTERNS.md "Interventions").

In the treeified model every counterfactual copy of a node v outputs its ablation value a_v
instead of v(x_c). The engine needs nothing new: the "counterfactual run" of `Runs` becomes the
fully ablated model, one forward of x_r whose every node output is replaced by a_v, so that the
residual stream each receiver reads there is the sum of the a_v plus the biases no node owns, and
`cf_bank()` gives a_v minus each node's clean output.

The nodes' outputs, as the graph defines them:
- `in`: the token embedding (`hook_embed`). Learned positional embeddings are not part of it
  (equal in every run, no node owns them), so zero ablation of `in` keeps them.
- a head: z @ W_O (replaced at its z, `hook_z`: the value of z is what is averaged; W_O is
  linear, so the mean of z @ W_O is the mean of z times W_O). The attention bias b_O belongs to
  no node and stays.
- an MLP: its output (`hook_mlp_out`), its bias and any norm after it included.
- a heads' sum under norms after attention (Gemma-2, OLMo-2) is no node of the graph: the norm
  reads, per receiver, each head's clean or ablated output (plus b_O), as under `resample`; its
  fully ablated value is the norm of the heads' ablated outputs' sum, never a mean of normed sums.

Means are taken over the reference examples x_r of the whole dataset given (never per batch, so
results do not depend on batching or sharding): `mean` over examples and positions, per node;
`mean_positional` over examples, per node and position. Padding positions count as positions.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from enum import StrEnum
from functools import cached_property

import torch

from pathpatch.errors import PathPatchError
from pathpatch.model.adapter import EMBED_HOOK, Adapter


class Intervention(StrEnum):
    """What a counterfactual copy of a node outputs."""

    RESAMPLE = "resample"
    """The node's output on the example's own counterfactual prompt x_c (the paper's; default)."""
    ZERO = "zero"
    """Zero."""
    MEAN = "mean"
    """The node's output averaged over the reference examples, over examples and positions."""
    MEAN_POSITIONAL = "mean_positional"
    """The node's output averaged over the reference examples, per position."""

    @classmethod
    def parse(cls, value) -> Intervention:
        if isinstance(value, cls):
            return value
        try:
            return cls(value)
        except ValueError:
            allowed = ", ".join(repr(m.value) for m in cls)
            raise PathPatchError(f"unknown intervention {value!r}: allowed are {allowed}") from None

    @property
    def reads_counterfactual(self) -> bool:
        """Whether the dataset's counterfactual prompts x_c are read."""
        return self is Intervention.RESAMPLE


def node_hooks(arch: Adapter) -> list[str]:
    """The hooks where the nodes' outputs live (see the module docstring)."""
    names = [EMBED_HOOK]
    for layer in range(arch.n_layers):
        names.append(arch.z_hook(layer))
        if arch.has_mlp:
            names.append(arch.mlp_out_hook(layer))
    return names


@dataclass(frozen=True, eq=False)  # holds tensors: equal only to itself, hashable by identity
class Ablation:
    """An x_c-free intervention with its values: per node hook, a tensor that broadcasts over
    one batch's activation at that hook ([d] for `mean` and `zero`, [pos, d] for
    `mean_positional`; z hooks [head, d_head] or [pos, head, d_head])."""

    intervention: Intervention
    values: dict[str, torch.Tensor] = field(repr=False)

    def __post_init__(self) -> None:
        if self.intervention is Intervention.RESAMPLE:
            raise PathPatchError("an Ablation is zero, mean or mean_positional; 'resample' reads "
                                 "the dataset's counterfactual prompts instead")

    @cached_property  # read per batch as a runs-cache key; the values never change
    def digest(self) -> str:
        """sha256 (hex) of the intervention and its values (a cache key; means of different
        datasets differ)."""
        h = hashlib.sha256(self.intervention.value.encode())
        for name in sorted(self.values):
            t = self.values[name].detach().to("cpu", torch.float64).contiguous()
            h.update(name.encode())
            h.update(str(tuple(t.shape)).encode())
            h.update(t.numpy().tobytes())
        return h.hexdigest()

    def to(self, device) -> Ablation:
        return Ablation(self.intervention, {k: v.to(device) for k, v in self.values.items()})

    def hooks(self) -> list:
        """(hook name, function) pairs that replace each node's output by its value."""
        def replace(value):
            def hook(x, hook):
                if value.dim() == x.dim() - 1 and value.shape[0] != x.shape[1]:
                    raise PathPatchError(
                        f"positional mean over {value.shape[0]} positions, but the batch has "
                        f"{x.shape[1]}: compute the means on the dataset evaluated")
                return value.to(x.dtype).expand_as(x).clone()
            return hook
        return [(name, replace(v)) for name, v in self.values.items()]


@torch.no_grad()
def ablation_values(model, reference: torch.Tensor, intervention,
                    batch_size: int = 64) -> Ablation | None:
    """The ablation values of every node for `intervention`, from the clean runs of `reference`
    [example, pos] (the whole dataset's x_r, streamed in batches; sums in float64). None for
    `resample`.
    """
    intervention = Intervention.parse(intervention)
    if intervention is Intervention.RESAMPLE:
        return None
    arch = Adapter.of(model)
    hooks = node_hooks(arch)
    device = next(model.parameters()).device
    if intervention is Intervention.ZERO:
        _, cache = arch.run(reference[:1].to(device))
        values = {name: torch.zeros_like(cache[name][0, 0]) for name in hooks}
        return Ablation(intervention, values)
    if reference.shape[0] == 0:
        raise PathPatchError("mean ablation needs at least one reference example")
    names = set(hooks)
    sums: dict[str, torch.Tensor] = {}
    dtype = None
    for start in range(0, reference.shape[0], batch_size):
        tokens = reference[start:start + batch_size].to(device)
        _, cache = model.run_with_cache(tokens, names_filter=lambda n: n in names,
                                        return_type=None)
        for name in hooks:
            t = cache[name]
            dtype = t.dtype
            s = t.to(torch.float64).sum(0)  # [pos, ...]
            sums[name] = s if name not in sums else sums[name] + s
    n = reference.shape[0]
    if intervention is Intervention.MEAN:
        values = {k: (s.sum(0) / (n * s.shape[0])).to(dtype) for k, s in sums.items()}
    else:
        values = {k: (s / n).to(dtype) for k, s in sums.items()}
    return Ablation(intervention, values)
