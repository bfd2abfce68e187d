"""`pathpatch report DIR`: a PNG and an HTML page of a sweep's scores, next to its results.

Scores are recomputed from the per-example rows with the method's seeded paired bootstrap
(`pipeline.intervals.summarize`), so the figure's intervals are the bootstrap ones; the SQL
`scores` view gives the delta-method interval instead. What a hypothesis is (a node or edge
removal, a curve's member and its circuit) comes from the `hypotheses` view, never from its
name. Drawing lives in `pipeline.figures`.
"""

from __future__ import annotations

import html
import io
from pathlib import Path

from pathpatch.data.atomic import atomic_write_bytes
from pathpatch.engine.effects import MIN_ATE
from pathpatch.errors import PathPatchError
from pathpatch.model.names import edge_parts
from pipeline.figures import curve_text, least_explained, report_figure
from pipeline.intervals import summarize
from pipeline.query import curve_rankings, open_sweeps
from pipeline.store import SweepFolder

_COLUMNS = ("hypothesis", "n", "aue", "ate", "proportion_explained", "pe_boot_low", "pe_boot_high")


TABLE_ROWS = 50
"""Rows of the HTML table from each end (best and worst) when there are more."""


def _per_example_ratios(con, names: list[str], limit: int = 5000) -> dict[str, list[float]]:
    """hypothesis -> each pair's 1 - UE/TE (pairs with |TE| < MIN_ATE left out), a seeded
    sample of at most `limit` pairs per hypothesis (a plot needs no more), for `names` only."""
    out: dict[str, list[float]] = {}
    table = con.sql(f"""
        SELECT hypothesis, 1 - ue / te AS ratio FROM (
            SELECT hypothesis, ue, te, row_number() OVER (PARTITION BY hypothesis
                ORDER BY hash(example)) AS k FROM results
            WHERE abs(te) >= {MIN_ATE} AND list_contains(?, hypothesis))
        WHERE k <= {limit}""", params=[names]).fetchall()
    for hypothesis, ratio in table:
        out.setdefault(hypothesis, []).append(ratio)
    return out


CHOSEN_FAITHFULNESS = 0.8
"""The circuit drawn is the smallest of the signed curve's circuits at least this faithful."""


def _curve(con, folder: Path):
    """(faithfulness rows, curve_scores rows, (the chosen circuit's weighted edges, title)), or
    None when the sweep has no circuit_curve members. The circuit is drawn from the edges its
    member recorded (the `hypotheses` view's `edges`)."""
    points = con.sql("SELECT ranking, ordering, k, n_edges, n_pruned, faithfulness, faithfulness_low, "
                     "faithfulness_high, proportion_explained FROM faithfulness "
                     "ORDER BY ranking, ordering, k").to_arrow_table().to_pylist()
    if not points:
        return None
    areas = con.sql("SELECT * FROM curve_scores ORDER BY ranking").to_arrow_table().to_pylist()
    candidates = [p for p in points if p["ordering"] == "signed" and p["k"] < 1
                  and p["faithfulness"] is not None and p["n_pruned"] > 0]
    good = [p for p in candidates if p["faithfulness"] >= CHOSEN_FAITHFULNESS]
    chosen = min(good, key=lambda p: p["k"]) if good else max(candidates, key=lambda p: p["k"],
                                                                 default=None)
    circuit = None
    if chosen is not None:
        (names,), = con.sql(
            "SELECT edges FROM hypotheses WHERE family = 'circuit_curve' AND ranking = ? "
            "AND ordering = 'signed' AND k = ?", params=[chosen["ranking"], chosen["k"]]).fetchall()
        scores = curve_rankings(folder).get(chosen["ranking"], {})
        edges = []
        for name in names:
            sender, receiver, channel = edge_parts(name)
            edges.append((scores.get(name, 1.0), sender, receiver,
                          None if channel == "resid" else channel))
        circuit = (edges, f"circuit: {chosen['ranking']}, top k={chosen['k']:g} signed, "
                          f"{chosen['n_pruned']} edges after pruning, faithfulness "
                          f"{chosen['faithfulness']:.3f}")
    return points, areas, circuit


def _pe_key(row: dict) -> float:
    pe = row["proportion_explained"]
    return float("-inf") if pe is None else pe


