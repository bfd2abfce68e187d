"""SQL over sweep folders: read-only DuckDB views of results, scores, items, curves and edges.

The only module that imports DuckDB. `open_sweeps(dir, ...)` returns a connection whose views
cover the *current* plan of each folder (files of items the spec no longer names are not
shown); several folders are one query apart (every view has a `sweep` column). The connection
is read-only: its database is attached read-only, file access is disabled and the
configuration locked once the views exist, so CREATE, INSERT, COPY ... TO, ATTACH,
INSTALL/LOAD and SET fail. `run_query` (the CLI) also refuses any statement but a query
with a message that says so.

Views:
    results  sweep, item, shard, hypothesis, example, ue, te, m, m_clean, m_cf (every
             per-example row; m* NULL for a metric without its own statistic)
    scores   sweep, hypothesis, n, aue, ate, proportion_explained, pe_low, pe_high,
             aue_low, aue_high (delta-method normal 95% interval; PE null when |ATE| < 1e-6),
             partial (true while some of the hypothesis's work items are not done)
    items    sweep, item, group_index, shard, shard_id, n_examples, rows, hypotheses, status,
             attempts, error, path
    hypotheses  sweep, hypothesis, family, kind, target, sender, receiver, channel, layer, head,
             ranking, ordering, k, n_edges, n_pruned, edges: what each hypothesis of the plan
             is, as its family recorded it (`pipeline.store.HYPOTHESES_SCHEMA`; NULL where a
             fact does not apply, all NULL for a free-form pattern). The views below join on
             it; none reads a hypothesis's name
    faithfulness  sweep, ranking, ordering, k, n_edges, n_pruned, n, faithfulness (MIB's f from
             the metric's m: logit_diff), its paired-bootstrap 95% interval, and the sweep
             metric's proportion explained with its interval, per member of a circuit_curve
             (its ranking, ordering, k and edge counts from `hypotheses`)
    curve_scores  sweep, ranking, cpr, cmd (MIB's, with intervals), cpr_metric, cmd_metric
    attributions  sweep, item, shard, method, example, edge, score (every per-example row of an
             [[attributions]] method: the first-order change of the statistic m)
    edge_scores  sweep, method, edge, n, score (mean over examples), score_low, score_high,
             importance (oriented: higher = the edge matters more to the clean behaviour),
             importance_low, importance_high, rank (1 = most important), partial; method
             'exact' holds the sweep's single-edge removals (kind 'remove_edge' in
             `hypotheses`, the edge its target): score m(remove e) - m(clean), the
             change EAP approximates, where the metric has a statistic m (logit_diff), else the
             mean unexplained effect
    search_steps  sweep, index, edge, receiver, before, after, removed, evaluated,
             circuit_edges (a [search]'s decisions, in visiting order)
    curve_rankings  sweep, method, edge, importance: the ranking tables a curve sweep's
             circuit_curve families name, read from the files the spec names
    ranking_agreement  sweep, method_a, method_b, n_edges, spearman (rank correlation of the
             two methods' importances, ties at their mean rank), spearman_abs (of |importance|),
             between every two rankings of a sweep: the methods of `edge_scores` and, in a
             curve sweep, the ranking tables its circuit_curve families name (`curve_rankings`;
             method = the ranking's name, as in `faithfulness`)
"""

from __future__ import annotations

import io
import json
import os
import re
import tempfile
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.dataset as pads

from pathpatch.engine.effects import MIN_ATE, importance_sign
from pathpatch.errors import PathPatchError
from pathpatch.model.names import pathpatch_name
from pipeline.store import HYPOTHESES_SCHEMA, STEP_SCHEMA, SweepFolder, item_status

Z95 = 1.959963984540054
FORMATS = ("table", "csv", "json")
ALLOWED_STATEMENTS = ("SELECT", "EXPLAIN")

VIEWS = ("results", "scores", "items", "hypotheses", "faithfulness", "curve_scores",
         "attributions", "edge_scores", "search_steps", "curve_rankings", "ranking_agreement")
"""Every view `open_sweeps` makes, in the order the module doc describes them (tested)."""

