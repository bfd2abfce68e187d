"""Scores from per-example rows: AUE, ATE, proportion explained = 1 - AUE/ATE, and a seeded
paired bootstrap interval over examples (the report's intervals; the SQL views use the delta
method). `pathpatch.summarize` is this module's `summarize`.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pyarrow as pa

from pathpatch.engine.effects import MIN_ATE
from pathpatch.errors import PathPatchError

SUMMARY_SCHEMA = pa.schema(
    [
        ("hypothesis", pa.string()),
        ("n", pa.int64()),
        ("aue", pa.float64()),
        ("ate", pa.float64()),
        ("proportion_explained", pa.float64()),
        ("pe_boot_low", pa.float64()),
        ("pe_boot_high", pa.float64()),
        ("aue_boot_low", pa.float64()),
        ("aue_boot_high", pa.float64()),
    ]
)

# Bootstrap replicates are drawn in blocks of about this many indices (memory bound). The block
# size depends on n only, so the draws are the same for the same seed, hypothesis and n.
_BOOT_BLOCK = 2**22


def summarize(
    rows: pa.Table,
    *,
    seed: int = 0,
    n_boot: int = 1000,
    confidence: float = 0.95,
    min_ate: float = MIN_ATE,
) -> pa.Table:
    """Scores per hypothesis from per-example rows, with paired bootstrap intervals.

    For each hypothesis: n examples, AUE = mean UE, ATE = mean TE, proportion explained
    PE = 1 - AUE/ATE (may be negative). The interval resamples example indices with
    replacement (the same indices for UE and TE: paired), recomputes AUE and PE per
    replicate, and takes the percentile interval at `confidence`.

    Deterministic: rows are sorted by (hypothesis, example) first, and each hypothesis draws
    from a generator seeded by (seed, hypothesis name), so a hypothesis's interval does not
    depend on row order or on which other hypotheses are present.

    Undefined scores are null, never huge numbers: PE and its interval when |ATE| < min_ate;
    the PE interval also when any bootstrap replicate has |ATE| < min_ate (only likely with a
    handful of examples, most with TE = 0).

    Args:
        rows: columns hypothesis (string), example (int64), ue (float64), te (float64);
            others are ignored. One row per (hypothesis, example).
        seed: bootstrap seed.
        n_boot: bootstrap replicates (>= 1).
        confidence: interval coverage, in (0, 1).
        min_ate: |ATE| below this makes PE undefined.

    Returns:
        One row per hypothesis, sorted by name, with `SUMMARY_SCHEMA`'s columns.

    Raises:
        PathPatchError: missing columns, nulls, non-finite values, or duplicate
            (hypothesis, example) rows.
    """
    _check_summary_options(n_boot, confidence, min_ate)
    hypotheses, examples, ue, te = _rows_by_hypothesis(rows)

    n_rows = len(hypotheses)
    starts = [0, *(np.flatnonzero(hypotheses[1:] != hypotheses[:-1]) + 1).tolist()]
    bounds = list(zip(starts, [*starts[1:], n_rows], strict=True)) if n_rows else []
    alpha = (1.0 - confidence) / 2.0
    out: dict[str, list] = {name: [] for name in SUMMARY_SCHEMA.names}
    for start, stop in bounds:
        name = str(hypotheses[start])
        ex = examples[start:stop]
        dup = np.flatnonzero(ex[1:] == ex[:-1])
        if dup.size:
            raise PathPatchError(
                f"summarize: hypothesis {name!r} has more than one row for example "
                f"{int(ex[dup[0]])}; results were duplicated (e.g. two files for one item)"
            )
        u, t = ue[start:stop], te[start:stop]
        aue, ate = float(u.mean()), float(t.mean())
        boot_ue, boot_te = _bootstrap_means(u, t, n_boot, _seed_for(seed, name))
        aue_low, aue_high = np.quantile(boot_ue, [alpha, 1.0 - alpha])
        pe = pe_low = pe_high = None
        if abs(ate) >= min_ate and ate != 0.0:
            pe = 1.0 - aue / ate
            if bool((np.abs(boot_te) >= max(min_ate, np.finfo(float).tiny)).all()):
                low, high = np.quantile(1.0 - boot_ue / boot_te, [alpha, 1.0 - alpha])
                pe_low, pe_high = float(low), float(high)
        for key, value in (
            ("hypothesis", name),
            ("n", int(stop - start)),
            ("aue", aue),
            ("ate", ate),
            ("proportion_explained", pe),
            ("pe_boot_low", pe_low),
            ("pe_boot_high", pe_high),
            ("aue_boot_low", float(aue_low)),
            ("aue_boot_high", float(aue_high)),
        ):
            out[key].append(value)
    return pa.table(out, schema=SUMMARY_SCHEMA)



def _check_summary_options(n_boot: int, confidence: float, min_ate: float) -> None:
    """`summarize`'s options, or a PathPatchError naming the bad one."""
    if isinstance(n_boot, bool) or not isinstance(n_boot, int) or n_boot < 1:
        raise PathPatchError(f"n_boot must be a positive int, got {n_boot!r}")
    if not 0.0 < confidence < 1.0:
        raise PathPatchError(f"confidence must be in (0, 1), e.g. 0.95; got {confidence!r}")
    if not min_ate >= 0.0:
        raise PathPatchError(f"min_ate must be >= 0, got {min_ate!r}")


