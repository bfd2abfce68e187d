"""`pathpatch report`, `graph`, `explain`: files a person can open, text a person can read."""

import re
import struct

import pytest

from pipeline.cli import main
from tests.pipeline.layout import check_layout

SPEC = """
name = "tiny_scan"
model = "attn-only-2l"
metric = "kl"
shard_size = 32
group_size = 40
[dataset]
kind = "induction"
n = 32
[[hypotheses]]
name = "initial"
pattern = "in -> a1.*[v] -> out | in -> a1.*[q] -> out | in -> a0.3 -> a1.*[k] -> out"
[[hypotheses]]
family = "node_removal"
[[hypotheses]]
family = "edge_removal"
"""


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    spec = root / "tiny.toml"
    spec.write_text(SPEC)
    out = root / "sweep"
    assert main(["run", str(spec), "--out", str(out), "--backend", "inprocess", "--quiet",
                 "--no-progress"]) == 0
    return out


def test_report_writes_a_png_and_a_page(sweep, capsys):
    assert main(["report", str(sweep)]) == 0
    assert "report.html" in capsys.readouterr().out
    png = (sweep / "report.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", png[16:24])
    assert width > 1500 and height > 400  # three panels: intervals, heatmap, edge graph
    page = (sweep / "report.html").read_text()
    assert '<img src="report.png"' in page
    names = re.findall(r"<tr><td>([^<]+)</td>", page)
    assert "initial" in names and "remove a0.3" in names and "remove a0.3-&gt;a1.0.k" in names
    assert len(names) == 1 + 8 + 81  # every hypothesis of the sweep, once


def test_report_panels_follow_the_families(sweep):
    from pipeline.figures import node_matrix
    from pipeline.query import open_sweeps

    rows = open_sweeps(sweep).sql("SELECT * FROM scores JOIN hypotheses USING (sweep, hypothesis)"
                                  ).arrow().read_all()
    matrix, has_mlp = node_matrix(rows)
    assert len(matrix) == 2 and len(matrix[0]) == 4 and not has_mlp
    # removing the previous-token head a0.3 loses most of the effect: the hottest cell
    assert max(v for row in matrix for v in row) == matrix[0][3] > 0.9


def test_report_on_an_empty_or_missing_folder_is_a_clear_error(tmp_path, capsys):
    assert main(["report", str(tmp_path / "nope")]) == 2
    assert "error:" in capsys.readouterr().err


def test_graph_and_explain_commands(capsys):
    assert main(["graph", "attn-only-2l"]) == 0
    out = capsys.readouterr().out
    assert "layer 1: a1.0 a1.1 a1.2 a1.3" in out and "edges: 81" in out
    assert "paths (positions ignored): 169" in out and "architecture: norm LN" in out
    assert main(["explain", "attn-only-2l", "in -> a1.0[v] -> out", "--seq-len", "3"]) == 0
    out = capsys.readouterr().out
    assert "paths in P: 6 of" in out and "mixed copies: 2" in out
    assert main(["explain", "attn-only-2l", "a1.0[x]"]) == 2
    assert "unknown channel 'x'" in capsys.readouterr().err
    assert main(["explain", "mlp-2l", "in -> m0 -> out"]) == 0  # 8 paths: 3 samples, all different
    samples = capsys.readouterr().out.split("sample paths:\n", 1)[1].split()
    paths = [" ".join(samples[i:i + 5]) for i in range(0, len(samples), 5)]
    assert len(paths) == 3 == len(set(paths)) and all(p.startswith("in@") for p in paths)


def test_edges_by_layer_shows_each_layer_pairs_largest_edge_effect():
    import matplotlib.pyplot as plt

    from pathpatch.model.names import edge_parts
    from pipeline.figures import edge_layers_axes

    def row(target: str, pe: float | None) -> dict:  # a scores row with its facts
        if "->" not in target:
            return {"hypothesis": f"x {target}", "proportion_explained": pe, "kind": "remove_node",
                    "target": target, "layer": 0, "head": 1}
        sender, receiver, channel = edge_parts(target)
        return {"hypothesis": f"x {target}", "proportion_explained": pe, "kind": "remove_edge",
                "target": target, "sender": sender, "receiver": receiver, "channel": channel}

    scores = [row(t, pe) for t, pe in [
        ("in->a0.1.q", 0.9), ("in->a0.2.v", 0.4), ("a0.1->a1.0.k", 0.7),
        ("a0.1->out", 0.95), ("m0->out", None), ("a0.1", 0.0)]]
    fig, ax = plt.subplots()
    assert edge_layers_axes(ax, scores)
    grid = ax.images[0].get_array()
    # rows: in, 0; columns: 0, 1, out. Cells: the largest AUE/ATE = 1 - PE of their edges
    assert grid[0, 0] == pytest.approx(0.6) and grid[1, 1] == pytest.approx(0.3)
    assert grid[1, 2] == pytest.approx(0.05)  # m0->out has no defined score: not counted
    assert [t.get_text() for t in ax.get_xticklabels()] == ["0", "1", "out"]
    assert not edge_layers_axes(plt.subplots()[1], scores[-1:])  # node removals only: no panel
    plt.close("all")


def _spy_figure(monkeypatch) -> dict:
    from pipeline import report

    seen = {}
    real = report.report_figure

    def spy(scores, **kwargs):
        seen["fig"] = real(scores, **kwargs)
        seen.update(kwargs)
        return seen["fig"]

    monkeypatch.setattr(report, "report_figure", spy)
    return seen


def test_every_hypothesis_is_visible_and_nothing_is_clipped(sweep, monkeypatch):
    from pipeline.figures import SHOWN, least_explained
    from pipeline.query import open_sweeps
    from pipeline.report import write_report

    seen = _spy_figure(monkeypatch)
    write_report(sweep)
    fig = seen["fig"]
    check_layout(fig)
    listed = least_explained(open_sweeps(sweep).sql("SELECT * FROM scores").to_arrow_table())
    assert len(listed) == SHOWN
    intervals, spread = (ax for ax in fig.findobj(lambda a: hasattr(a, "get_yticklabels"))
                         if ax.get_title().startswith(("the 40", "spread")))
    names = [t.get_text() for t in intervals.get_yticklabels()]
    assert names == [f"{r['hypothesis']} (n={r['n']})" for r in listed]
    # the spread panel: a row per listed hypothesis, on the same y, saying how many pairs it shows
    counts = [t.get_text() for t in spread.get_yticklabels()]
    assert len(counts) == len(names) and all(c.endswith(" pairs") for c in counts)
    assert list(spread.get_yticks()) == list(intervals.get_yticks())
    assert spread.get_ylim() == intervals.get_ylim()


def test_pair_counts_are_explained_where_they_appear():
    from pipeline.figures import pair_count
    from pipeline.report import pair_counts_note

    rows = [{"hypothesis": "a", "n": 512}, {"hypothesis": "b", "n": 512}]
    per_example = {"a": [0.5] * 510, "b": [0.1] * 510}
    assert pair_count(rows[0], per_example) == "510 of 512 pairs"
    note = pair_counts_note(rows, per_example)
    assert "n: the pairs scored" in note and "|TE| < 1e-06" in note and "2 of 512" in note
    assert pair_count({"hypothesis": "a", "n": 510}, per_example) == "510 pairs"
    assert "shows every pair" in pair_counts_note([{"hypothesis": "a", "n": 510}], per_example)


def test_the_page_explains_the_pair_counts_of_its_sweep(sweep):
    from pipeline.report import write_report

    text = write_report(sweep)[1].read_text()
    assert "n: the pairs scored" in text