_EMPTY_RESULTS = pa.schema([
    ("hypothesis", pa.string()), ("example", pa.int64()), ("ue", pa.float64()),
    ("te", pa.float64()), ("item", pa.string()), ("shard", pa.int32()),
    ("m", pa.float64()), ("m_clean", pa.float64()), ("m_cf", pa.float64()),
])
"""Every column `results` always has: the metric's own statistic (`m`, `m_clean`, `m_cf`) is
NULL in sweeps whose metric has none (`pathpatch.engine.metrics.Metric.value`)."""

_EMPTY_ATTRIBUTIONS = pa.schema([
    ("method", pa.string()), ("example", pa.int64()), ("edge", pa.string()),
    ("score", pa.float64()), ("item", pa.string()), ("shard", pa.int32()),
])
"""Every column `attributions` always has (`pathpatch.discovery.attribution.ROW_SCHEMA` plus the store's)."""

BOOTSTRAP_REPLICATES = 1000
"""Replicates of the paired bootstrap behind `faithfulness` and `curve_scores`."""

_CURVE_SQL = f"""
CREATE TEMP VIEW _curve_replicates AS
WITH rows AS (  -- the members of circuit_curve families taken from a ranking (not its two ends)
    SELECT r.sweep, r.example, r.ue, r.te, r.m, r.m_clean, r.m_cf, h.ranking, h.ordering, h.k,
           h.n_edges, h.n_pruned
    FROM results r JOIN hypotheses h USING (sweep, hypothesis)
    WHERE h.family = 'circuit_curve' AND h.ordering IS NOT NULL
), examples AS (  -- each sweep's examples, numbered from 0
    SELECT sweep, example, row_number() OVER (PARTITION BY sweep ORDER BY example) - 1 AS j,
           count(*) OVER (PARTITION BY sweep) AS n
    FROM (SELECT DISTINCT sweep, example FROM rows)
), draws AS (  -- replicate -1: the sample itself; 0..B-1: n examples drawn with replacement
    SELECT sweep, -1 AS r, j FROM examples
    UNION ALL
    SELECT sweep, r, hash(r, d, 'pathpatch') % n AS j
    FROM (SELECT DISTINCT sweep, n, unnest(range(n)) AS d FROM examples),
         (SELECT range AS r FROM range({BOOTSTRAP_REPLICATES}))
)
-- every member of a curve on the same draws of examples: the bootstrap is paired across k
SELECT sweep, ranking, ordering, k, n_edges, n_pruned, r, count(*) AS n,
       CASE WHEN abs(avg(m_clean) - avg(m_cf)) >= {MIN_ATE}
            THEN (avg(m) - avg(m_cf)) / (avg(m_clean) - avg(m_cf)) END AS f,
       CASE WHEN abs(avg(te)) >= {MIN_ATE} THEN 1 - avg(ue) / avg(te) END AS f_metric
FROM draws JOIN examples USING (sweep, j) JOIN rows USING (sweep, example)
GROUP BY sweep, ranking, ordering, k, n_edges, n_pruned, r;

CREATE TEMP VIEW faithfulness AS
SELECT sweep, ranking, ordering, k, n_edges, n_pruned,
       max(n) FILTER (WHERE r = -1) AS n,
       max(f) FILTER (WHERE r = -1) AS faithfulness,
       quantile_cont(f, 0.025) FILTER (WHERE r >= 0) AS faithfulness_low,
       quantile_cont(f, 0.975) FILTER (WHERE r >= 0) AS faithfulness_high,
       max(f_metric) FILTER (WHERE r = -1) AS proportion_explained,
       quantile_cont(f_metric, 0.025) FILTER (WHERE r >= 0) AS pe_low,
       quantile_cont(f_metric, 0.975) FILTER (WHERE r >= 0) AS pe_high
FROM _curve_replicates GROUP BY sweep, ranking, ordering, k, n_edges, n_pruned;

CREATE TEMP VIEW curve_scores AS
WITH steps AS (  -- trapezoids between consecutive k, per replicate
    SELECT *, lag(k) OVER w AS k0, lag(f) OVER w AS f0, lag(f_metric) OVER w AS g0
    FROM _curve_replicates WINDOW w AS (PARTITION BY sweep, ranking, ordering, r ORDER BY k)
), areas AS (  -- CPR: area under f (signed ranking); CMD: area of |1 - f| (absolute ranking)
    SELECT sweep, ranking, ordering, r,
           CASE WHEN count(*) = count((f + f0)) THEN sum((k - k0) * CASE ordering
               WHEN 'signed' THEN (f + f0) / 2 ELSE (abs(1 - f) + abs(1 - f0)) / 2 END) END AS area,
           CASE WHEN count(*) = count((f_metric + g0)) THEN sum((k - k0) * CASE ordering
               WHEN 'signed' THEN (f_metric + g0) / 2
               ELSE (abs(1 - f_metric) + abs(1 - g0)) / 2 END) END AS area_metric
    FROM steps WHERE k0 IS NOT NULL GROUP BY sweep, ranking, ordering, r
)
SELECT sweep, ranking,
       max(area) FILTER (WHERE ordering = 'signed' AND r = -1) AS cpr,
       quantile_cont(area, 0.025) FILTER (WHERE ordering = 'signed' AND r >= 0) AS cpr_low,
       quantile_cont(area, 0.975) FILTER (WHERE ordering = 'signed' AND r >= 0) AS cpr_high,
       max(area) FILTER (WHERE ordering = 'absolute' AND r = -1) AS cmd,
       quantile_cont(area, 0.025) FILTER (WHERE ordering = 'absolute' AND r >= 0) AS cmd_low,
       quantile_cont(area, 0.975) FILTER (WHERE ordering = 'absolute' AND r >= 0) AS cmd_high,
       max(area_metric) FILTER (WHERE ordering = 'signed' AND r = -1) AS cpr_metric,
       max(area_metric) FILTER (WHERE ordering = 'absolute' AND r = -1) AS cmd_metric
FROM areas GROUP BY sweep, ranking
"""

