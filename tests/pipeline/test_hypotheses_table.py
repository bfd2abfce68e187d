"""The `hypotheses` table: each hypothesis's facts recorded when the sweep is planned, the views
joined on them, names read by nothing, and folders written before the table existed."""

import math
import random
import shutil

import pytest

from pathpatch.errors import PathPatchError
from pathpatch.language.circuits import Ranking, prune
from pathpatch.model.graph import Graph
from pathpatch.model.loading import load_model
from pipeline.cli import main
from pipeline.query import open_sweeps, run_query
from pipeline.store import HYPOTHESES_SCHEMA, SweepFolder

SPEC = """
model = "attn-only-2l"
metric = "logit_diff"
shard_size = 8
group_size = 100
[dataset]
kind = "induction"
n = 8
[[hypotheses]]
name = "mine"
pattern = "in -> a1.0[v] -> out"
[[hypotheses]]
name = "curve fake signed k=0.5 n=1 pruned=1"
pattern = "in -> a1.1[v] -> out"
[[hypotheses]]
name = "remove in->a1.0"
pattern = "in -> a1.2[q] -> out"
[[hypotheses]]
family = "node_removal"
[[hypotheses]]
family = "edge_removal"
[[hypotheses]]
family = "circuit_curve"
ranking = "scores.csv"
fractions = [0.1, 1.0]
[[attributions]]
method = "eap"
"""


@pytest.fixture(scope="module")
def graph():
    return Graph.from_model(load_model("attn-only-2l"))


@pytest.fixture(scope="module")
def sweep(tmp_path_factory, graph):
    root = tmp_path_factory.mktemp("facts")
    rng = random.Random(1)
    (root / "scores.csv").write_text("edge,score\n" + "".join(
        f"{e},{rng.gauss(0, 1)!r}\n" for e in graph.edges))
    (root / "facts.toml").write_text(SPEC)
    folder = root / "facts"
    assert main(["run", str(root / "facts.toml"), "--out", str(folder), "--backend", "inprocess",
                 "--quiet", "--no-progress"]) == 0
    return folder


def _facts(folder) -> dict[str, dict]:
    rows = open_sweeps(folder).sql("SELECT * EXCLUDE (sweep) FROM hypotheses").to_arrow_table().to_pylist()
    return {r.pop("hypothesis"): r for r in rows}


def test_the_table_holds_one_row_per_hypothesis_in_plan_order(sweep):
    table = open_sweeps(sweep).sql("SELECT * EXCLUDE (sweep) FROM hypotheses").to_arrow_table()
    assert table.schema == HYPOTHESES_SCHEMA
    manifest = SweepFolder(sweep).read_manifest()
    evaluated = [h["name"] for h in manifest["hypotheses"] if h["kind"] == "evaluation"]
    assert table.column("hypothesis").to_pylist() == evaluated  # the attribution is not a row
    assert len(evaluated) == 3 + 8 + 81 + 2 * 2 + 2
    assert all("facts" not in h for h in manifest["hypotheses"])  # the manifest stays as it was


def test_free_form_hypotheses_know_nothing_whatever_their_names(sweep):
    facts = _facts(sweep)
    for name in ("mine", "curve fake signed k=0.5 n=1 pruned=1", "remove in->a1.0"):
        assert set(facts[name].values()) == {None}, name


def test_node_and_edge_removals_record_their_target_and_its_parts(sweep):
    facts = _facts(sweep)
    nulls = dict.fromkeys(["ranking", "ordering", "k", "n_edges", "n_pruned", "edges"])
    assert facts["remove a0.3"] == {
        "family": "node_removal", "kind": "remove_node", "target": "a0.3", "sender": None,
        "receiver": None, "channel": None, "layer": 0, "head": 3, **nulls}
    assert facts["remove a0.3->a1.0.k"] == {
        "family": "edge_removal", "kind": "remove_edge", "target": "a0.3->a1.0.k",
        "sender": "a0.3", "receiver": "a1.0", "channel": "k", "layer": None, "head": None,
        **nulls}
    assert facts["remove in->out"]["channel"] == "resid"
    removals = {n: f for n, f in facts.items() if f["kind"] == "remove_edge"}
    assert len(removals) == 81 and all(f["family"] == "edge_removal" for f in removals.values())