def _rows_by_hypothesis(rows: pa.Table) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(hypothesis, example, ue, te) columns of checked rows, sorted by (hypothesis, example)."""
    missing = [c for c in ("hypothesis", "example", "ue", "te") if c not in rows.column_names]
    if missing:
        raise PathPatchError(
            f"summarize: rows lack column(s) {missing}; expected hypothesis, example, ue, te"
        )
    table = rows.select(["hypothesis", "example", "ue", "te"])
    for name in table.column_names:
        if table.column(name).null_count:
            raise PathPatchError(f"summarize: column '{name}' has nulls")
    try:
        table = pa.table(
            {
                "hypothesis": table.column("hypothesis").cast(pa.string()),
                "example": table.column("example").cast(pa.int64()),
                "ue": table.column("ue").cast(pa.float64()),
                "te": table.column("te").cast(pa.float64()),
            }
        )
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
        raise PathPatchError(f"summarize: column types do not fit: {e}") from e
    table = table.sort_by([("hypothesis", "ascending"), ("example", "ascending")])

    hypotheses = np.asarray(table.column("hypothesis").to_pylist(), dtype=object)
    examples = table.column("example").to_numpy()
    ue = table.column("ue").to_numpy()
    te = table.column("te").to_numpy()
    if not (np.isfinite(ue).all() and np.isfinite(te).all()):
        raise PathPatchError("summarize: ue/te contain NaN or inf; the per-example rows are bad")
    return hypotheses, examples, ue, te

def _seed_for(seed: int, hypothesis: str) -> np.random.SeedSequence:
    """A seed from (seed, hypothesis name), independent of row order and other hypotheses."""
    words = np.frombuffer(hashlib.sha256(hypothesis.encode()).digest(), dtype="<u4")
    return np.random.SeedSequence([int(seed) & (2**64 - 1), *map(int, words)])


def _bootstrap_means(
    ue: np.ndarray, te: np.ndarray, n_boot: int, seed: np.random.SeedSequence
) -> tuple[np.ndarray, np.ndarray]:
    """Paired bootstrap: per replicate, mean UE and mean TE over the same resampled examples."""
    rng = np.random.default_rng(seed)
    n = len(ue)
    block = max(1, _BOOT_BLOCK // n)
    boot_ue = np.empty(n_boot)
    boot_te = np.empty(n_boot)
    for begin in range(0, n_boot, block):
        end = min(begin + block, n_boot)
        index = rng.integers(0, n, size=(end - begin, n))  # (replicates, n) example indices
        boot_ue[begin:end] = ue[index].mean(axis=1)
        boot_te[begin:end] = te[index].mean(axis=1)
    return boot_ue, boot_te
