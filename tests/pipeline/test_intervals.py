"""The scores of per-example rows: AUE, ATE, proportion explained and its bootstrap interval."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from pathpatch.errors import PathPatchError
from pipeline.intervals import SUMMARY_SCHEMA, summarize


def table(*rows: tuple[str, int, float, float], extra: bool = False) -> pa.Table:
    hypothesis, example, ue, te = (list(c) for c in zip(*rows, strict=True)) if rows else ([],) * 4
    columns = {
        "hypothesis": pa.array(hypothesis, pa.string()),
        "example": pa.array(example, pa.int64()),
        "ue": pa.array(ue, pa.float64()),
        "te": pa.array(te, pa.float64()),
    }
    if extra:
        columns["shard"] = pa.array(["s"] * len(hypothesis))
    return pa.table(columns)


def test_summarize_by_hand():
    rows = table(
        ("h", 0, 1.0, 2.0), ("g", 0, 0.0, 1.0), ("h", 1, 2.0, 4.0),
        ("g", 1, 1.0, 1.0), ("h", 2, 3.0, 6.0), extra=True,
    )
    out = summarize(rows, n_boot=4000)
    assert out.schema == SUMMARY_SCHEMA
    g, h = out.to_pylist()
    # g: AUE = 0.5, ATE = 1, PE = 0.5. Replicate means of ue are 0, .5, 1 with probability
    # 1/4, 1/2, 1/4 (te is always 1), so the 95% intervals span the extremes.
    assert (g["hypothesis"], g["n"], g["aue"], g["ate"]) == ("g", 2, 0.5, 1.0)
    assert g["proportion_explained"] == 0.5
    assert (g["aue_boot_low"], g["aue_boot_high"]) == (0.0, 1.0)
    assert (g["pe_boot_low"], g["pe_boot_high"]) == (0.0, 1.0)
    # h: AUE = 2, ATE = 4, PE = 0.5; ue = te / 2 on every example, so a *paired* bootstrap
    # gives PE = 0.5 in every replicate (an unpaired one would not).
    assert (h["hypothesis"], h["n"], h["aue"], h["ate"]) == ("h", 3, 2.0, 4.0)
    assert h["proportion_explained"] == pytest.approx(0.5)
    assert h["pe_boot_low"] == pytest.approx(0.5) and h["pe_boot_high"] == pytest.approx(0.5)
    assert 1.0 <= h["aue_boot_low"] < 2.0 < h["aue_boot_high"] <= 3.0


def test_summarize_negative_proportion_explained():
    out = summarize(table(("h", 0, 3.0, 1.0), ("h", 1, 1.0, 1.0))).to_pylist()[0]
    assert out["proportion_explained"] == pytest.approx(1 - 2.0 / 1.0)


def test_summarize_is_deterministic_and_order_free():
    rng = np.random.default_rng(5)
    data = [(f"h{k}", i, float(rng.gamma(2, 0.2)), float(rng.gamma(4, 0.25)))
            for k in range(3) for i in range(40)]
    first = summarize(table(*data), seed=7)
    assert first.equals(summarize(table(*data), seed=7))
    shuffled = [data[i] for i in rng.permutation(len(data))]
    assert first.equals(summarize(table(*shuffled), seed=7))
    assert first.column("hypothesis").to_pylist() == ["h0", "h1", "h2"]
    assert not first.equals(summarize(table(*data), seed=8))
    # A hypothesis's interval does not depend on which others are present.
    alone = summarize(table(*[r for r in data if r[0] == "h1"]), seed=7)
    assert alone.to_pylist()[0] == first.to_pylist()[1]


def test_undefined_when_ate_is_near_zero():
    out = summarize(
        table(("zero", 0, 0.5, 0.0), ("zero", 1, 0.1, 0.0),
              ("tiny", 0, 0.0, 1e-9), ("tiny", 1, 0.0, 1e-9))
    ).to_pylist()
    for row in out:
        assert row["proportion_explained"] is None
        assert row["pe_boot_low"] is None and row["pe_boot_high"] is None
        assert row["ate"] < 1e-6
    # the means themselves are still reported
    assert {r["hypothesis"]: (r["aue"], r["ate"]) for r in out} == {
        "zero": (pytest.approx(0.3), 0.0), "tiny": (0.0, pytest.approx(1e-9, abs=1e-15))}
    # A replicate with ATE = 0 makes the interval undefined, not huge; the point estimate stays.
    few = summarize(table(("h", 0, 0.0, 0.0), ("h", 1, 0.0, 0.0), ("h", 2, 0.5, 1.0)))
    row = few.to_pylist()[0]
    assert row["proportion_explained"] == pytest.approx(0.5)
    assert row["pe_boot_low"] is None and row["pe_boot_high"] is None
    assert summarize(table(("h", 0, 0.0, 1e-9)), min_ate=1e-12).to_pylist()[0][
        "proportion_explained"
    ] == pytest.approx(1.0)


def test_bootstrap_coverage_sanity():
    # ue ~ Gamma(2, 0.2) (mean 0.4), te ~ Gamma(4, 0.25) (mean 1): true PE = 0.6.
    rng = np.random.default_rng(0)
    trials, n = 200, 60
    data = []
    for k in range(trials):
        ue, te = rng.gamma(2, 0.2, n), rng.gamma(4, 0.25, n)
        data += [(f"t{k:03d}", i, float(ue[i]), float(te[i])) for i in range(n)]
    out = summarize(table(*data), n_boot=400, seed=1)
    low = np.array(out.column("pe_boot_low").to_pylist())
    high = np.array(out.column("pe_boot_high").to_pylist())
    pe = np.array(out.column("proportion_explained").to_pylist())
    assert ((low <= pe) & (pe <= high)).all()
    coverage = float(((low <= 0.6) & (0.6 <= high)).mean())
    assert 0.88 <= coverage <= 0.99, coverage
    aue_low = np.array(out.column("aue_boot_low").to_pylist())
    aue_high = np.array(out.column("aue_boot_high").to_pylist())
    assert 0.88 <= float(((aue_low <= 0.4) & (0.4 <= aue_high)).mean()) <= 0.99
    # Wider confidence, wider interval.
    wide = summarize(table(*data[: n]), n_boot=400, seed=1, confidence=0.99).to_pylist()[0]
    narrow = summarize(table(*data[: n]), n_boot=400, seed=1, confidence=0.5).to_pylist()[0]
    assert wide["pe_boot_low"] < narrow["pe_boot_low"] < narrow["pe_boot_high"] < wide["pe_boot_high"]


def test_summarize_empty_and_errors():
    empty = summarize(table())
    assert empty.num_rows == 0 and empty.schema == SUMMARY_SCHEMA
    with pytest.raises(PathPatchError, match=r"rows lack column\(s\) \['te'\]"):
        summarize(table(("h", 0, 1.0, 1.0)).drop_columns(["te"]))
    with pytest.raises(PathPatchError, match="hypothesis 'h' has more than one row for example 1"):
        summarize(table(("h", 1, 1.0, 1.0), ("g", 1, 1.0, 1.0), ("h", 1, 1.0, 2.0)))
    nulls = pa.table({"hypothesis": ["h"], "example": [0], "ue": pa.array([None], pa.float64()),
                      "te": [1.0]})
    with pytest.raises(PathPatchError, match="column 'ue' has nulls"):
        summarize(nulls)
    with pytest.raises(PathPatchError, match="NaN or inf"):
        summarize(table(("h", 0, float("nan"), 1.0)))
    with pytest.raises(PathPatchError, match="confidence must be in"):
        summarize(table(("h", 0, 1.0, 1.0)), confidence=1.0)
    with pytest.raises(PathPatchError, match="n_boot must be a positive int"):
        summarize(table(("h", 0, 1.0, 1.0)), n_boot=0)
