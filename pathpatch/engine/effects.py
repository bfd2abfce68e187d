"""What a metric's numbers mean, without computing any: the total effect below which proportion
explained is undefined, and which way each metric's scores point.

Torch-free on purpose: reading results (`pathpatch sql`, `status`, reports) imports this, never
the engine. `metrics.py` computes the metrics and checks, on import, that it agrees with this.
"""

from __future__ import annotations

MIN_ATE = 1e-6
"""|ATE| below this makes proportion explained 1 - AUE/ATE undefined (NaN or SQL NULL)."""

SIGNED_METRICS = frozenset({"logit_diff"})
"""The built-in metrics with a signed statistic of one output (`Metric.value`): a statistic the
clean run keeps high, which drops when an important edge is corrupted."""


def importance_sign(metric: str) -> float:
    """+1 or -1: the score's sign that means "the edge matters to the clean behaviour". A
    statistic the clean run keeps high (logit difference) drops when an important edge is
    corrupted (-1); a loss or a distance from the clean run rises (+1). Rankings and MIB's
    signed curves order edges by sign * score, highest first. A user metric (``module:function``,
    a distance) is never imported here: +1."""
    return -1.0 if metric in SIGNED_METRICS else 1.0