_SCORES_SQL = f"""
CREATE TEMP VIEW scores AS
WITH s AS (
    SELECT sweep, hypothesis, count(*) AS n, avg(ue) AS aue, avg(te) AS ate,
           var_samp(ue) AS var_ue, var_samp(te) AS var_te, covar_samp(ue, te) AS cov
    FROM results GROUP BY sweep, hypothesis
), d AS (
    SELECT *,
        CASE WHEN abs(ate) >= {MIN_ATE} THEN 1 - aue / ate END AS pe,
        -- delta method for aue/ate: Var ~ (v_u/A^2 - 2 U c/A^3 + U^2 v_t/A^4) / n
        CASE WHEN abs(ate) >= {MIN_ATE} AND n > 1 THEN sqrt(greatest(
            (var_ue / (ate * ate) - 2 * aue * cov / (ate * ate * ate)
             + aue * aue * var_te / (ate * ate * ate * ate)) / n, 0)) END AS se_pe,
        CASE WHEN n > 1 THEN sqrt(var_ue / n) END AS se_aue
    FROM s
), c AS (  -- work items per hypothesis: a score over some of them is partial
    SELECT sweep, hypothesis, count(*) AS items_total,
           count(*) FILTER (WHERE status = 'done') AS items_done
    FROM (SELECT sweep, status, unnest(hypotheses) AS hypothesis FROM items)
    GROUP BY sweep, hypothesis
)
SELECT sweep, hypothesis, n, aue, ate, pe AS proportion_explained,
       pe - {Z95} * se_pe AS pe_low, pe + {Z95} * se_pe AS pe_high,
       aue - {Z95} * se_aue AS aue_low, aue + {Z95} * se_aue AS aue_high,
       c.items_done < c.items_total AS partial
FROM d LEFT JOIN c USING (sweep, hypothesis)
"""


