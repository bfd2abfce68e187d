"""`pathpatch report DIR`: a PNG and an HTML page of a sweep's scores, next to its results.

Scores are recomputed from the per-example rows with the method's seeded paired bootstrap
(`pathpatch.metrics.summarize`), so the figure's intervals are the bootstrap ones; the SQL
`scores` view gives the delta-method interval instead. Drawing lives in `pathpatch.figures`.
"""

from __future__ import annotations

import html
import io
import json
from pathlib import Path

from pathpatch.atomic import atomic_write_bytes
from pathpatch.errors import PathPatchError
from pathpatch.figures import least_explained, report_figure
from pathpatch.metrics import summarize
from pipeline.query import open_sweeps

_COLUMNS = ("hypothesis", "n", "aue", "ate", "proportion_explained", "pe_boot_low", "pe_boot_high")


TABLE_ROWS = 50
"""Rows of the HTML table from each end (best and worst) when there are more."""


def _per_example_ratios(con, names: list[str], limit: int = 5000) -> dict[str, list[float]]:
    """hypothesis -> each pair's 1 - UE/TE (pairs with |TE| < MIN_ATE left out), a seeded
    sample of at most `limit` pairs per hypothesis (a plot needs no more), for `names` only."""
    from pathpatch.metrics import MIN_ATE

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
    ranked = sorted(con.sql("SELECT hypothesis, n, aue, ate, proportion_explained FROM scores"
                            ).arrow().read_all().to_pylist(), key=_pe_key, reverse=True)
    if not ranked:
        raise PathPatchError(f"{folder} has no finished results yet: run or resume the sweep first")
    table = ranked if len(ranked) <= 2 * TABLE_ROWS else ranked[:TABLE_ROWS] + ranked[-TABLE_ROWS:]
    figure = [r["hypothesis"] for r in least_explained(ranked)]
    shown = sorted(set(figure) | {r["hypothesis"] for r in table})
    rows = con.sql("SELECT hypothesis, example, ue, te FROM results WHERE "
                   "list_contains(?, hypothesis)", params=[shown]).to_arrow_table()
    boot = {r["hypothesis"]: r for r in summarize(rows, seed=seed).to_pylist()}
    scores = [{**r, **{k: v for k, v in boot.get(r["hypothesis"], {}).items() if "boot" in k}}
              for r in ranked]
    items = con.sql("SELECT status, count(*) AS n FROM items GROUP BY status").fetchall()
    manifest = json.loads((folder / "manifest.json").read_text())
    counts = dict(items)
    total, done = sum(counts.values()), counts.get("done", 0)
    partial = f"PARTIAL ({done} of {total} work items done): " if done < total else ""
    title = (f"{partial}{manifest.get('name', folder.name)}: {manifest.get('model')} / "
             f"{manifest.get('metric')}")
    per_example = _per_example_ratios(con, figure)

    png = folder / "report.png"
    fig = report_figure(scores, title=title, per_example=per_example)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
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
1 - UE/TE (pairs with TE near zero left out): a mean can hide a split between pairs.</p>
<img src="report.png" alt="scores" style="max-width:100%">
{cut}
<table><tr>{''.join(f'<th>{c}</th>' for c in _COLUMNS)}</tr>
{''.join(table_rows)}
</table></body></html>
"""
    page_path = folder / "report.html"
    atomic_write_bytes(page_path, page.encode())
    return png, page_path
