"""Circuit discovery through the pipeline: attribution scores as work items (rows, views,
resume) and the exact greedy search (its rule on the engine's numbers, windows, kill and
resume, Ray)."""

from __future__ import annotations

import json
import subprocess
import textwrap
from pathlib import Path

import numpy as np
import pytest

from pathpatch.data.tasks import make_dataset
from pathpatch.discovery.attribution import edge_attributions
from pathpatch.errors import PathPatchError
from pathpatch.language.circuits import circuit_hypothesis, edge_of, pathpatch_name
from pathpatch.model.graph import Graph
from pathpatch.model.loading import load_model
from pipeline.cli import main
from pipeline.query import open_sweeps
from pipeline.search import run_search
from pipeline.spec import load_spec, parse_spec
from pipeline.sweep import run_sweep
from tests.pipeline.conftest import PATHPATCH, ROOT, env, sigkill_driver_after

INDUCTION_KEYS = {f"a0.3->a1.{h}.k" for h in range(4)}
"""The bundled model's previous-token head feeding the induction heads' keys."""


def _spec(folder: Path, body: str, *, name: str = "d", n: int = 32, metric: str = "kl",
          shard_size: int = 16) -> Path:
    path = folder / f"{name}.toml"
    path.write_text(textwrap.dedent(f"""\
        name = "{name}"
        model = "attn-only-2l"
        metric = "{metric}"
        shard_size = {shard_size}
        seed = 5

        [dataset]
        kind = "induction"
        n = {n}

        [resources]
        workers = 2
        threads_per_worker = 1
        """) + textwrap.dedent(body))
    return path


ATTRIBUTIONS = """
[[attributions]]
method = "eap"

[[attributions]]
method = "eap-ig"
steps = 3

[[hypotheses]]
family = "edge_removal"
"""


