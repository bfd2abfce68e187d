"""Faithfulness curves through the pipeline: a circuit_curve sweep with MIB's logit difference,
and the `faithfulness` and `curve_scores` views checked against the rows, recomputed here."""

import random

import numpy as np
import pytest

from pathpatch.model.graph import Graph
from pathpatch.model.loading import load_model
from pipeline.cli import main
from pipeline.query import open_sweeps

SPEC = """
model = "attn-only-2l"
metric = "logit_diff"
shard_size = 16
group_size = 11
[dataset]
kind = "induction"
n = 32
[[hypotheses]]
family = "circuit_curve"
ranking = "scores.csv"
fractions = [0.01, 0.1, 0.3, 1.0]
"""


@pytest.fixture(scope="module")
def curve_sweep(tmp_path_factory):
    root = tmp_path_factory.mktemp("curve")
    graph = Graph.from_model(load_model("attn-only-2l"))
    rng = random.Random(0)
    (root / "scores.csv").write_text("edge,score\n" + "".join(
        f"{e},{rng.gauss(0, 1)!r}\n" for e in graph.edges))
    (root / "curve.toml").write_text(SPEC)
    folder = root / "curve"
    assert main(["run", str(root / "curve.toml"), "--out", str(folder), "--backend", "inprocess",
                 "--quiet", "--no-progress"]) == 0
    return folder


def _rows(con, name: str):
    return con.sql("SELECT example, ue, te, m, m_clean, m_cf FROM results "
                   f"WHERE hypothesis = '{name}' ORDER BY example").fetchnumpy()


def test_the_ends_of_a_curve_are_the_two_runs(curve_sweep):
    con = open_sweeps(curve_sweep)
    empty, full = _rows(con, "curve scores empty"), _rows(con, "curve scores full")
    assert len(empty["m"]) == 32
    np.testing.assert_array_equal(empty["m"], empty["m_cf"])  # no edge: the counterfactual run
    np.testing.assert_array_equal(full["m"], full["m_clean"])  # every edge: the clean run
    assert not np.allclose(empty["m_clean"], empty["m_cf"])  # and the task has an effect


def test_faithfulness_and_curve_scores_equal_their_definitions(curve_sweep):
    con = open_sweeps(curve_sweep)
    view = con.sql("SELECT ordering, k, n_edges, n_pruned, n, faithfulness, faithfulness_low, "
                   "faithfulness_high, proportion_explained FROM faithfulness "
                   "ORDER BY ordering, k").fetchall()
    assert [(o, k) for o, k, *_ in view] == [(o, k) for o in ("absolute", "signed")
                                             for k in (0.01, 0.1, 0.3, 1.0)]
    names = {r[0]: r[0] for r in con.sql("SELECT DISTINCT hypothesis FROM results").fetchall()}
    f = {}
    for ordering, k, n_edges, n_pruned, n, faith, low, high, pe in view:
        name = f"curve scores {ordering} k={k:g} n={n_edges} pruned={n_pruned}"
        assert name in names and n == 32
        rows = _rows(con, name)
        want = (rows["m"].mean() - rows["m_cf"].mean()) / (rows["m_clean"].mean() - rows["m_cf"].mean())
        assert faith == pytest.approx(want, rel=1e-9, abs=1e-12)
        assert pe == pytest.approx(1 - rows["ue"].mean() / rows["te"].mean(), rel=1e-9)
        assert low <= high and (low <= faith <= high or abs(high - low) < 1e-9)
        f[ordering, k] = want
    assert f["signed", 1.0] == pytest.approx(1.0) and f["absolute", 1.0] == pytest.approx(1.0)
    ks = [0.01, 0.1, 0.3, 1.0]
    cpr = sum((b - a) * (f["signed", a] + f["signed", b]) / 2 for a, b in zip(ks, ks[1:]))
    cmd = sum((b - a) * (abs(1 - f["absolute", a]) + abs(1 - f["absolute", b])) / 2
              for a, b in zip(ks, ks[1:]))
    (row,) = con.sql("SELECT ranking, cpr, cpr_low, cpr_high, cmd, cmd_low, cmd_high "
                     "FROM curve_scores").fetchall()
    assert row[0] == "scores"
    assert row[1] == pytest.approx(cpr, rel=1e-9) and row[4] == pytest.approx(cmd, rel=1e-9, abs=1e-12)
    assert row[2] <= row[3] and row[5] <= row[6]


def test_a_sweep_without_curves_has_empty_curve_views(tmp_path):
    spec = tmp_path / "plain.toml"
    spec.write_text('model = "attn-only-2l"\n[dataset]\nkind = "induction"\nn = 8\n'
                    '[[hypotheses]]\nname = "all"\npattern = "all"\n')
    assert main(["run", str(spec), "--out", str(tmp_path / "plain"), "--backend", "inprocess",
                 "--quiet", "--no-progress"]) == 0
    con = open_sweeps(tmp_path / "plain")
    assert con.sql("SELECT * FROM faithfulness").fetchall() == []
    assert con.sql("SELECT * FROM curve_scores").fetchall() == []
    assert con.sql("SELECT count(*) FROM results WHERE m IS NULL").fetchall() == [(8,)]  # kl: no m


