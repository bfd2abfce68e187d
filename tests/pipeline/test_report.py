"""`pathpatch report`, `graph`, `explain`: files a person can open, text a person can read."""

import re
import struct

import pytest

from pipeline.cli import main

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