def test_a_curve_member_records_its_ranking_order_k_counts_and_edges(sweep, graph):
    facts = _facts(sweep)
    ranking = Ranking.load(graph, sweep.parent / "scores.csv")
    total = len(graph.edges)
    members = {n: f for n, f in facts.items() if f["family"] == "circuit_curve"}
    assert len(members) == 6
    for ordering in ("signed", "absolute"):
        for k in (0.1, 1.0):
            (f,) = [f for f in members.values() if f["ordering"] == ordering and f["k"] == k]
            n = math.floor(k * total)
            kept = prune(graph, ranking.top(n, absolute=ordering == "absolute"))
            assert f["ranking"] == "scores" and f["kind"] == "circuit"
            assert (f["n_edges"], f["n_pruned"]) == (n, len(kept))
            assert f["edges"] == [str(e) for e in kept]  # in the graph's order
            assert f["target"] is None and f["sender"] is None
    ends = {n: f for n, f in members.items() if f["ordering"] is None}
    assert ends["curve scores empty"]["edges"] == [] and ends["curve scores empty"]["k"] is None
    assert ends["curve scores full"]["edges"] == [str(e) for e in graph.edges]
    assert ends["curve scores full"]["n_pruned"] == total


def test_the_views_read_facts_not_names(sweep):
    con = open_sweeps(sweep)
    rankings = con.sql("SELECT DISTINCT ranking FROM faithfulness").fetchall()
    assert rankings == [("scores",)]  # the free-form "curve fake ..." is no curve member
    assert len(con.sql("SELECT * FROM faithfulness").fetchall()) == 4
    exact = con.sql("SELECT edge, score FROM edge_scores WHERE method = 'exact'").fetchall()
    assert len(exact) == 81  # the free-form "remove in->a1.0" is no edge removal
    # an exact score is its removal's mean m - m_clean, joined by the facts' target
    want = dict(con.sql("SELECT h.target, avg(m - m_clean) FROM results JOIN hypotheses h "
                        "USING (sweep, hypothesis) WHERE h.kind = 'remove_edge' "
                        "GROUP BY h.target").fetchall())
    assert dict(exact) == pytest.approx(want, rel=1e-12)


def test_a_folder_without_the_table_keeps_its_scores_and_says_how_to_get_it(
        sweep, tmp_path, capsys):
    old = tmp_path / "old"
    shutil.copytree(sweep, old)
    before = {view: open_sweeps(old).sql(f"SELECT * EXCLUDE (sweep) FROM {view} ORDER BY ALL"
                                         ).fetchall()
              for view in ("scores", "faithfulness", "curve_scores", "edge_scores")}
    (old / "hypotheses.parquet").unlink()  # as a pathpatch before the table wrote it
    con = open_sweeps(old)
    assert con.sql("SELECT * EXCLUDE (sweep) FROM scores ORDER BY ALL").fetchall() == before["scores"]
    for view in ("faithfulness", "curve_scores", "edge_scores", "hypotheses"):
        with pytest.raises(PathPatchError, match=r"no hypotheses\.parquet.*`pathpatch resume "):
            run_query([old], f"SELECT * FROM {view}")
    assert main(["report", str(old)]) == 2
    assert "pathpatch resume" in capsys.readouterr().err
    assert main(["resume", str(old), "--backend", "inprocess", "--no-progress"]) == 0
    assert "0 computed" in capsys.readouterr().out  # the table, rewritten; no item recomputed
    con = open_sweeps(old)
    for view, rows in before.items():
        assert con.sql(f"SELECT * EXCLUDE (sweep) FROM {view} ORDER BY ALL").fetchall() == rows


def test_a_table_of_another_plan_is_refused_not_read(sweep, tmp_path):
    """A run stopped between writing the manifest and the table leaves the old plan's table."""
    import pyarrow.parquet as pq

    from pipeline.store import PLAN_KEY

    stale = tmp_path / "stale"
    shutil.copytree(sweep, stale)
    table = pq.read_table(stale / "hypotheses.parquet")
    pq.write_table(table.replace_schema_metadata({PLAN_KEY: b"another plan"}),
                   stale / "hypotheses.parquet")
    with pytest.raises(PathPatchError, match="describes another plan than its manifest"):
        run_query([stale], "SELECT * FROM faithfulness")
    assert open_sweeps(stale).sql("SELECT count(*) FROM scores").fetchall() == [(98,)]


def test_a_folder_that_plans_no_hypotheses_needs_no_table(tmp_path):
    spec = tmp_path / "eap.toml"
    spec.write_text('model = "attn-only-2l"\nmetric = "logit_diff"\n[dataset]\n'
                    'kind = "induction"\nn = 4\n[[attributions]]\nmethod = "eap"\n')
    folder = tmp_path / "eap"
    assert main(["run", str(spec), "--out", str(folder), "--backend", "inprocess", "--quiet",
                 "--no-progress"]) == 0
    (folder / "hypotheses.parquet").unlink()
    con = open_sweeps(folder)
    assert len(con.sql("SELECT * FROM edge_scores").fetchall()) == 81
    assert con.sql("SELECT * FROM hypotheses").fetchall() == []
