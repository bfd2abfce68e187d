"""Train the bundled models from a seed: `attn-only-2l` (induction) and `mlp-2l` (modular sum).

    .venv/bin/python jobs/train.py attn-only-2l      # ~2.5 min on one CPU thread
    .venv/bin/python jobs/train.py mlp-2l            # ~40 s

Each writes `pathpatch/bundled/<name>.safetensors` and `<name>.json` (architecture, digest and
training metadata: seed, steps, final losses). Data come from the samplers in
`pathpatch.data.tasks`, the same code that builds the pair datasets, and every random draw comes
from the seed, so a rerun with the same seed and thread count gives the same weights.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from pathpatch.data import tasks
from pathpatch.errors import PathPatchError
from pathpatch.model.loading import build_model, save_checkpoint
from pathpatch.model.sources import INDUCTION_ARCH, MLP_ARCH

BUNDLED_DIR = Path(__file__).resolve().parent.parent / "pathpatch" / "bundled"


@dataclass(frozen=True)
class TrainConfig:
    """What a run depends on besides the architecture."""

    seed: int = 0
    steps: int = 3000
    batch: int = 64
    lr: float = 3e-3  # peak; linear warmup then cosine decay to 10%
    warmup: int = 100
    weight_decay: float = 0.01
    threads: int = 1  # intra-op threads; fix it, results depend on it
    log_every: int = 250
    task: dict[str, Any] = field(default_factory=dict)  # sampler keyword arguments


def _lr_at(step: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def _fit(
    arch: Mapping[str, Any],
    cfg: TrainConfig,
    loss_fn: Callable[[torch.nn.Module, torch.Generator], tuple[torch.Tensor, dict[str, float]]],
    log: Callable[[str], None],
) -> tuple[torch.nn.Module, dict[str, float]]:
    """The shared loop: seed, build, AdamW with warmup + cosine, log running means.

    Returns the model (eval mode) and the running means of the last logging window.
    """
    saved_threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    try:
        return _fit_loop(arch, cfg, loss_fn, log)
    finally:
        torch.set_num_threads(saved_threads)


def _fit_loop(
    arch: Mapping[str, Any],
    cfg: TrainConfig,
    loss_fn: Callable[[torch.nn.Module, torch.Generator], tuple[torch.Tensor, dict[str, float]]],
    log: Callable[[str], None],
) -> tuple[torch.nn.Module, dict[str, float]]:
    torch.manual_seed(cfg.seed)  # weight init
    data_gen = torch.Generator().manual_seed(cfg.seed + 1)  # batches
    model = build_model(arch)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    running: dict[str, float] = {}
    last: dict[str, float] = {}
    start = time.perf_counter()
    for step in range(cfg.steps):
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, cfg)
        loss, stats = loss_fn(model, data_gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        for k, v in stats.items():
            running[k] = running.get(k, 0.0) + v
        if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
            n = cfg.log_every if (step + 1) % cfg.log_every == 0 else (step + 1) % cfg.log_every
            last = {f"final_train_{k}": round(v / n, 4) for k, v in running.items()}
            shown = "  ".join(f"{k} {v / n:.3f}" for k, v in running.items())
            log(f"step {step + 1:5d}  {shown}  ({time.perf_counter() - start:.0f}s)")
            running = {}
    model.eval()
    return model, last


def _induction_losses(
    model: torch.nn.Module, tokens: torch.Tensor, scored: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mean next-token loss over all, scored (repeat) and fresh positions."""
    logits = model(tokens)[:, :-1]  # (batch, pos-1, vocab)
    per_token = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1), reduction="none"
    ).reshape(tokens.shape[0], -1)  # (batch, pos-1)
    rep = scored[:, :-1]
    fresh = ~rep
    return per_token.mean(), per_token[rep].mean(), per_token[fresh].mean()