def test_attribution_methods_are_work_items_with_a_row_per_example_and_edge(tmp_path):
    spec = load_spec(_spec(tmp_path, ATTRIBUTIONS, metric="logit_diff"))
    out = tmp_path / "out"
    first = run_sweep(spec, out, backend="inprocess", progress=False)
    model = load_model("attn-only-2l")
    graph = Graph.from_model(model)
    n_edges = len(graph.edges)
    # 2 shards x (edge removals in groups of 8, then one item per method)
    assert first.evaluations == 2 * (-(-n_edges // 8) + 2)
    con = open_sweeps(out)
    counts = dict(con.sql("SELECT method, count(*) FROM attributions GROUP BY method").fetchall())
    assert counts == {"eap": 32 * n_edges, "eap-ig-3": 32 * n_edges}
    # the view's means are pathpatch's scores over the whole dataset, computed here directly
    data = make_dataset("induction", n=32, seed=5)
    for method, steps in (("eap", 0), ("eap-ig-3", 3)):
        edges, scores = edge_attributions(model, data, "logit_diff", steps=steps)
        want = dict(zip(map(str, edges), scores.mean(dim=0).tolist(), strict=True))
        got = dict(con.sql("SELECT edge, score FROM edge_scores WHERE method = ?",
                           params=[method]).fetchall())
        assert got.keys() == want.keys()
        np.testing.assert_allclose([got[e] for e in want], list(want.values()), rtol=1e-12,
                                   atol=1e-12)
    # importance: a logit difference that falls when the edge is corrupted is an important edge
    top = con.sql("SELECT method, edge, score, importance, rank FROM edge_scores "
                  "WHERE rank = 1 ORDER BY method").fetchall()
    assert [m for m, *_ in top] == ["eap", "eap-ig-3", "exact"]
    assert all(score < 0 < importance for _, _, score, importance, _ in top)
    agreement = con.sql("SELECT method_a, method_b, n_edges, spearman, spearman_abs "
                        "FROM ranking_agreement ORDER BY ALL").fetchall()
    assert [(a, b, n) for a, b, n, *_ in agreement] == [
        ("eap", "eap-ig-3", n_edges), ("eap", "exact", n_edges), ("eap-ig-3", "exact", n_edges)]
    assert all(0 < s <= 1 and 0 < s_abs <= 1 for *_, s, s_abs in agreement)
    assert not any(p for (p,) in con.sql("SELECT DISTINCT partial FROM edge_scores").fetchall())
    again = run_sweep(spec, out, backend="inprocess", progress=False)
    assert (again.evaluations, again.reused) == (0, first.evaluations)


def test_attribution_and_search_spec_errors_name_the_key(tmp_path):
    base = 'name = "x"\nmodel = "attn-only-2l"\n[dataset]\nkind = "induction"\nn = 4\n'
    bad = {
        '[[attributions]]\nmethod = "eap"\nsteps = 2\n': "attributions\\[0\\]: .*eap takes no",
        '[[attributions]]\nmethod = "ig"\n': "allowed are eap, eap-ig",
        '[[attributions]]\nmethod = "eap-ig"\nsteps = 2\npoints = "mid"\n':
            "attributions\\[0\\]: .*points = 'mid': allowed are left, right",
        '[[attributions]]\nmethod = "eap"\npoints = "left"\n': "eap takes no points",
        '[[attributions]]\nmethod = "eap"\nstep = 2\n': "unknown key 'attributions\\[0\\].step'",
        '[[attributions]]\nmethod = "eap"\n[[attributions]]\nmethod = "eap"\n': "distinct name",
        "[search]\nwindow = 2\n": "needs tau",
        "[search]\ntau = -0.5\n": "search.tau = -0.5",
        "[search]\ntau = 0.1\nwindow = 0\n": "search.window",
        '[search]\ntau = 0.1\n[[hypotheses]]\nfamily = "edge_removal"\n': "remove the",
    }
    for body, message in bad.items():
        with pytest.raises(PathPatchError, match=message):
            parse_spec(base + body)
    with pytest.raises(PathPatchError, match="attributions\\[0\\] \\(eap\\).*gradient there is 0"):
        run_sweep(parse_spec(base + '[[attributions]]\nmethod = "eap"\n'), tmp_path / "o",
                  backend="inprocess", progress=False)
    assert not (tmp_path / "o").exists()  # refused before anything was written


SEARCH = """
[search]
tau = 0.02
window = {window}
"""


def _circuit(folder: Path) -> set[str]:
    edges = json.loads((folder / "circuit.json").read_text())["edges"]
    return {pathpatch_name(name) for name, e in edges.items() if e["in_graph"]}


def test_search_follows_acdc_s_rule_on_exact_evaluations_and_finds_the_induction_circuit(
        tmp_path):
    spec = load_spec(_spec(tmp_path, SEARCH.format(window=8)))
    out = tmp_path / "out"
    outcome = run_search(spec, out, backend="inprocess", progress=False)
    model = load_model("attn-only-2l")
    graph = Graph.from_model(model)
    con = open_sweeps(out)
    steps = con.sql("SELECT index, edge, before, after, removed, evaluated, circuit_edges "
                    "FROM search_steps ORDER BY index").fetchall()
    assert [s[0] for s in steps] == list(range(len(graph.edges)))
    circuit = {str(e) for e in graph.edges}
    for _, edge, before, after, removed, evaluated, size in steps:
        if evaluated:
            assert removed == (after - before < 0.02)
        if removed:
            circuit.discard(edge)
        assert size == len(circuit)
    found = _circuit(out)
    assert found == circuit and len(found) == outcome.circuit
    assert 0 < len(found) < len(graph.edges) // 2
    assert INDUCTION_KEYS & found  # the previous-token head feeds an induction head's key
    # the search's last distance is the engine's evaluation of the found circuit, run apart
    final = circuit_hypothesis(graph, "found", [edge_of(graph, e) for e in sorted(found)])
    check = tmp_path / "check.toml"
    check.write_text(_spec(tmp_path, "").read_text().replace('name = "d"', 'name = "check"')
                     + f'\n[[hypotheses]]\nname = "found"\npattern = "{final.pattern}"\n')
    run_sweep(load_spec(check), tmp_path / "check", backend="inprocess", progress=False)
    ((aue,),) = open_sweeps(tmp_path / "check").sql("SELECT aue FROM scores").fetchall()
    last = [s for s in steps if s[5]][-1]
    assert aue == pytest.approx(last[3] if last[4] else last[2], rel=1e-9, abs=1e-12)
    # circuit.csv ranks the circuit's edges first: a ranking for circuit_curve
    lines = (out / "circuit.csv").read_text().splitlines()[1:]
    ranked = sorted(lines, key=lambda line: -float(line.split(",")[1]))
    assert {line.split(",")[0] for line in ranked[:len(found)]} == found


@pytest.mark.slow
def test_attribution_items_on_ray_actors_equal_the_in_process_rows(tmp_path, ray_local):
    spec = load_spec(_spec(tmp_path, ATTRIBUTIONS.split("[[hypotheses]]")[0],
                           metric="logit_diff"))
    run_sweep(spec, tmp_path / "inprocess", backend="inprocess", progress=False)
    outcome = run_sweep(spec, tmp_path / "ray", backend="ray", address=ray_local,
                        progress=False)
    assert outcome.evaluations == 4 and outcome.failed == 0  # 2 methods x 2 shards
    query = "SELECT method, example, edge, score FROM attributions ORDER BY ALL"
    assert (open_sweeps(tmp_path / "ray").sql(query).fetchall()
            == open_sweeps(tmp_path / "inprocess").sql(query).fetchall())


@pytest.mark.slow
def test_search_window_never_changes_the_circuit_and_ray_equals_in_process(tmp_path,
                                                                          ray_local):
    one = run_search(load_spec(_spec(tmp_path, SEARCH.format(window=1), name="one")),
                     tmp_path / "one", backend="inprocess", progress=False)
    many = run_search(load_spec(_spec(tmp_path, SEARCH.format(window=6), name="many")),
                      tmp_path / "many", backend="ray", address=ray_local, progress=False)
    assert _circuit(tmp_path / "one") == _circuit(tmp_path / "many")
    assert many.rounds < one.rounds  # stacked
    steps = [open_sweeps(tmp_path / f).sql("SELECT edge, before, after, removed FROM "
                                           "search_steps ORDER BY index").fetchall()
             for f in ("one", "many")]
    assert steps[0] == steps[1]  # bitwise: Ray actors compute what this process does
    # the search's rounds ran on the Ray cluster's one node, the reference in this process
    import ray

    assert many.nodes == {n["NodeID"] for n in ray.nodes() if n["Alive"]} != {"inprocess"}
    assert one.nodes == {"inprocess"}


@pytest.mark.slow
def test_search_killed_mid_way_resumes_to_the_same_circuit(tmp_path, capsys):
    spec = _spec(tmp_path, SEARCH.format(window=4), shard_size=32)  # one shard: runs cached
    reference = run_search(load_spec(spec), tmp_path / "reference", backend="inprocess",
                           progress=False)
    out = tmp_path / "out"
    items = out / "items"
    sigkill_driver_after(["run", str(spec), "--out", str(out), "--backend", "inprocess",
                          "--no-progress", "--quiet"], items, 8, poll_s=0.01)
    assert not (out / "circuit.json").exists()  # killed mid-way
    written = len(list(items.glob("*.parquet")))
    assert main(["status", str(out)]) == 0
    assert f"{written} work items written; not finished" in capsys.readouterr().out
    resumed = subprocess.run(PATHPATCH + ["run", str(spec), "--out", str(out), "--backend",
                                          "inprocess", "--no-progress"],
                             cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert f"{written} read back" in resumed.stdout
    assert _circuit(out) == _circuit(tmp_path / "reference")
    assert len(_circuit(out)) == reference.circuit
    assert not list(items.glob(".*"))  # no temp files left


def test_a_worker_keeps_each_shard_s_runs_while_they_fit_half_the_budget(tmp_path,
                                                                          monkeypatch):
    """A worker taking turns between shards (a search's rounds on one worker) computes each
    shard's two runs once while the other shards' runs fit half the memory budget; past it,
    the least recently used shard's are dropped and computed again."""
    from dataclasses import replace

    from pathpatch.engine import evaluation as engine
    from pipeline.driver import worker_config
    from pipeline.resolve import resolve
    from pipeline.worker import Evaluate, Worker

    built = []
    real = engine.Runs
    monkeypatch.setattr(engine, "Runs", lambda *a: built.append(1) or real(*a))
    resolved = resolve(load_spec(_spec(tmp_path, SEARCH.format(window=2))))
    graph = Graph.from_model(resolved.model)
    full = circuit_hypothesis(graph, "full", graph.edges)
    a, b = resolved.shards

    def turns(worker: Worker) -> int:
        built.clear()
        for shard in (a, b, a, b):
            worker.run(Evaluate("i", shard.id, (full,)), shard.take(resolved.dataset))
        return len(built)

    config = worker_config(resolved, device="cpu")
    worker = Worker(config, model=resolved.model)
    assert turns(worker) == 2  # once per shard
    logits = 2 * len(a) * resolved.dataset.seq_len * resolved.model.cfg.d_vocab * 4
    assert all(engine.cached_bytes(c) > logits for c in worker._runs.values())  # counted whole
    # runs larger than half the budget (as counted): the other shard's are dropped each turn
    monkeypatch.setattr(engine, "cached_bytes", lambda cache: 2**30 if cache else 0)
    assert turns(Worker(replace(config, memory_budget=2**31 - 1), model=resolved.model)) == 4
