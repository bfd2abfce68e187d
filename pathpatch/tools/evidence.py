"""Evidence that a bundled model does what its task claims, measured in seconds.

For an induction model (`attn-only-2l`): next-token loss on repeated tokens against fresh ones,
on the repeat layouts seen in training and on distances/start offsets held out of training
(content-based induction must not care); per-head previous-token and induction scores read from
attention patterns; and the repeated-token loss with each head's output zeroed (the induction
heads must need the previous-token head). For `mlp-2l`: modular-sum accuracy with and without
the MLP outputs.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pathpatch.data import tasks
from pathpatch.data.pairs import PairDataset
from pathpatch.errors import PathPatchError
from pathpatch.model.adapter import Adapter
from pathpatch.model.loading import load_model
from pathpatch.model.names import node_parts
from pathpatch.model.transformer import Transformer

PREV_TOKEN_THRESHOLD = 0.4  # mean attention to t-1 that names a previous-token head
INDUCTION_THRESHOLD = 0.4  # mean attention to (earlier occurrence + 1) that names an induction head

Hook = tuple[str, Callable[..., torch.Tensor]]


@dataclass(frozen=True)
class RepeatLoss:
    """Next-token loss (nats) and top-1 accuracy on one set of repeat layouts."""

    layouts: str  # "trained" or "held-out"
    repeat: float  # mean loss predicting tokens of the second occurrence from inside it
    fresh: float  # mean loss predicting tokens nothing in the context determines
    repeat_accuracy: float  # top-1 accuracy on the repeat


@dataclass(frozen=True)
class HeadScore:
    """Attention-pattern scores of one head (averaged over examples and positions)."""

    head: str  # node name, `a{layer}.{head}`
    prev_token: float  # attention from t to t-1
    induction: float  # attention from t (in the repeat) to the token after t's earlier occurrence
    induction_held_out: float  # the same on held-out layouts
    repeat_loss_zeroed: float  # repeated-token loss with this head's output zeroed


@dataclass(frozen=True)
class InductionEvidence:
    losses: tuple[RepeatLoss, ...]
    heads: tuple[HeadScore, ...]
    prev_token_heads: tuple[str, ...]
    induction_heads: tuple[str, ...]
    repeat_loss_without_prev_token_heads: float | None  # all of them zeroed at once


def _zero_heads(model: Transformer, heads: Iterable[str]) -> list[Hook]:
    """Hooks that zero the named heads' `z` (so their output, bias aside, is zero)."""
    by_layer: dict[int, list[int]] = {}
    for name in heads:
        _, layer, head = node_parts(name)
        by_layer.setdefault(layer, []).append(head)
    hooks: list[Hook] = []
    for layer, idx in by_layer.items():

        def zero(z: torch.Tensor, hook, idx: list[int] = idx) -> torch.Tensor:
            z[:, :, idx] = 0.0  # z: (batch, pos, head, d_head)
            return z

        hooks.append((Adapter.of(model).z_hook(layer), zero))
    return hooks


def _repeat_loss(
    model: Transformer, data: PairDataset, hooks: list[Hook] | None = None
) -> tuple[float, float, float]:
    """(repeat loss, fresh loss, repeat accuracy) on the reference sequences."""
    tokens = data.reference
    logits = model.run_with_hooks(tokens, fwd_hooks=hooks or [])[:, :-1]  # (batch, pos-1, vocab)
    per_token = F.cross_entropy(logits.transpose(1, 2), tokens[:, 1:], reduction="none")  # (batch, pos-1)
    rep = data.scored[:, :-1]
    correct = logits.argmax(-1) == tokens[:, 1:]
    return (
        round(per_token[rep].mean().item(), 3),
        round(per_token[~rep].mean().item(), 3),
        round(correct[rep].float().mean().item(), 3),
    )


def _patterns(model: Transformer, tokens: torch.Tensor) -> list[torch.Tensor]:
    """Attention patterns per layer, each [batch, head, dest, src]."""
    arch = Adapter.of(model)
    names = [arch.pattern_hook(layer) for layer in range(arch.n_layers)]
    _, cache = model.run_with_cache(tokens, names_filter=lambda n: n in names)
    return [cache[name] for name in names]


def _induction_scores(patterns: list[torch.Tensor], data: PairDataset) -> list[torch.Tensor]:
    """Per layer, [head]: mean over repeat positions of the attention on after_prev_occurrence."""
    target = data.masks["after_prev_occurrence"].float()  # (batch, dest, src)
    dests = data.masks["repeat"].float()  # (batch, dest)
    out = []
    for pattern in patterns:
        on_target = (pattern * target[:, None]).sum(-1)  # (batch, head, dest)
        out.append((on_target * dests[:, None]).sum((0, 2)) / dests.sum())
    return out