def test_the_documented_curve_queries_run(curve_sweep):
    from pathlib import Path

    doc = (Path(__file__).resolve().parents[2] / "docs" / "PIPELINE.md").read_text()
    block = doc.split("Faithfulness curves (", 1)[1].split("```sql", 1)[1].split("```", 1)[0]
    body = "\n".join(line for line in block.splitlines() if not line.strip().startswith("--"))
    queries = [q.strip() for q in body.split(";") if q.strip()]
    assert len(queries) == 2
    con = open_sweeps(curve_sweep)
    assert len(con.sql(queries[0]).fetchall()) == 8
    assert [r[0] for r in con.sql(queries[1]).fetchall()] == ["scores"]


def test_a_ranking_from_an_edge_removal_sweep_feeds_a_curve(tmp_path, capsys):
    """The documented route: exact single-edge effects -> CSV ranking -> circuit_curve -> CPR."""
    from pathlib import Path

    doc = (Path(__file__).resolve().parents[2] / "docs" / "PIPELINE.md").read_text()
    line = next(ln for ln in doc.splitlines() if ln.startswith("pathpatch sql sweeps/edges"))
    query = line.split('"')[1]
    spec = tmp_path / "edges.toml"
    spec.write_text('model = "attn-only-2l"\nmetric = "logit_diff"\ngroup_size = 27\n'
                    '[dataset]\nkind = "induction"\nn = 16\n[[hypotheses]]\nfamily = "edge_removal"\n')
    assert main(["run", str(spec), "--out", str(tmp_path / "edges"), "--backend", "inprocess",
                 "--quiet", "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["sql", str(tmp_path / "edges"), query, "--format", "csv"]) == 0
    (tmp_path / "scores.csv").write_text(capsys.readouterr().out)
    curve = tmp_path / "curve.toml"
    curve.write_text(SPEC.replace("n = 32", "n = 16"))
    assert main(["run", str(curve), "--out", str(tmp_path / "curve"), "--backend", "inprocess",
                 "--quiet", "--no-progress"]) == 0
    (row,) = open_sweeps(tmp_path / "curve").sql("SELECT ranking, cpr, cmd FROM curve_scores").fetchall()
    assert row[0] == "scores" and row[1] is not None and row[2] is not None


def test_the_report_draws_the_curves_and_a_circuit(curve_sweep, monkeypatch):
    from pipeline import report

    drawn = {}
    real = report.report_figure

    def spy(scores, **kwargs):
        drawn.update(kwargs)
        return real(scores, **kwargs)

    monkeypatch.setattr(report, "report_figure", spy)
    png, page = report.write_report(curve_sweep)
    text = page.read_text()
    assert png.stat().st_size > 0 and "Faithfulness curves" in text and "CPR" in text
    points, areas = drawn["curve"]
    assert len(points) == 8 and [a["ranking"] for a in areas] == ["scores"]
    edges, title = drawn["circuit"]
    assert edges and title.startswith("circuit: scores, top k=")
    assert len({e[0] for e in edges}) > 1  # weighted by the ranking's scores, not all alike
    assert all(ch in (None, "q", "k", "v") for *_, ch in edges)


def _interval(row: dict, name: str) -> str:
    return f"{row[name]:.3f} [{row[name + '_low']:.3f}, {row[name + '_high']:.3f}]"


def test_a_curve_report_shows_its_headline_first_and_nothing_is_clipped(curve_sweep, monkeypatch):
    """The page opens with CPR and CMD per ranking (with intervals); the figure carries them as
    text beside the curves, lists no curve point as a hypothesis, and keeps every text in."""
    from matplotlib.axes import Axes

    from pipeline import report
    from tests.pipeline.layout import check_layout

    seen = {}
    real = report.report_figure

    def spy(scores, **kwargs):
        seen["fig"] = real(scores, **kwargs)
        return seen["fig"]

    monkeypatch.setattr(report, "report_figure", spy)
    _, page = report.write_report(curve_sweep)
    con = open_sweeps(curve_sweep)
    (row,) = con.sql("SELECT * FROM curve_scores").to_arrow_table().to_pylist()
    # its ranking, named by a path relative to the spec, read whole: one ranking, no agreement
    assert con.sql("SELECT method, count(*) FROM curve_rankings GROUP BY ALL").fetchall() == [
        ("scores", 81)]
    assert con.sql("SELECT * FROM ranking_agreement").fetchall() == []
    text = page.read_text()
    headline = text.split("<h2>Result: CPR and CMD per ranking</h2>", 1)[1]
    assert headline.index(_interval(row, "cpr")) < headline.index('<img src="report.png"')
    assert _interval(row, "cmd") in headline.split("<img", 1)[0]
    fig = seen["fig"]
    check_layout(fig)
    titles = [ax.get_title() for ax in fig.findobj(Axes)]
    assert not any("explaining least" in t or t == "spread over examples" for t in titles)
    assert any(t.startswith("kept by signed score: CPR") for t in titles)
    assert any(t.startswith("kept by |score|: CMD") for t in titles)
    shown = "\n".join(t.get_text() for ax in fig.findobj(Axes) for t in ax.texts)
    assert _interval(row, "cpr") in shown and _interval(row, "cmd") in shown


def test_one_command_goes_from_a_finished_scan_to_its_curve(tmp_path, capsys):
    spec = tmp_path / "scan.toml"
    spec.write_text('name = "scan"\nmodel = "attn-only-2l"\nmetric = "logit_diff"\ngroup_size = 27\n'
                    '[dataset]\nkind = "induction"\nn = 16\n[[hypotheses]]\nfamily = "edge_removal"\n')
    scan = tmp_path / "sweeps" / "edges"  # named apart from its spec ("scan"), which names the files
    assert main(["curve", str(scan)]) == 2  # not a sweep folder yet
    assert "is not a sweep folder" in capsys.readouterr().err
    assert main(["run", str(spec), "--out", str(scan), "--backend", "inprocess", "--quiet",
                 "--no-progress"]) == 0
    out = tmp_path / "sweeps" / "scan-curve"
    assert main(["curve", str(scan), "--fractions", "0.1", "0.5", "1", "--out", str(out),
                 "--backend", "inprocess", "--quiet", "--no-progress"]) == 0
    assert (tmp_path / "sweeps" / "scan-exact.csv").read_text().startswith("edge,score\n")
    assert f"rankings {tmp_path / 'sweeps' / 'scan-exact.csv'}; spec" in capsys.readouterr().out
    assert (tmp_path / "sweeps" / "scan-curve.toml").is_file()
    con = open_sweeps(out)
    assert len(con.sql("SELECT * FROM faithfulness").fetchall()) == 6
    (row,) = con.sql("SELECT ranking, cpr, cmd FROM curve_scores").fetchall()
    assert row[0] == "scan-exact" and row[1] is not None
    again = main(["curve", str(scan), "--fractions", "0.1", "0.5", "1", "--out", str(out),
                  "--backend", "inprocess", "--no-progress"])
    assert again == 0 and "0 computed" in capsys.readouterr().out  # the same curve: resumed, nothing new


def test_every_ranking_of_a_scan_and_a_search_s_circuit_become_curves_side_by_side(
        tmp_path, capsys):
    """Exact single-edge effects, EAP and EAP-IG from one scan, and a greedy search's circuit:
    one curve spec, a CPR/CMD per ranking, and the report's rank agreement."""
    import matplotlib

    matplotlib.use("Agg")
    head = ('model = "attn-only-2l"\nmetric = "logit_diff"\ngroup_size = 27\n'
            '[dataset]\nkind = "induction"\nn = 16\n')
    (tmp_path / "scan.toml").write_text(
        'name = "scan"\n' + head + '[[hypotheses]]\nfamily = "edge_removal"\n'
        '[[attributions]]\nmethod = "eap"\n[[attributions]]\nmethod = "eap-ig"\nsteps = 2\n')
    (tmp_path / "greedy.toml").write_text('name = "greedy"\n' + head + "[search]\ntau = 0.3\n")
    for name in ("scan", "greedy"):
        assert main(["run", str(tmp_path / f"{name}.toml"), "--out", str(tmp_path / name),
                     "--backend", "inprocess", "--quiet", "--no-progress"]) == 0
    out = tmp_path / "curves"
    capsys.readouterr()
    assert main(["curve", str(tmp_path / "scan"), "--search", str(tmp_path / "greedy"),
                 "--fractions", "0.1", "0.5", "1", "--out", str(out), "--backend", "inprocess",
                 "--no-progress"]) == 0
    printed = capsys.readouterr().out
    rankings = ["greedy", "scan-eap", "scan-eap-ig-2", "scan-exact"]
    con = open_sweeps(out)
    rows = con.sql("SELECT * FROM curve_scores ORDER BY ranking").to_arrow_table().to_pylist()
    assert [r["ranking"] for r in rows] == rankings and all(r["cpr"] is not None for r in rows)
    # the command's headline: CPR and CMD per ranking, each with its interval, on its own line
    for r in rows:
        line = next(ln for ln in printed.splitlines() if ln.startswith(r["ranking"] + " "))
        assert _interval(r, "cpr") in line and _interval(r, "cmd") in line
    assert "proportion_explained" not in printed  # no list of curve points instead
    from pipeline.report import write_report

    _, page = write_report(out)
    text = page.read_text()
    assert "Rank agreement" in text
    # the view answers as the report does: every two of the four rankings, on the same edges
    view = con.sql("SELECT method_a, method_b, n_edges, spearman, spearman_abs "
                   "FROM ranking_agreement ORDER BY ALL").fetchall()
    assert len(view) == 6
    for a, b, n, rho, rho_abs in view:
        assert (f"<td>{a}</td><td>{b}</td><td>{n}</td><td>{rho:.4g}</td><td>{rho_abs:.4g}</td>"
                in text)
        assert f"{a} ~ {b}" in printed
    for a, b in [("scan-eap", "scan-exact"), ("greedy", "scan-eap-ig-2")]:
        assert f"<td>{a}</td><td>{b}</td>" in text