def write_report(folder: str | Path, *, seed: int = 0) -> tuple[Path, Path]:
    """Write FOLDER/report.png and FOLDER/report.html; returns their paths.

    Every hypothesis is ranked by the SQL `scores` view; the seeded bootstrap runs only for
    the ones shown (the figure's `figures.SHOWN` explaining least, the table's TABLE_ROWS best and worst),
    so the report costs about the same for 30 hypotheses as for 30,000.
    """
    folder = Path(folder)
    con = open_sweeps(folder)
    manifest = SweepFolder(folder).read_manifest()
    missing = SweepFolder(folder).missing_hypotheses(manifest)
    if missing is not None:
        raise PathPatchError(missing)
    ranked = sorted(con.sql(
        "SELECT hypothesis, n, aue, ate, proportion_explained, family, kind, target, sender, "
        "receiver, "
        "channel, layer, head FROM scores LEFT JOIN hypotheses USING (sweep, hypothesis)"
    ).arrow().read_all().to_pylist(), key=_pe_key, reverse=True)
    if not ranked:
        if con.sql("SELECT count(*) FROM attributions").fetchall()[0][0]:
            raise PathPatchError(
                f"{folder} holds attribution scores only, no hypotheses to report: rank them with "
                f"`pathpatch sql {folder} \"SELECT * FROM edge_scores WHERE rank <= 20\"` or turn "
                f"them into faithfulness curves with `pathpatch curve {folder}`")
        raise PathPatchError(f"{folder} has no finished results yet: run or resume the sweep first")
    table = ranked if len(ranked) <= 2 * TABLE_ROWS else ranked[:TABLE_ROWS] + ranked[-TABLE_ROWS:]
    curve = _curve(con, folder)
    listed = [r for r in ranked if curve is None or r["family"] != "circuit_curve"]
    figure = [r["hypothesis"] for r in least_explained(listed)]
    shown = sorted(set(figure) | {r["hypothesis"] for r in table})
    rows = con.sql("SELECT hypothesis, example, ue, te FROM results WHERE "
                   "list_contains(?, hypothesis)", params=[shown]).to_arrow_table()
    boot = {r["hypothesis"]: r for r in summarize(rows, seed=seed).to_pylist()}
    scores = [{**r, **{k: v for k, v in boot.get(r["hypothesis"], {}).items() if "boot" in k}}
              for r in ranked]
    items = con.sql("SELECT status, count(*) AS n FROM items GROUP BY status").fetchall()
    counts = dict(items)
    total, done = sum(counts.values()), counts.get("done", 0)
    partial = f"PARTIAL ({done} of {total} work items done): " if done < total else ""
    title = (f"{partial}{manifest.get('name', folder.name)}: {manifest.get('model')} / "
             f"{manifest.get('metric')}")
    per_example = _per_example_ratios(con, figure)
    agreement = [dict(zip(("method_a", "method_b", "n_edges", "spearman", "spearman_abs"), r,
                          strict=True))
                 for r in con.sql("SELECT method_a, method_b, n_edges, spearman, spearman_abs "
                                  "FROM ranking_agreement ORDER BY ALL").fetchall()]
    counts_note = pair_counts_note(listed, per_example)

    png = folder / "report.png"
    fig = report_figure(scores, title=title, per_example=per_example,
                        curve=None if curve is None else curve[:2],
                        circuit=None if curve is None else curve[2],
                        agreement=agreement, note=counts_note)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)  # constrained layout: all of it inside, one draw
    atomic_write_bytes(png, buffer.getvalue())

    status = ", ".join(f"{n} {s}" for s, n in sorted(items))
    by_name = {r["hypothesis"]: r for r in scores}
    table_rows = []
    for r in (by_name[t["hypothesis"]] for t in table):
        cells = []
        for c in _COLUMNS:
            v = r[c]
            if isinstance(v, float):
                cells.append(f"{v:.4g}")
            else:
                cells.append("undefined" if v is None else html.escape(str(v)))
        table_rows.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    cut = (f"<p>The {TABLE_ROWS} hypotheses explaining most and the {TABLE_ROWS} explaining "
           f"least of {len(ranked):,}; all of them: <code>pathpatch sql {html.escape(str(folder))} "
           "\"SELECT * FROM scores\"</code>.</p>" if len(table) < len(ranked) else "")
    notice = (f"<p><strong>{html.escape(partial)}the scores cover finished work items only; "
              "resume the sweep for the rest.</strong></p>" if partial else "")
    spec_hash = html.escape(str(manifest.get("spec_hash", ""))[:16])
    digest = html.escape(str(manifest.get("model_digest", ""))[:16])
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:sans-serif;margin:2em}} table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:2px 8px;text-align:right}} td:first-child{{text-align:left}}</style>
</head><body>
<h1>{html.escape(title)}</h1>
{notice}
<p>Work items: {html.escape(status)}. Spec hash <code>{spec_hash}</code>,
model digest <code>{digest}</code>.
Proportion explained = 1 - AUE/ATE with a seeded paired bootstrap 95% interval over examples
(seed {seed}); "undefined" where ATE is near zero. The spread panel shows each pair's own
1 - UE/TE: a mean can hide a split between pairs. {html.escape(counts_note)}</p>
{_headline_html(curve, agreement)}
<img src="report.png" alt="scores" style="max-width:100%">
{_curve_html(curve)}
{cut}
<table><tr>{''.join(f'<th>{c}</th>' for c in _COLUMNS)}</tr>
{''.join(table_rows)}
</table></body></html>
"""
    page_path = folder / "report.html"
    atomic_write_bytes(page_path, page.encode())
    return png, page_path


def pair_counts_note(rows: list[dict], per_example: dict[str, list[float]]) -> str:
    """Why a hypothesis's n (pairs scored) and the spread panel's pair count differ, with the
    counts of this sweep: pairs whose total effect is about zero have no ratio 1 - UE/TE."""
    shown = [(r["n"], len(per_example[r["hypothesis"]])) for r in rows
             if r["hypothesis"] in per_example and r.get("n") is not None]
    if not shown:
        return ""
    left_out = sorted({n - k for n, k in shown})
    if left_out == [0]:
        return "n: the pairs scored; the spread panel shows every pair."
    n = max(n for n, _ in shown)
    sampled = " and at most 5,000 per hypothesis are drawn" if n > 5000 else ""
    return (f"n: the pairs scored. The spread panel leaves out pairs whose total effect is "
            f"about zero (|TE| < {MIN_ATE:g}: no ratio 1 - UE/TE){sampled}, here "
            f"{left_out[0]:,}" + (f" to {left_out[-1]:,}" if len(left_out) > 1 else "")
            + f" of {n:,}.")


def _headline_html(curve, agreement: list[dict]) -> str:
    """The result first: a curve sweep's CPR and CMD per ranking and the rank agreement."""
    if curve is None:
        return _agreement_html(agreement)
    lines = curve_text(curve[1])
    return (f"<h2>Result: CPR and CMD per ranking</h2>\n<pre>{html.escape(chr(10).join(lines))}"
            f"</pre>\n{_agreement_html(agreement)}")