_EDGE_SCORES_SQL = f"""
CREATE TEMP VIEW edge_scores AS
WITH attributed AS (
    SELECT a.sweep, method, edge, count(*) AS n, avg(score) AS score,
           {Z95} * sqrt(var_samp(score) / count(*)) AS half, any_value(o.sign) AS sign
    FROM attributions a JOIN _orientation o USING (sweep) GROUP BY a.sweep, method, edge
), pending AS (  -- attribution methods some of whose work items are not done
    SELECT DISTINCT sweep, hypotheses[1] AS method FROM items
    WHERE kind = 'attribution' AND status <> 'done'
), exact AS (  -- single-edge removals: m(remove) - m(clean) where the metric has m, else UE
    SELECT r.sweep, hypothesis, count(*) AS n, coalesce(avg(m - m_clean), avg(ue)) AS score,
           {Z95} * sqrt(coalesce(var_samp(m - m_clean), var_samp(ue)) / count(*)) AS half,
           CASE WHEN count(m) > 0 THEN any_value(o.sign) ELSE 1 END AS sign
    FROM results r JOIN _orientation o USING (sweep)
    WHERE (r.sweep, hypothesis) IN (SELECT (sweep, hypothesis) FROM hypotheses
                                    WHERE kind = 'remove_edge')
    GROUP BY r.sweep, hypothesis
), everything AS (
    SELECT sweep, method, edge, n, score, score - half AS score_low, score + half AS score_high,
           sign * score AS importance, sign, p.method IS NOT NULL AS partial
    FROM attributed LEFT JOIN pending p USING (sweep, method)
    UNION ALL BY NAME
    SELECT sweep, 'exact' AS method, h.target AS edge, e.n, e.score, e.score - e.half AS score_low,
           e.score + e.half AS score_high, e.sign * e.score AS importance, e.sign, s.partial
    FROM exact e JOIN scores s USING (sweep, hypothesis) JOIN hypotheses h USING (sweep, hypothesis)
)
SELECT sweep, method, edge, n, score, score_low, score_high, importance,
       least(sign * score_low, sign * score_high) AS importance_low,
       greatest(sign * score_low, sign * score_high) AS importance_high,
       row_number() OVER (PARTITION BY sweep, method ORDER BY importance DESC, edge) AS rank,
       partial
FROM everything
"""

_AGREEMENT_SQL = """
WITH pairs AS (  -- every two methods of a sweep, on the edges both rank
    SELECT a.sweep, a.method AS method_a, b.method AS method_b, a.edge,
           a.importance AS x, b.importance AS y
    FROM {source} a JOIN {source} b ON a.sweep = b.sweep AND a.edge = b.edge AND a.method < b.method
), ranked AS (  -- ranks within those shared edges, ties at their mean, of values and of |values|
    SELECT sweep, method_a, method_b,
           rank() OVER (PARTITION BY sweep, method_a, method_b ORDER BY x)
             + (count(*) OVER (PARTITION BY sweep, method_a, method_b, x) - 1) / 2 AS rx,
           rank() OVER (PARTITION BY sweep, method_a, method_b ORDER BY y)
             + (count(*) OVER (PARTITION BY sweep, method_a, method_b, y) - 1) / 2 AS ry,
           rank() OVER (PARTITION BY sweep, method_a, method_b ORDER BY abs(x))
             + (count(*) OVER (PARTITION BY sweep, method_a, method_b, abs(x)) - 1) / 2 AS ax,
           rank() OVER (PARTITION BY sweep, method_a, method_b ORDER BY abs(y))
             + (count(*) OVER (PARTITION BY sweep, method_a, method_b, abs(y)) - 1) / 2 AS ay
    FROM pairs
)
SELECT sweep, method_a, method_b, count(*) AS n_edges, corr(rx, ry) AS spearman,
       corr(ax, ay) AS spearman_abs
FROM ranked GROUP BY sweep, method_a, method_b
"""
"""Spearman's rank correlation between every two rankings of a sweep, over `{source}`'s
(sweep, method, edge, importance) rows: the `ranking_agreement` view, and `rank_agreement`."""


def rank_agreement(rankings: dict[str, dict[str, float]]) -> list[dict]:
    """`ranking_agreement`'s rows (method_a, method_b, n_edges, spearman, spearman_abs) for
    rankings given as {name: {edge: importance}} (a curve's ranking files)."""
    table = _rankings_table("", rankings)
    con = duckdb.connect(":memory:")
    con.register("_rankings", table)
    rows = con.sql(_AGREEMENT_SQL.format(source="_rankings") + " ORDER BY ALL").fetchall()
    return [dict(zip(("method_a", "method_b", "n_edges", "spearman", "spearman_abs"), r[1:],
                     strict=True)) for r in rows]