def induction_evidence(model: Transformer, n: int = 256, seed: int = 1234) -> InductionEvidence:
    """Measure induction on fresh pair datasets (see the module docstring)."""
    common = {
        "seq_len": min(model.cfg.n_ctx, tasks.INDUCTION_SEQ_LEN),
        "vocab_size": min(model.cfg.d_vocab, tasks.INDUCTION_VOCAB),
    }
    trained = tasks.induction_pairs(n, seed=seed, **common)
    try:
        held: PairDataset | None = tasks.induction_pairs(
            n, seed=seed + 1, distances=tasks.HELD_OUT_DISTANCES, starts=tasks.HELD_OUT_STARTS, **common
        )
    except PathPatchError:  # a context too short for any held-out layout
        held = None
    names = [f"a{layer}.{h}" for layer in range(model.cfg.n_layers) for h in range(model.cfg.n_heads)]
    with torch.no_grad():
        losses = [RepeatLoss("trained", *_repeat_loss(model, trained))]
        if held is not None:
            losses.append(RepeatLoss("held-out", *_repeat_loss(model, held)))
        patterns = _patterns(model, trained.reference)
        induction = _induction_scores(patterns, trained)
        if held is not None:
            induction_held = _induction_scores(_patterns(model, held.reference), held)
        else:
            induction_held = [torch.full_like(s, float("nan")) for s in induction]
        zeroed = {name: _repeat_loss(model, trained, _zero_heads(model, [name]))[0] for name in names}

    heads: list[HeadScore] = []
    for layer, pattern in enumerate(patterns):
        prev = pattern.diagonal(offset=-1, dim1=-2, dim2=-1).mean((0, 2))  # (head,)
        for h in range(model.cfg.n_heads):
            name = f"a{layer}.{h}"
            heads.append(
                HeadScore(
                    head=name,
                    prev_token=round(prev[h].item(), 3),
                    induction=round(induction[layer][h].item(), 3),
                    induction_held_out=round(induction_held[layer][h].item(), 3),
                    repeat_loss_zeroed=zeroed[name],
                )
            )
    prev_heads = tuple(s.head for s in heads if s.prev_token >= PREV_TOKEN_THRESHOLD)
    ind_heads = tuple(s.head for s in heads if s.induction >= INDUCTION_THRESHOLD)
    without_prev = None
    if prev_heads:
        with torch.no_grad():
            without_prev = _repeat_loss(model, trained, _zero_heads(model, prev_heads))[0]
    return InductionEvidence(
        losses=tuple(losses),
        heads=tuple(heads),
        prev_token_heads=prev_heads,
        induction_heads=ind_heads,
        repeat_loss_without_prev_token_heads=without_prev,
    )


@dataclass(frozen=True)
class ModularSumEvidence:
    accuracy: float
    accuracy_mlps_zeroed: tuple[tuple[str, float], ...]  # (which MLPs, e.g. "m0" or "all"; accuracy)
    chance: float


def modular_sum_evidence(model: Transformer, n: int = 2048, seed: int = 1234) -> ModularSumEvidence:
    """Accuracy on the modular-sum task, intact and with MLP outputs zero-ablated."""
    data = tasks.modular_sum_pairs(n, seed=seed, vocab_size=model.cfg.d_vocab)

    def zero(out: torch.Tensor, hook) -> torch.Tensor:
        return torch.zeros_like(out)

    def accuracy(layers: Iterable[int]) -> float:
        hooks = [(Adapter.of(model).mlp_out_hook(layer), zero) for layer in layers]
        with torch.no_grad():
            logits = model.run_with_hooks(data.reference, fwd_hooks=hooks)[:, -1]  # (batch, vocab)
        return round((logits.argmax(-1) == data.answer).float().mean().item(), 4)

    layers = range(model.cfg.n_layers)
    zeroed = [(f"m{layer}", accuracy([layer])) for layer in layers] + [("all", accuracy(layers))]
    return ModularSumEvidence(
        accuracy=accuracy([]), accuracy_mlps_zeroed=tuple(zeroed), chance=round(1 / tasks.MODSUM_MODULUS, 4)
    )


def _print_induction(name: str, ev: InductionEvidence) -> None:
    print(f"induction evidence for {name}")
    print("  layouts      repeated-token loss  fresh-token loss  repeated-token accuracy")
    for loss in ev.losses:
        print(f"  {loss.layouts:<10} {loss.repeat:16.3f} {loss.fresh:17.3f} {loss.repeat_accuracy:20.3f}")
    print("  head   prev-token  induction  induction(held-out)  repeated-token loss, head zeroed")
    for s in ev.heads:
        print(
            f"  {s.head:<6} {s.prev_token:9.3f} {s.induction:10.3f} {s.induction_held_out:14.3f}"
            f" {s.repeat_loss_zeroed:24.3f}"
        )
    prev, ind = ", ".join(ev.prev_token_heads) or "none", ", ".join(ev.induction_heads) or "none"
    print(f"  previous-token head(s) (score >= {PREV_TOKEN_THRESHOLD}): {prev}")
    print(f"  induction head(s) (score >= {INDUCTION_THRESHOLD}): {ind}")
    if ev.repeat_loss_without_prev_token_heads is not None:
        print(
            "  repeated-token loss with all previous-token heads zeroed: "
            f"{ev.repeat_loss_without_prev_token_heads:.3f}"
        )


def main(model_name: str = "attn-only-2l") -> int:
    """Print the evidence for `model_name` (any `load_model` spec).

    Returns:
        0 when the evidence holds (induction: some induction head, and repeated-token loss
        under half the fresh-token loss on every layout set; mlp-2l: accuracy > 0.9 that falls
        under 0.5 without the MLPs), else 1.
    """
    model = load_model(model_name)
    if model_name == "mlp-2l":
        ev = modular_sum_evidence(model)
        print(f"modular-sum evidence for {model_name} (chance accuracy {ev.chance:.3f})")
        print(f"  accuracy: {ev.accuracy:.4f}")
        for which, acc in ev.accuracy_mlps_zeroed:
            print(f"  accuracy with MLP output zeroed ({which}): {acc:.4f}")
        return 0 if ev.accuracy > 0.9 and dict(ev.accuracy_mlps_zeroed)["all"] < 0.5 else 1
    ev = induction_evidence(model)
    _print_induction(model_name, ev)
    ok = bool(ev.induction_heads) and all(loss.repeat < 0.5 * loss.fresh for loss in ev.losses)
    return 0 if ok else 1
