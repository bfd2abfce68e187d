"""The command line answers at once where it can: the commands that read a sweep folder, and
those that read a model's structure (graph, explain, circuit) from a bundled model or a
checkpoint, import neither torch nor Ray; help texts import nothing heavy; a run reports Ray's
start-up apart from the sweep's own time."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pathpatch
from pipeline.cli import TASKS, main
from pipeline.driver import Outcome
from tests.pipeline.conftest import ROOT, env

HEAVY = ("torch", "ray", "transformer_lens", "transformers", "matplotlib", "datasets")


def _modules_after(argv: list[str]) -> list[str]:
    """The heavy packages loaded by running `pathpatch ARGV` in a fresh interpreter."""
    code = textwrap.dedent(f"""\
        import sys
        from pipeline.cli import main
        status = main({argv!r})
        print(sorted({{m.split('.')[0] for m in sys.modules}} & {set(HEAVY)!r}))
        sys.exit(status)
    """)
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env(), capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return eval(out.stdout.strip().splitlines()[-1])


def test_sql_and_status_import_neither_torch_nor_ray(tmp_path):
    folder = tmp_path / "sweep"
    spec = ROOT / "jobs" / "default.toml"
    assert main(["run", str(spec), "--out", str(folder), "--backend", "inprocess",
                 "--no-progress", "--quiet"]) == 0
    assert _modules_after(["sql", str(folder), "SELECT count(*) FROM scores"]) == []
    assert _modules_after(["status", str(folder)]) == []


def test_graph_explain_and_circuit_read_the_config_without_torch(tmp_path):
    from pathpatch.model.graph import Graph
    from pathpatch.model.loading import build_model, save_checkpoint
    from pathpatch.model.sources import INDUCTION_ARCH, read_config

    checkpoint, _ = save_checkpoint(build_model(INDUCTION_ARCH), INDUCTION_ARCH,
                                    tmp_path / "m.safetensors")
    edges = Graph.from_config(read_config("attn-only-2l")).edge_names
    ranking = tmp_path / "ranking.csv"
    ranking.write_text("edge,score\n" + "".join(f"{e},{i}\n" for i, e in enumerate(edges)))
    for model in ("attn-only-2l", str(checkpoint)):
        assert _modules_after(["graph", model]) == []
        assert _modules_after(["explain", model, "in -> a0.3[v]@prev -> a1.*[k] -> out"]) == []
        assert _modules_after(["circuit", str(ranking), "--model", model, "--fraction", "0.5",
                               "--out", str(tmp_path / "circuit.json")]) == []


def test_import_pathpatch_is_light_and_its_names_load_on_first_use():
    code = ("import sys, pathpatch; light = 'torch' not in sys.modules; "
            "pathpatch.load_model; print(light, 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env(), capture_output=True,
                         text=True, timeout=120, check=True)
    assert out.stdout.split() == ["True", "True"]
    assert pathpatch.Hypothesis.__module__ == "pathpatch.language.hypotheses"


def test_the_tasks_named_in_help_are_the_tasks():
    from pathpatch.data.tasks import DATASETS

    assert set(TASKS) == set(DATASETS)


def test_explain_reads_masks_from_a_parquet_of_pairs(tmp_path, capsys):
    pairs = tmp_path / "pairs.parquet"
    pathpatch.save_parquet(pathpatch.make_dataset("induction", n=2), pairs)
    pattern = "in -> a0.3[v]@prev -> a1.*[k]@mask=after_prev_occurrence -> out"
    assert main(["explain", "attn-only-2l", pattern, "--dataset", str(pairs)]) == 0
    assert "paths in P:" in capsys.readouterr().out


def test_a_run_reports_ray_start_up_apart_from_its_own_time(tmp_path):
    outcome = Outcome(folder=tmp_path, total=2, evaluations=2, seconds=1.25,
                      ray_start_seconds=3.0, ray_stop_seconds=1.0)
    assert "in 1.2 s (plus Ray: 3.0 s to start, 1.0 s to stop); results in" in outcome.summary()
    assert "Ray" not in Outcome(folder=tmp_path, total=2, seconds=1.0).summary()