def curve_rankings(folder: str | Path) -> dict[str, dict[str, float]]:
    """{ranking name: {edge (pathpatch's name): score}} of each circuit_curve family the sweep
    folder's spec names, read from its (edge, score) CSV or Parquet table where that still
    exists (a relative path from the spec's folder); an EAP-IG graph file, or a table gone
    since, gives no entry. The name is the file's stem, as the `hypotheses` view's `ranking`."""
    import tomllib  # the spec's TOML as written: its full validation would import the engine

    import pyarrow.parquet as pq

    sweep = SweepFolder(folder)
    try:
        base_dir = sweep.read_manifest()["base_dir"]
        entries = tomllib.loads(sweep.spec_path.read_text()).get("hypotheses", [])
    except (PathPatchError, OSError, KeyError, ValueError):  # TOMLDecodeError is a ValueError
        return {}
    out: dict[str, dict[str, float]] = {}
    for entry in entries if isinstance(entries, list) else []:
        if not isinstance(entry, dict) or entry.get("family") != "circuit_curve" \
                or "ranking" not in entry:
            continue
        path = Path(str(entry["ranking"]))
        if not path.is_absolute() and base_dir:
            path = Path(base_dir) / path
        if path.suffix.lower() not in (".csv", ".parquet") or not path.is_file():
            continue
        try:
            table = pq.read_table(path) if path.suffix.lower() == ".parquet" else pacsv.read_csv(path)
            out[path.stem] = {pathpatch_name(str(e)): float(v) for e, v in zip(
                table.column("edge").to_pylist(), table.column("score").to_pylist(), strict=True)}
        except (OSError, KeyError, ValueError, PathPatchError, pa.ArrowException):
            continue  # not a readable ranking table: the curve's own run says why
    return out


_RANKINGS_SCHEMA = pa.schema([("sweep", pa.string()), ("method", pa.string()),
                              ("edge", pa.string()), ("importance", pa.float64())])


def _rankings_table(label: str, rankings: dict[str, dict[str, float]]) -> pa.Table:
    return pa.Table.from_pylist(
        [{"sweep": label, "method": name, "edge": edge, "importance": float(value)}
         for name, scores in rankings.items() for edge, value in scores.items()],
        schema=_RANKINGS_SCHEMA)


def _sweep_label(folder: Path, taken: set[str]) -> str:
    label = folder.resolve().name
    if label in taken:
        label = str(folder.resolve())
    taken.add(label)
    return label