def train_induction(
    cfg: TrainConfig, arch: Mapping[str, Any] = INDUCTION_ARCH, log: Callable[[str], None] = print
) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Train on next-token loss at every position of repeated-segment sequences.

    Layouts with a held-out distance or start are never drawn; the returned metadata reports
    losses on them (when the sequence length admits any) next to the trained layouts.
    """
    task = {
        "seq_len": arch["n_ctx"],
        "vocab_size": arch["d_vocab"],
        "min_len": tasks.MIN_SEGMENT_LEN,
        "max_len": tasks.MAX_SEGMENT_LEN,
        "fillers": "distinct",
        **cfg.task,
    }

    def loss_fn(model: torch.nn.Module, gen: torch.Generator):
        tokens, scored = tasks.induction_batch(cfg.batch, gen, **task)
        loss, rep, fresh = _induction_losses(model, tokens, scored)
        return loss, {"loss": loss.item(), "repeat": rep.item(), "fresh": fresh.item()}

    start = time.perf_counter()
    model, last = _fit(arch, cfg, loss_fn, log)
    wall = time.perf_counter() - start
    metrics: dict[str, Any] = {
        **last,
        "held_out_distances": sorted(tasks.HELD_OUT_DISTANCES),
        "held_out_starts": sorted(tasks.HELD_OUT_STARTS),
    }
    eval_gen = torch.Generator().manual_seed(cfg.seed + 2)
    with torch.no_grad():
        for held_out in (False, True):
            try:
                tokens, scored = tasks.induction_batch(1024, eval_gen, held_out=held_out, **task)
            except PathPatchError:  # too short a sequence for any held-out layout
                continue
            _, rep, fresh = _induction_losses(model, tokens, scored)
            prefix = "held_out" if held_out else "train_layouts"
            metrics[f"{prefix}_repeat_loss"] = round(rep.item(), 4)
            metrics[f"{prefix}_fresh_loss"] = round(fresh.item(), 4)
    log(f"final: { {k: v for k, v in metrics.items() if 'loss' in k} }")
    return model, _metadata(cfg, task, wall, metrics)


def train_modular_sum(
    cfg: TrainConfig, arch: Mapping[str, Any] = MLP_ARCH, log: Callable[[str], None] = print
) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Train on the last position's loss of modular-sum sequences; report accuracy at the end."""
    task = {
        "seq_len": tasks.MODSUM_SEQ_LEN,
        "vocab_size": arch["d_vocab"],
        "modulus": tasks.MODSUM_MODULUS,
        **cfg.task,
    }

    def loss_fn(model: torch.nn.Module, gen: torch.Generator):
        tokens, target = tasks.modular_sum_batch(cfg.batch, gen, **task)
        logits = model(tokens)[:, -1]  # (batch, vocab)
        loss = F.cross_entropy(logits, target)
        acc = (logits.argmax(-1) == target).float().mean()
        return loss, {"loss": loss.item(), "acc": acc.item()}

    start = time.perf_counter()
    model, last = _fit(arch, cfg, loss_fn, log)
    wall = time.perf_counter() - start
    with torch.no_grad():
        tokens, target = tasks.modular_sum_batch(4096, torch.Generator().manual_seed(cfg.seed + 2), **task)
        logits = model(tokens)[:, -1]
        metrics = {
            **last,
            "eval_loss": round(F.cross_entropy(logits, target).item(), 4),
            "eval_accuracy": round((logits.argmax(-1) == target).float().mean().item(), 4),
        }
    log(f"final: {metrics}")
    return model, _metadata(cfg, task, wall, metrics)


def _metadata(
    cfg: TrainConfig, task: Mapping[str, Any], wall: float, metrics: Mapping[str, Any]
) -> dict[str, Any]:
    return {
        **asdict(cfg),
        "task": dict(task),
        "torch": torch.__version__,
        "wall_seconds": round(wall, 1),
        **metrics,
    }


TRAINERS = {
    "attn-only-2l": (train_induction, INDUCTION_ARCH, TrainConfig(steps=3000)),
    "mlp-2l": (train_modular_sum, MLP_ARCH, TrainConfig(steps=1000, batch=256)),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", choices=sorted(TRAINERS))
    parser.add_argument("--seed", type=int)
    parser.add_argument("--steps", type=int)
    parser.add_argument("--threads", type=int)
    parser.add_argument("--batch", type=int)
    parser.add_argument("--lr", type=float)
    parser.add_argument("--out", type=Path, default=BUNDLED_DIR, help="output directory")
    args = parser.parse_args(argv)
    trainer, arch, cfg = TRAINERS[args.model]
    overrides = {k: getattr(args, k) for k in ("seed", "steps", "threads", "batch", "lr")}
    cfg = TrainConfig(**{**asdict(cfg), **{k: v for k, v in overrides.items() if v is not None}})
    model, metadata = trainer(cfg, arch)
    args.out.mkdir(parents=True, exist_ok=True)
    for path in save_checkpoint(model, arch, args.out / f"{args.model}.safetensors", metadata):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
