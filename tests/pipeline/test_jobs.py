"""The ready sweeps in jobs/: each validates and plans; those on pretrained models (GPT-2, Pythia,
Llama) fail fast and clearly where the weights are not cached."""

from pathlib import Path

import pytest

from pipeline.cli import main

JOBS = Path(__file__).resolve().parents[2] / "jobs"
PRETRAINED = {"gpt2_numbers.toml": ("gpt2", "gpt2"), "gpt2_edge_effects.toml": ("gpt2", "gpt2"),
              "gpt2_ioi.toml": ("gpt2", "gpt2"), "gpt2_ioi_search.toml": ("gpt2", "gpt2"),
              "pythia_induction.toml": ("pythia-160m", "EleutherAI/pythia-160m"),
              "llama_induction.toml": ("meta-llama/Llama-3.2-1B", "meta-llama/Llama-3.2-1B")}
TWO_STEP = {"curve.toml": "edge_effects.csv"}  # reads a ranking an earlier job's SQL writes
PRETRAINED_TWO_STEP = {"gpt2_curve.toml": "gpt2_edge_effects.csv"}
LOCAL = sorted(p.name for p in JOBS.glob("*.toml")
               if p.name not in PRETRAINED | TWO_STEP | PRETRAINED_TWO_STEP)


@pytest.mark.parametrize("name", LOCAL)
def test_ready_sweeps_plan(name, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["run", str(JOBS / name), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "dry run: nothing was written" in out and "items" in out
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("name", list(PRETRAINED))
def test_pretrained_sweeps_fail_fast_and_clearly_without_their_weights(name, capsys, tmp_path,
                                                                      monkeypatch):
    """Refused from the cache check alone: no network probe that could wait, no download, no
    loader started, nothing written."""
    from huggingface_hub import try_to_load_from_cache

    from pathpatch.model import loading as models
    from pathpatch.model import sources

    model, repo = PRETRAINED[name]
    if isinstance(try_to_load_from_cache(repo, "config.json"), str):
        pytest.skip(f"{repo} is in the local cache here: the sweep would run")

    def never(*args, **kwargs):
        raise AssertionError("a loader or download was started for a model that is not cached")

    monkeypatch.setattr(sources, "_hub_reachable", lambda: False)  # this machine: no hub
    monkeypatch.setattr(models, "load_hf_directory", never)
    monkeypatch.chdir(tmp_path)
    assert main(["run", str(JOBS / name), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert f"model = {model!r}" in err and "not in the Hugging Face cache" in err
    assert "huggingface-cli download" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name", list(TWO_STEP))
def test_a_curve_job_plans_once_its_ranking_exists_and_says_what_is_missing_before(
        name, capsys, tmp_path):
    """Run from a copy of jobs/ beside a sweeps/ folder, as in a checkout."""
    import shutil

    from pathpatch.model.graph import Graph
    from pathpatch.model.loading import load_model

    (tmp_path / "jobs").mkdir()
    shutil.copy(JOBS / name, tmp_path / "jobs" / name)
    assert main(["run", str(tmp_path / "jobs" / name), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert f"ranking = '../sweeps/{TWO_STEP[name]}': no such file" in err
    (tmp_path / "sweeps").mkdir()
    graph = Graph.from_model(load_model("attn-only-2l"))
    (tmp_path / "sweeps" / TWO_STEP[name]).write_text(
        "edge,score\n" + "".join(f"{e},{i}\n" for i, e in enumerate(graph.edges)))
    assert main(["run", str(tmp_path / "jobs" / name), "--dry-run"]) == 0
    assert "dry run: nothing was written" in capsys.readouterr().out


@pytest.mark.parametrize("name", list(PRETRAINED_TWO_STEP))
def test_a_gpt2_curve_job_reads_its_ranking_then_fails_fast_without_gpt2(name, capsys, tmp_path,
                                                                         monkeypatch):
    import shutil

    from huggingface_hub import try_to_load_from_cache

    from pathpatch.model import sources
    from pathpatch.model.graph import Graph

    if isinstance(try_to_load_from_cache("gpt2", "config.json"), str):
        pytest.skip("gpt2 is in the local cache here: the sweep would run")
    monkeypatch.setattr(sources, "_hub_reachable", lambda: False)
    (tmp_path / "jobs").mkdir()
    shutil.copy(JOBS / name, tmp_path / "jobs" / name)
    assert main(["run", str(tmp_path / "jobs" / name), "--dry-run"]) == 2
    assert f"../sweeps/{PRETRAINED_TWO_STEP[name]}': no such file" in capsys.readouterr().err
    (tmp_path / "sweeps").mkdir()
    gpt2 = Graph(n_layers=12, n_heads=12, has_mlp=True)  # GPT-2 small's edge names, no weights
    (tmp_path / "sweeps" / PRETRAINED_TWO_STEP[name]).write_text(
        "edge,score\n" + "".join(f"{e},{i}\n" for i, e in enumerate(gpt2.edges)))
    assert main(["run", str(tmp_path / "jobs" / name), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "model = 'gpt2'" in err and "not in the Hugging Face cache" in err
    assert not (tmp_path / "out").exists()
