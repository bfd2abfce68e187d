"""Every SQL example in docs/PIPELINE.md runs, on real sweep folders, and returns rows."""

import re
from pathlib import Path

import pytest

from pipeline.cli import main
from pipeline.query import open_sweeps

DOC = Path(__file__).resolve().parents[2] / "docs" / "PIPELINE.md"
SPEC = """
model = "attn-only-2l"
metric = "{metric}"
shard_size = 16
group_size = 12
[dataset]
kind = "induction"
n = 32
[[hypotheses]]
family = "induction_initial"
prev_heads = ["a0.3"]
induction_heads = ["a1.*"]
[[hypotheses]]
family = "node_removal"
"""


def _examples() -> list[str]:
    text = DOC.read_text()
    block = text.split("Examples:", 1)[1].split("```sql", 1)[1].split("```", 1)[0]
    body = "\n".join(line for line in block.splitlines() if not line.strip().startswith("--"))
    return [s.strip() for s in body.split(";") if s.strip()]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("docs")
    out = []
    for metric in ("kl", "loss"):
        spec = root / f"{metric}.toml"
        spec.write_text(SPEC.format(metric=metric))
        folder = root / metric
        assert main(["run", str(spec), "--out", str(folder), "--backend", "inprocess", "--quiet",
                     "--no-progress"]) == 0
        out.append(folder)
    return out


def test_the_documented_queries_run(folders):
    examples = _examples()
    assert len(examples) >= 8
    con = open_sweeps(*folders)
    for query in examples:
        rows = con.sql(query).fetchall()
        if "status = 'failed'" not in query:
            assert rows, query
    one = open_sweeps(folders[0])
    heads = one.sql(next(q for q in examples if q.startswith("SELECT layer, head"))).fetchall()
    assert [(r[0], r[1]) for r in heads] == [(l, h) for l in range(2) for h in range(4)]
    top = con.sql(examples[0]).fetchall()
    assert len(top) == 10 and top[0][2] >= top[-1][2]  # best first
    side = con.sql(examples[-1]).fetchall()
    assert len(side) == 4 + 8
    assert all(re.match(r"^(remove|direct|initial|previous)", r[0]) for r in side)


def test_the_documented_discovery_queries_run(tmp_path):
    """Every SQL example of the discovery section, on a scan with attributions and a search."""
    text = DOC.read_text().split("## Discovery", 1)[1]
    block = text.split("```sql", 1)[1].split("```", 1)[0]
    body = "\n".join(line for line in block.splitlines() if not line.strip().startswith("--"))
    examples = [s.strip() for s in body.split(";") if s.strip()]
    assert len(examples) >= 5
    head = ('model = "attn-only-2l"\nmetric = "{metric}"\ngroup_size = 27\n'
            '[dataset]\nkind = "induction"\nn = 16\n')
    (tmp_path / "scan.toml").write_text(
        head.format(metric="logit_diff") + '[[hypotheses]]\nfamily = "edge_removal"\n'
        '[[attributions]]\nmethod = "eap"\n')
    (tmp_path / "search.toml").write_text(head.format(metric="kl") + "[search]\ntau = 0.05\n")
    for name in ("scan", "search"):
        assert main(["run", str(tmp_path / f"{name}.toml"), "--out", str(tmp_path / name),
                     "--backend", "inprocess", "--quiet", "--no-progress"]) == 0
    con = open_sweeps(tmp_path / "scan", tmp_path / "search")
    for query in examples:
        assert con.sql(query).fetchall(), query