def _agreement_html(agreement: list[dict]) -> str:
    """Spearman's rank correlation between every two of the curves' rankings."""
    if not agreement:
        return ""
    rows = "".join(
        f"<tr><td>{html.escape(a['method_a'])}</td><td>{html.escape(a['method_b'])}</td>"
        f"<td>{a['n_edges']}</td><td>{_number(a['spearman'])}</td>"
        f"<td>{_number(a['spearman_abs'])}</td></tr>" for a in agreement)
    return f"""<h2>Rank agreement</h2>
<p>Spearman's rank correlation between the rankings' scores (ties at their mean rank), signed
and of the absolute scores: how far an approximate ranking orders edges as an exact one does.</p>
<table><tr><th>ranking</th><th>ranking</th><th>edges</th><th>Spearman</th>
<th>Spearman (|score|)</th></tr>{rows}</table>"""


def _number(v) -> str:
    return "undefined" if v is None else f"{v:.4g}"


def _curve_html(curve) -> str:
    """CPR and CMD per ranking, and every curve member's faithfulness, as HTML tables."""
    if curve is None:
        return ""
    points, areas, _ = curve

    def cell(v) -> str:
        return "undefined" if v is None else f"{v:.4g}" if isinstance(v, float) else html.escape(str(v))

    def interval(row, name) -> str:
        return f"{cell(row[name])} [{cell(row[name + '_low'])}, {cell(row[name + '_high'])}]"

    scores = "".join(f"<tr><td>{html.escape(a['ranking'])}</td><td>{interval(a, 'cpr')}</td>"
                     f"<td>{interval(a, 'cmd')}</td></tr>" for a in areas)
    rows = "".join(f"<tr><td>{html.escape(p['ranking'])}</td><td>{p['ordering']}</td>"
                   f"<td>{cell(p['k'])}</td><td>{p['n_pruned']}</td>"
                   f"<td>{interval(p, 'faithfulness')}</td><td>{cell(p['proportion_explained'])}</td></tr>"
                   for p in points)
    return f"""<h2>Faithfulness curves</h2>
<p>MIB's faithfulness f(C) = (m(C) - m(empty)) / (m(full) - m(empty)) of the logit difference,
with paired-bootstrap 95% intervals; CPR = area under f by signed score (higher is better), CMD
= area of |1 - f| by absolute score (lower is better).</p>
<table><tr><th>ranking</th><th>CPR</th><th>CMD</th></tr>{scores}</table>
<table><tr><th>ranking</th><th>ordering</th><th>k</th><th>edges</th><th>faithfulness</th>
<th>proportion explained (sweep metric)</th></tr>{rows}</table>"""

