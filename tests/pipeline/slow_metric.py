"""Metrics for fault tests: KL that is slow, fails, or hangs on chosen examples (importable on
Ray workers because they run from the repository root)."""

from __future__ import annotations

import time

from pathpatch.engine.metrics import get_metric

_KL = get_metric("kl").per_example


def slow_kl(clean, other, batch):
    """KL, after a pause (makes items long enough to interrupt)."""
    time.sleep(0.15)
    return _KL(clean, other, batch)


def poison_kl(clean, other, batch):
    """KL, except that any batch holding example 20 raises."""
    if bool((batch.example_ids == 20).any()):
        raise RuntimeError("poisoned example 20")
    return _KL(clean, other, batch)


def hang_kl(clean, other, batch):
    """KL, except that any batch holding example 20 never finishes."""
    if bool((batch.example_ids == 20).any()):
        time.sleep(3600)
    return _KL(clean, other, batch)


def per_position(clean, other, batch):
    """A metric of the wrong shape: one value per (example, position), not per example."""
    return (clean - other).abs().sum(-1)


def reads_counterfactual(clean, other, batch):
    """KL, weighted by whether x_c's first token is even: a metric that reads x_c."""
    return _KL(clean, other, batch) * (batch.counterfactual[:, 0] % 2 == 0)
