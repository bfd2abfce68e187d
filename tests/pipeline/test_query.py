"""SQL views over sweep folders: results, scores, items; read-only; several sweeps at once."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pathpatch.errors import PathPatchError
from pipeline.cli import main
from pipeline.intervals import summarize
from pipeline.query import check_read_only, open_sweeps, run_query
from pipeline.spec import load_spec
from pipeline.sweep import run_sweep
from tests.pipeline.conftest import write_spec


@pytest.fixture(scope="module")
def sweeps(tmp_path_factory, checkpoint: Path) -> tuple[Path, Path]:
    tmp = tmp_path_factory.mktemp("sweeps")
    a, b = tmp / "a", tmp / "b"
    run_sweep(load_spec(write_spec(tmp, checkpoint, name="a")), a, backend="inprocess",
              progress=False)
    run_sweep(load_spec(write_spec(tmp, checkpoint, name="b", metric="loss")), b,
              backend="inprocess", progress=False)
    return a, b


def test_views_and_scores(sweeps):
    a, _ = sweeps
    con = open_sweeps(a)
    assert con.sql("SELECT count(*) FROM results").fetchall() == [(4 * 48,)]
    assert con.sql("SELECT count(DISTINCT (hypothesis, example)) FROM results"
                   ).fetchall() == [(4 * 48,)]
    items = con.sql("SELECT status, count(*) FROM items GROUP BY status").fetchall()
    assert items == [("done", 6)]
    scores = con.sql("SELECT * FROM scores ORDER BY hypothesis").to_arrow_table().to_pylist()
    reference = summarize(con.sql("SELECT hypothesis, example, ue, te FROM results"
                                  ).to_arrow_table()).to_pylist()
    reference = {r["hypothesis"]: r for r in reference}
    for row in scores:
        ref = reference[row["hypothesis"]]
        assert row["n"] == ref["n"] == 48
        for key in ("aue", "ate", "proportion_explained"):
            assert row[key] == pytest.approx(ref[key], rel=1e-9, abs=1e-12)
        if row["proportion_explained"] is not None:
            assert row["pe_low"] <= row["proportion_explained"] <= row["pe_high"]
        assert row["aue_low"] <= row["aue"] <= row["aue_high"]
    assert con.sql("SELECT * FROM results LIMIT 5").df().shape[0] == 5  # pandas works


def test_several_sweeps_in_one_query(sweeps):
    a, b = sweeps
    out = run_query([a, b], "SELECT sweep, count(*) AS n FROM scores GROUP BY sweep "
                            "ORDER BY sweep", "json")
    assert json.loads(out) == [{"sweep": "a", "n": 4}, {"sweep": "b", "n": 4}]
    out = run_query([a, b], "SELECT x.hypothesis, x.aue AS kl, y.aue AS loss FROM scores x "
                            "JOIN scores y USING (hypothesis) WHERE x.sweep = 'a' AND "
                            "y.sweep = 'b'", "csv")
    assert out.splitlines()[0] == '"hypothesis","kl","loss"' and len(out.splitlines()) == 5


@pytest.mark.parametrize("statement", [
    "CREATE TABLE t AS SELECT 1",
    "INSERT INTO results VALUES ('x', 1, 1, 1, 'i', 0)",
    "COPY (SELECT * FROM results) TO '/tmp/pathpatch-leak.csv'",
    "ATTACH '/tmp/pathpatch-other.duckdb' AS o",
    "INSTALL httpfs",
    "LOAD httpfs",
    "SET threads = 1",
    "DROP VIEW scores",
    "SELECT 1; DELETE FROM results",
])
def test_sql_is_read_only(sweeps, statement, capsys):
    a, _ = sweeps
    code = main(["sql", str(a), statement])
    err = capsys.readouterr().err
    assert code == 2 and "read-only" in err and "Traceback" not in err, err
    assert not Path("/tmp/pathpatch-leak.csv").exists()
    assert not Path("/tmp/pathpatch-other.duckdb").exists()


@pytest.mark.parametrize("statement", [
    "CREATE TABLE t AS SELECT 1", "COPY (SELECT 1) TO '/tmp/pathpatch-leak2.csv'",
    "ATTACH '/tmp/pathpatch-other2.duckdb' AS o", "INSTALL httpfs", "LOAD httpfs",
    "SET threads = 1", "SELECT * FROM read_csv('/etc/hostname')",
])
def test_python_connection_is_read_only_too(sweeps, statement):
    import duckdb

    con = open_sweeps(sweeps[0])
    with pytest.raises(duckdb.Error):
        con.execute(statement)
    assert not Path("/tmp/pathpatch-leak2.csv").exists()


def test_cli_formats_and_errors(sweeps, capsys):
    a, _ = sweeps
    assert main(["sql", str(a), "SELECT hypothesis, n FROM scores ORDER BY 1"]) == 0
    out = capsys.readouterr().out
    assert "direct" in out and "(4 rows)" in out
    assert main(["sql", str(a), "SELECT nope FROM scores"]) == 2
    assert "SQL error" in capsys.readouterr().err
    assert main(["sql", str(a), "SELECT 1", "--format", "json"]) == 0
    assert json.loads(capsys.readouterr().out) == [{"1": 1}]
    with pytest.raises(PathPatchError, match="read-only"):
        check_read_only("PRAGMA threads=2")


def test_scores_say_when_they_are_partial(tmp_path, checkpoint):
    out = tmp_path / "out"
    run_sweep(load_spec(write_spec(tmp_path, checkpoint)), out, backend="inprocess", progress=False)
    assert open_sweeps(out).sql("SELECT bool_or(partial) FROM scores").fetchall() == [(False,)]
    manifest = json.loads((out / "manifest.json").read_text())
    gone = manifest["items"][0]
    (out / "items" / f"{gone['id']}.parquet").unlink()
    partial = open_sweeps(out).sql("SELECT hypothesis, n FROM scores WHERE partial "
                                   "ORDER BY hypothesis").fetchall()
    assert partial == sorted((h, 48 - gone["n_examples"]) for h in gone["hypotheses"])


def test_scores_are_computed_on_one_thread_unless_asked(sweeps):
    """DuckDB's parallel floating-point sums vary in the last bits between runs (measured: 8
    different results in 8 runs of avg/var_samp over 4M rows on 2 threads); one thread gives
    the same bits for the same rows."""
    a, _ = sweeps
    assert open_sweeps(a).sql("SELECT current_setting('threads')").fetchall() == [(1,)]
    assert open_sweeps(a, threads=2).sql("SELECT current_setting('threads')").fetchall() == [(2,)]
    with pytest.raises(PathPatchError, match="threads = 0"):
        open_sweeps(a, threads=0)


def test_rank_agreement_is_spearman_over_the_edges_both_rankings_score():
    """Against a Spearman computed here: Pearson correlation of mean ranks (ties shared), over
    the shared edges only, signed and of absolute values."""
    import random

    import numpy as np

    from pipeline.query import rank_agreement

    rng = random.Random(0)
    edges = [f"e{i}" for i in range(40)]
    a = {e: rng.choice([-2.0, -1.0, 0.0, 0.5, 1.0, 3.0]) for e in edges}  # many ties
    b = {e: a[e] + rng.gauss(0, 1) for e in edges[5:]}  # another edge set

    def mean_ranks(values):
        order = sorted(range(len(values)), key=lambda i: values[i])
        ranks = [0.0] * len(values)
        i = 0
        while i < len(order):
            j = i
            while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
                j += 1
            for k in range(i, j + 1):
                ranks[order[k]] = (i + j) / 2 + 1
            i = j + 1
        return ranks

    shared = [e for e in edges if e in b]
    want = {}
    for key, f in (("spearman", lambda v: v), ("spearman_abs", abs)):
        x = mean_ranks([f(a[e]) for e in shared])
        y = mean_ranks([f(b[e]) for e in shared])
        want[key] = float(np.corrcoef(x, y)[0, 1])
    (got,) = rank_agreement({"a": a, "b": b})
    assert (got["method_a"], got["method_b"], got["n_edges"]) == ("a", "b", 35)
    assert got["spearman"] == pytest.approx(want["spearman"], abs=1e-12)
    assert got["spearman_abs"] == pytest.approx(want["spearman_abs"], abs=1e-12)