def open_sweeps(*folders: str | Path, threads: int = 1) -> duckdb.DuckDBPyConnection:
    """One read-only DuckDB connection with views over the sweep folders' current results.

    `threads=1` (the default) makes every aggregate bitwise the same for the same rows:
    DuckDB's parallel floating-point sums differ in the last bits from run to run. More threads
    are faster on large sweeps, at that price.

    Example:
        >>> con = open_sweeps("sweeps/default")
        >>> con.sql("SELECT * FROM scores ORDER BY proportion_explained DESC").df()

    Raises:
        PathPatchError: a folder is not a sweep folder.
    """
    if not folders:
        raise PathPatchError("give at least one sweep folder")
    sweeps = []
    taken: set[str] = set()
    for f in folders:
        sweep = SweepFolder(f)
        manifest = sweep.read_manifest()
        sweeps.append((_sweep_label(sweep.root, taken), sweep, manifest))

    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise PathPatchError(f"threads = {threads!r}: give an integer >= 1")
    con = _read_only_connection()
    con.execute(f"SET threads = {threads}")
    parts: dict[str, list[str]] = {"results": [], "attributions": []}
    item_tables, orientation, ranking_tables = [], [], []
    for i, (label, sweep, manifest) in enumerate(sweeps):
        records = item_status(sweep, manifest)
        for view, empty in (("results", _EMPTY_RESULTS), ("attributions", _EMPTY_ATTRIBUTIONS)):
            kind = "attribution" if view == "attributions" else "evaluation"
            files = [r["path"] for r in records
                     if r["status"] == "done" and r.get("kind", "evaluation") == kind]
            data = pads.dataset(files, format="parquet") if files else empty.empty_table()
            con.register(f"_{view}_{i}", data)
            parts[view].append(f"SELECT '{_quote(label)}' AS sweep, * FROM _{view}_{i}")
        item_tables.append(pa.Table.from_pylist([
            {"sweep": label, "item": r["id"], "group_index": r["group"], "shard": r["shard"],
             "shard_id": r["shard_id"], "n_examples": r["n_examples"], "rows": r["rows"],
             "hypotheses": r["hypotheses"], "kind": r.get("kind", "evaluation"),
             "status": r["status"], "attempts": r["attempts"], "error": r["error"],
             "path": r["path"]}
            for r in records
        ], schema=_ITEMS_SCHEMA))
        parts.setdefault("hypotheses", []).append(_hypotheses_part(con, i, label, sweep, manifest))
        orientation.append({"sweep": label, "sign": importance_sign(manifest["metric"])})
        ranking_tables.append(_rankings_table(label, curve_rankings(sweep.root)))
        steps = sorted(sweep.steps_dir.glob("*.parquet")) if sweep.steps_dir.is_dir() else []
        con.register(f"_steps_{i}", pads.dataset([str(f) for f in steps], format="parquet")
                     if steps else STEP_SCHEMA.empty_table())
        parts.setdefault("search_steps", []).append(
            f"SELECT '{_quote(label)}' AS sweep, * FROM _steps_{i}")
    for view, empty in (("results", _EMPTY_RESULTS), ("attributions", _EMPTY_ATTRIBUTIONS)):
        con.register(f"_{view}_columns", empty.empty_table())
        parts[view].append(f"SELECT NULL::VARCHAR AS sweep, * FROM _{view}_columns")
        con.execute(f"CREATE TEMP VIEW {view} AS " + " UNION ALL BY NAME ".join(parts[view]))
    con.register("_steps_columns", STEP_SCHEMA.empty_table())
    parts["search_steps"].append("SELECT NULL::VARCHAR AS sweep, * FROM _steps_columns")
    con.execute("CREATE TEMP VIEW search_steps AS "
                + " UNION ALL BY NAME ".join(parts["search_steps"]))
    con.register("_hypotheses_columns", HYPOTHESES_SCHEMA.empty_table())
    parts["hypotheses"].append("SELECT NULL::VARCHAR AS sweep, * FROM _hypotheses_columns")
    con.execute("CREATE TEMP VIEW hypotheses AS " + " UNION ALL BY NAME ".join(parts["hypotheses"]))
    con.register("_items", pa.concat_tables(item_tables))
    con.register("_orientation", pa.Table.from_pylist(
        orientation, schema=pa.schema([("sweep", pa.string()), ("sign", pa.float64())])))
    con.execute("CREATE TEMP VIEW items AS SELECT * FROM _items")
    con.execute(_SCORES_SQL)
    con.execute(_CURVE_SQL)
    con.execute(_EDGE_SCORES_SQL)
    con.register("_curve_rankings", pa.concat_tables(ranking_tables))
    con.execute("CREATE TEMP VIEW curve_rankings AS SELECT * FROM _curve_rankings")
    con.execute("CREATE TEMP VIEW _rankings AS SELECT sweep, method, edge, importance "
                "FROM edge_scores UNION ALL SELECT sweep, method, edge, importance "
                "FROM curve_rankings")
    con.execute("CREATE TEMP VIEW ranking_agreement AS "
                + _AGREEMENT_SQL.format(source="_rankings"))
    con.execute("SET enable_external_access = false")
    con.execute("SET lock_configuration = true")
    return con


_SQL_TYPES = {pa.string(): "VARCHAR", pa.int64(): "BIGINT", pa.float64(): "DOUBLE",
              pa.list_(pa.string()): "VARCHAR[]"}


def _hypotheses_part(con: duckdb.DuckDBPyConnection, i: int, label: str, sweep: SweepFolder,
                     manifest: dict) -> str:
    """One sweep's rows of the `hypotheses` view. A folder written before the table existed
    gets one row whose every column raises the fix when read: its results, scores, items and
    attributions still work; a view that needs its facts fails with the message, never
    returns nothing silently."""
    missing = sweep.missing_hypotheses(manifest)
    if missing is not None:
        fail = f"error('{_quote(missing)}')"
        columns = ", ".join(f"CAST({fail} AS {_SQL_TYPES[f.type]}) AS {f.name}"
                            for f in HYPOTHESES_SCHEMA)
        return f"SELECT '{_quote(label)}' AS sweep, {columns} FROM range(1)"
    data = (pads.dataset([str(sweep.hypotheses_path)], format="parquet")
            if sweep.hypotheses_path.is_file() else HYPOTHESES_SCHEMA.empty_table())
    con.register(f"_hypotheses_{i}", data)
    return f"SELECT '{_quote(label)}' AS sweep, * FROM _hypotheses_{i}"


