"""A sweep's intervention: x_c-free rows independent of sharding, in every item's identity and
provenance, the default leaving earlier identities unchanged; attributions refused."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pathpatch.errors import PathPatchError
from pipeline.plan import HypothesisInfo, item_identity
from pipeline.query import open_sweeps
from pipeline.spec import load_spec, parse_spec
from pipeline.store import META_KEY
from pipeline.sweep import run_sweep
from tests.pipeline.test_discovery import _spec

HYPOTHESES = """
[[hypotheses]]
name = "keys"
pattern = "in -> a0.* -> a1.*[k] -> out"

[[hypotheses]]
family = "edge_removal"
"""


def _rows(folder):
    return open_sweeps(folder).sql(
        "SELECT hypothesis, example, ue, te FROM results ORDER BY hypothesis, example").fetchall()


def test_a_mean_ablation_sweep_is_independent_of_sharding_and_names_its_intervention(tmp_path):
    body = 'intervention = "mean"\n'
    outs = {}
    for shard_size in (8, 32):
        path = _spec(tmp_path, "", name=f"s{shard_size}", shard_size=shard_size)
        text = path.read_text().replace('seed = 5\n', 'seed = 5\n' + body) + HYPOTHESES
        path.write_text(text)
        spec = load_spec(path)
        assert spec.intervention == "mean"
        outs[shard_size] = tmp_path / f"out{shard_size}"
        run_sweep(spec, outs[shard_size], backend="inprocess", progress=False)
    a, b = _rows(outs[8]), _rows(outs[32])
    assert len(a) == len(b) > 0
    for x, y in zip(a, b, strict=True):
        assert x[:2] == y[:2] and x[2:] == pytest.approx(y[2:], rel=1e-5, abs=1e-7)
    # every result file records the intervention
    files = sorted((outs[8]).rglob("*.parquet"))
    metas = [json.loads(pq.read_schema(f).metadata[META_KEY]) for f in files
             if pq.read_schema(f).metadata and META_KEY in pq.read_schema(f).metadata]
    assert metas and all(m["intervention"] == "mean" for m in metas)
    # and differs from resampling the counterfactual prompts
    plain = _spec(tmp_path, HYPOTHESES, name="plain", shard_size=8)
    run_sweep(load_spec(plain), tmp_path / "plain", backend="inprocess", progress=False)
    ids = {i for (i,) in open_sweeps(outs[8]).sql("SELECT item FROM items").fetchall()}
    plain_ids = {i for (i,) in open_sweeps(tmp_path / "plain").sql("SELECT item FROM items").fetchall()}
    assert ids and not ids & plain_ids


def test_the_default_intervention_keeps_item_identities():
    h = (HypothesisInfo(name="x", canonical="all"),)
    base = dict(model_digest="m", shard_digest="s", hypotheses=h, metric="kl", dtype="float32")
    assert item_identity(**base) == item_identity(**base, intervention="resample")
    assert item_identity(**base) != item_identity(**base, intervention="zero", ablation="d")
    assert (item_identity(**base, intervention="mean", ablation="d1")
            != item_identity(**base, intervention="mean", ablation="d2"))


def test_bad_interventions_and_ablated_eap_ig_are_refused_by_name(tmp_path):
    base = _spec(tmp_path, "").read_text()
    with pytest.raises(PathPatchError, match="unknown intervention 'median'"):
        parse_spec(base.replace("seed = 5\n", 'seed = 5\nintervention = "median"\n')
                   + HYPOTHESES)
    spec = parse_spec(base.replace("seed = 5\n", 'seed = 5\nintervention = "zero"\n')
                      + '[[attributions]]\nmethod = "eap-ig"\nsteps = 2\n')
    with pytest.raises(PathPatchError, match=r"attributions\[0\] \(eap-ig-2\): .*EAP-IG "
                                             "interpolates.*'zero' has no x_c.*method 'eap'"):
        run_sweep(spec, tmp_path / "o", backend="inprocess", progress=False)
    assert not (tmp_path / "o").exists()  # refused before a folder is written


def test_eap_under_mean_ablation_is_the_method_s_rows_with_the_sweep_s_means(tmp_path):
    """A sweep's EAP under mean ablation: per (example, edge) exactly `edge_attributions` with
    the whole dataset's means (not the shard's), and other scores than under resample."""
    from pathpatch.data.tasks import make_dataset
    from pathpatch.discovery.attribution import edge_attributions
    from pathpatch.engine.ablation import ablation_values
    from pathpatch.model.loading import load_model

    path = _spec(tmp_path, '[[attributions]]\nmethod = "eap"\n', n=16, shard_size=8,
                 metric="logit_diff")
    path.write_text(path.read_text().replace("seed = 5\n", 'seed = 5\nintervention = "mean"\n'))
    run_sweep(load_spec(path), tmp_path / "out", backend="inprocess", progress=False)
    got = open_sweeps(tmp_path / "out").sql(
        "SELECT example, edge, score FROM attributions ORDER BY example, edge").fetchall()
    model = load_model("attn-only-2l")
    data = make_dataset("induction", n=16, seed=5)
    edges, want = edge_attributions(model, data, "logit_diff",
                                    ablation=ablation_values(model, data.reference, "mean"))
    by_edge = {str(e): i for i, e in enumerate(edges)}
    assert len(got) == 16 * len(edges)
    for example, edge, score in got:
        assert score == pytest.approx(float(want[example, by_edge[edge]]), rel=1e-5, abs=1e-6)
    assert max(abs(s) for *_, s in got) > 1e-3
    _, resampled = edge_attributions(model, data, "logit_diff")
    assert float((resampled - want).abs().max()) > 1e-3


MEANS_OVER = """
[intervention_dataset]
kind = "induction"
n = 24
seed = 11
"""


def test_means_over_a_named_dataset_are_that_dataset_s_and_recorded(tmp_path):
    """[intervention_dataset]: the means are taken over its reference prompts (rows equal to
    the engine's with those values), the items differ from the means over the sweep's own
    prompts, and provenance names the dataset and the values' digest."""
    from pathpatch.data.tasks import make_dataset
    from pathpatch.engine.ablation import ablation_values
    from pathpatch.engine.evaluation import evaluate
    from pathpatch.language.hypothesis_families import load_hypotheses
    from pathpatch.model.graph import Graph
    from pathpatch.model.loading import load_model

    own = _spec(tmp_path, HYPOTHESES, name="own", n=16)
    own.write_text(own.read_text().replace("seed = 5\n", 'seed = 5\nintervention = "mean"\n'))
    named = tmp_path / "named.toml"
    named.write_text(own.read_text().replace('name = "own"', 'name = "named"') + MEANS_OVER)
    spec = load_spec(named)
    assert spec.intervention_dataset is not None and spec.digest() != load_spec(own).digest()
    run_sweep(spec, tmp_path / "named", backend="inprocess", progress=False)
    run_sweep(load_spec(own), tmp_path / "own", backend="inprocess", progress=False)
    model = load_model("attn-only-2l")
    data = make_dataset("induction", n=16, seed=5)
    means = ablation_values(model, make_dataset("induction", n=24, seed=11).reference, "mean")
    hyps = load_hypotheses(spec.hypothesis_entries(), Graph.from_model(model))
    want = evaluate(model, data, hyps, "kl", intervention=means).to_pydict()
    want = sorted(zip(want["hypothesis"], want["example"], want["ue"], want["te"], strict=True))
    got = _rows(tmp_path / "named")
    assert [g[:2] for g in got] == [w[:2] for w in want]
    for g, w in zip(got, want, strict=True):
        assert g[2:] == pytest.approx(w[2:], rel=1e-5, abs=1e-7)
    assert [r[3] for r in got] != [r[3] for r in _rows(tmp_path / "own")]  # other means, other TE
    items = {f: {i for (i,) in open_sweeps(tmp_path / f).sql("SELECT item FROM items").fetchall()}
             for f in ("named", "own")}
    assert items["named"] and not items["named"] & items["own"]
    meta = next(json.loads(m[META_KEY]) for f in (tmp_path / "named").rglob("*.parquet")
                if META_KEY in (m := pq.read_schema(f).metadata or {}))
    assert meta["intervention_dataset"] == {"kind": "induction", "n": 24, "seed": 11}
    assert meta["ablation_digest"] == means.digest


def test_a_named_means_dataset_is_checked_before_work(tmp_path):
    base = _spec(tmp_path, HYPOTHESES, n=16).read_text()

    def spec(intervention, extra):
        return parse_spec(base.replace("seed = 5\n", f'seed = 5\nintervention = "{intervention}"\n')
                          + extra, base_dir=tmp_path)

    with pytest.raises(PathPatchError, match="intervention = 'zero' takes no mean"):
        spec("zero", MEANS_OVER)
    with pytest.raises(PathPatchError, match="intervention_dataset.path = 'none.jsonl': no such"):
        spec("mean", '[intervention_dataset]\npath = "none.jsonl"\n')
    with pytest.raises(PathPatchError, match="unknown key.*intervention_dataset.colour"):
        spec("mean", '[intervention_dataset]\npath = "."\ncolour = "red"\n')
    longer = spec("mean_positional", MEANS_OVER + "seq_len = 12\n")
    with pytest.raises(PathPatchError, match="intervention_dataset has 12 positions and the "
                                             "dataset .*position-wise mean needs one length"):
        run_sweep(longer, tmp_path / "o", backend="inprocess", progress=False)
    bad = spec("mean", MEANS_OVER.replace("kind = \"induction\"", "kind = \"nope\""))
    with pytest.raises(PathPatchError, match="intervention_dataset \\(the prompts the means"):
        run_sweep(bad, tmp_path / "o", backend="inprocess", progress=False)
    assert not (tmp_path / "o").exists()
def test_a_default_spec_hashes_as_before(tmp_path):
    text = _spec(tmp_path, HYPOTHESES).read_text()
    spec = parse_spec(text)
    assert spec.intervention == "resample"
    named = parse_spec(text.replace("seed = 5\n", 'seed = 5\nintervention = "resample"\n'))
    zero = parse_spec(text.replace("seed = 5\n", 'seed = 5\nintervention = "zero"\n'))
    assert named.digest() == spec.digest() != zero.digest()


def test_a_search_under_zero_ablation_ends_at_the_found_circuit_s_exact_value(tmp_path):
    from pathpatch.language.circuits import circuit_hypothesis, edge_of
    from pathpatch.model.graph import Graph
    from pathpatch.model.loading import load_model
    from pipeline.search import run_search
    from tests.pipeline.test_discovery import SEARCH, _circuit

    def spec_text(name, body):
        text = _spec(tmp_path, body, name=name, n=16).read_text()
        return text.replace("seed = 5\n", 'seed = 5\nintervention = "zero"\n')

    path = tmp_path / "search.toml"
    path.write_text(spec_text("search", SEARCH.format(window=8)))
    run_search(load_spec(path), tmp_path / "out", backend="inprocess", progress=False)
    steps = open_sweeps(tmp_path / "out").sql(
        "SELECT before, after, removed, evaluated FROM search_steps ORDER BY index").fetchall()
    found = _circuit(tmp_path / "out")
    graph = Graph.from_model(load_model("attn-only-2l"))
    final = circuit_hypothesis(graph, "found", [edge_of(graph, e) for e in sorted(found)])
    check = tmp_path / "check.toml"
    check.write_text(spec_text("check", "")
                     + f'\n[[hypotheses]]\nname = "found"\npattern = "{final.pattern}"\n')
    run_sweep(load_spec(check), tmp_path / "check", backend="inprocess", progress=False)
    ((aue,),) = open_sweeps(tmp_path / "check").sql("SELECT aue FROM scores").fetchall()
    last = [s for s in steps if s[3]][-1]
    assert aue == pytest.approx(last[1] if last[2] else last[0], rel=1e-9, abs=1e-12)


@pytest.mark.slow
def test_a_mean_ablation_sweep_on_ray_actors_equals_the_in_process_rows(tmp_path, ray_local):
    path = _spec(tmp_path, HYPOTHESES, shard_size=8)
    path.write_text(path.read_text().replace("seed = 5\n", 'seed = 5\nintervention = "mean"\n'))
    spec = load_spec(path)
    run_sweep(spec, tmp_path / "inprocess", backend="inprocess", progress=False)
    outcome = run_sweep(spec, tmp_path / "ray", backend="ray", address=ray_local, progress=False)
    assert outcome.failed == 0
    assert _rows(tmp_path / "ray") == _rows(tmp_path / "inprocess")


def test_a_folder_refuses_another_intervention_unless_forced(tmp_path):
    """The intervention is part of what a folder's rows stand for, like the metric: rerunning a
    resample sweep's folder with mean ablation is refused (its rows kept), and --force sets them
    aside."""
    path = _spec(tmp_path, HYPOTHESES, name="same")
    out = tmp_path / "out"
    run_sweep(load_spec(path), out, backend="inprocess", progress=False)
    mean = path.read_text().replace("seed = 5\n", 'seed = 5\nintervention = "mean"\n')
    with pytest.raises(PathPatchError, match="intervention None -> 'mean'"):
        run_sweep(parse_spec(mean), out, backend="inprocess", progress=False)
    assert (out / "items").is_dir() and any((out / "items").glob("*.parquet"))
    run_sweep(parse_spec(mean), out, backend="inprocess", progress=False, force=True)
    assert json.loads((out / "manifest.json").read_text())["intervention"] == "mean"


def test_the_ready_specs_hash_as_they_did_before_interventions_and_text_keys():
    """spec hashes of jobs/default.toml and jobs/induction_refinement.toml as written by the
    code before either key existed (commit 4253576)."""
    jobs = Path(__file__).resolve().parents[2] / "jobs"
    assert load_spec(jobs / "default.toml").digest() == \
        "74ef608413a6024cc8c116999621dd9dfdb952c3fc513faef73cb20555173f1b"
    assert load_spec(jobs / "induction_refinement.toml").digest()[:16] == "ccddb081549f41b6"