_ITEMS_SCHEMA = pa.schema([
    ("sweep", pa.string()), ("item", pa.string()), ("group_index", pa.int64()),
    ("shard", pa.int64()), ("shard_id", pa.string()), ("n_examples", pa.int64()),
    ("rows", pa.int64()), ("hypotheses", pa.list_(pa.string())), ("kind", pa.string()),
    ("status", pa.string()),
    ("attempts", pa.int64()), ("error", pa.string()), ("path", pa.string()),
])


def _quote(text: str) -> str:
    return text.replace("'", "''")


def _read_only_connection() -> duckdb.DuckDBPyConnection:
    """A connection whose main database is an empty file attached read-only (then deleted)."""
    with tempfile.TemporaryDirectory(prefix="pathpatch-sql-") as tmp:
        path = os.path.join(tmp, "views.duckdb")
        duckdb.connect(path).close()
        con = duckdb.connect(path, read_only=True)
    return con


def check_read_only(query: str) -> list[str]:
    """Split `query` into statements; refuse anything but SELECT-like ones, saying why.

    Raises:
        PathPatchError: a statement is not a query, or the SQL does not parse.
    """
    try:
        statements = duckdb.extract_statements(query)
    except duckdb.Error as err:
        raise PathPatchError(f"SQL does not parse: {err}") from None
    if not statements:
        raise PathPatchError("no SQL statement given: e.g. \"SELECT * FROM scores\"")
    out = []
    for st in statements:
        if st.type.name not in ALLOWED_STATEMENTS:
            raise PathPatchError(
                f"sql is read-only: {_keyword(st.query)} is not allowed "
                f"({st.query.strip()[:80]!r}); only queries (SELECT, WITH, DESCRIBE, SHOW, "
                f"SUMMARIZE, EXPLAIN) over the views {', '.join(VIEWS)}; to export, use "
                "--format csv and redirect"
            )
        out.append(st.query)
    return out


def _keyword(statement: str) -> str:
    """The statement's own first word as written (INSTALL, CHECKPOINT, USE...), not DuckDB's
    class for it (which calls INSTALL a LOAD and CHECKPOINT a CALL)."""
    text = re.sub(r"(--[^\n]*\n|/\*.*?\*/|\s|\()+", " ", statement, flags=re.S).strip()
    word = re.match(r"[A-Za-z_]+", text)
    return word.group(0).upper() if word else "this statement"


def run_query(folders: list[str | Path], query: str, fmt: str = "table") -> str:
    """Run read-only `query` over the sweep folders and format every statement's result.

    Raises:
        PathPatchError: a bad folder, a refused statement, or an SQL error (its message).
    """
    if fmt not in FORMATS:
        raise PathPatchError(f"--format {fmt!r}: allowed are {', '.join(FORMATS)}")
    statements = check_read_only(query)
    con = open_sweeps(*folders)
    try:
        return "\n".join(query_text(con, sql, fmt) for sql in statements)
    finally:
        con.close()


def query_text(con: duckdb.DuckDBPyConnection, sql: str, fmt: str = "table") -> str:
    """One statement's result on an `open_sweeps` connection, formatted as `fmt`."""
    try:
        rel = con.sql(sql)
        table = rel.to_arrow_table() if rel is not None else pa.table({})
    except duckdb.Error as err:
        raise PathPatchError(f"SQL error: {err}") from None
    return _format(table, fmt)


def _format(table: pa.Table, fmt: str) -> str:
    if fmt == "json":
        return json.dumps(table.to_pylist(), default=str, indent=1)
    if fmt == "csv":
        buf = io.BytesIO()
        pacsv.write_csv(table, buf)
        return buf.getvalue().decode().rstrip("\n")
    return _text_table(table)


def _text_table(table: pa.Table, max_rows: int = 200) -> str:
    names = table.column_names
    rows = table.slice(0, max_rows).to_pylist()

    def cell(v: object) -> str:
        if v is None:
            return "NULL"
        if isinstance(v, float):
            return f"{v:.6g}"
        return str(v)

    cells = [[cell(r[n]) for n in names] for r in rows]
    widths = [max([len(n)] + [len(c[i]) for c in cells]) for i, n in enumerate(names)]
    lines = ["  ".join(n.ljust(w) for n, w in zip(names, widths, strict=True)),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in cells]
    if table.num_rows > max_rows:
        lines.append(f"... {table.num_rows - max_rows} more rows (use --format csv for all)")
    lines.append(f"({table.num_rows} rows)")
    return "\n".join(lines)

