"""`pathpatch bench engine` from the command line: one JSON object on stdout, a bar of its
phases on stderr (the pipeline benchmark takes minutes and is run by hand, not here)."""

import json

from pipeline.cli import main


def test_bench_engine_prints_json_and_its_phases(capsys):
    assert main(["bench", "engine", "--model", "attn-only-2l", "--hypotheses", "2",
                 "--repeats", "1"]) == 0
    captured = capsys.readouterr()
    result = json.loads(captured.out)
    assert result["model_shape"]["n_layers"] == 2 and result["n_hypotheses"] == 2
    assert {"engine_over_forward_circuits", "engine_over_forward_edge_removal",
            "engine_over_forward_induction", "hook_baseline_over_engine",
            "cached_runs_forwards"} <= result.keys()
    assert "bench engine: hook baseline (4/5 done" in captured.err
    assert "bench engine: done (5/5 done" in captured.err


def test_bench_scan_plans_the_whole_scan_and_runs_a_sample(tmp_path):
    from pathpatch.model.graph import Graph
    from pathpatch.model.loading import build_model
    from pipeline.pipeline_benchmark import bench_scan

    arch = dict(n_layers=2, d_model=16, n_heads=2, d_head=8, d_mlp=32, d_vocab=64, n_ctx=32,
                act_fn="gelu_new", normalization_type="LN")
    phases = []
    result = bench_scan(pairs=4, seq_len=24, sample_items=2, group_size=8, keep=tmp_path,
                        progress=phases.append, arch=arch)
    edges = len(Graph.from_model(build_model(arch)).edges)
    assert result["hypotheses"] == edges and result["items"] == -(-edges // 8)
    assert result["sampled_items"] == 2  # the first and the last item
    assert result["sampled_hypotheses"] == 8 + edges - 8 * (result["items"] - 1)
    assert result["failed"] == 0 and result["forwards_per_hypothesis"] > 0
    assert 0 < result["share_evaluate"] <= 1 and 0 <= result["share_compile"] < result["share_evaluate"]
    assert "vector_extensions" in result and len(phases) == 4
    assert result["device"] == "cpu"


def test_bench_scan_refuses_a_device_it_cannot_use(tmp_path):
    import pytest
    import torch

    from pipeline.pipeline_benchmark import bench_scan

    with pytest.raises(ValueError, match="device 'tpu'"):
        bench_scan(device="tpu", keep=tmp_path)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device"):
            bench_scan(device="cuda", keep=tmp_path)
    assert not any(tmp_path.iterdir())  # refused before anything is built


def test_bench_engine_shapes_are_the_ones_its_help_names(capsys):
    import pytest

    from pathpatch.model.config import ModelConfig
    from pathpatch.model.support import check_supported
    from pathpatch.tools.engine_benchmarks import SHAPES

    with pytest.raises(SystemExit):
        main(["bench", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert all(name in help_text for name in SHAPES)
    assert main(["bench", "engine", "--shape", "no-such-shape"]) == 2
    assert "the shapes are gpt2-small, pythia-160m" in capsys.readouterr().err
    for fields in SHAPES.values():  # each a valid config the engine computes exactly
        check_supported(ModelConfig(**fields, n_ctx=8))


def test_bench_plan_plans_a_whole_scan_from_config_json_alone(capsys):
    """`bench plan`: GPT-2 small's full single-edge scan (MIB counts 32,491 edges) planned from
    a directory holding config.json only, in a fresh interpreter, with its time and memory."""
    assert main(["bench", "plan", "--plan-shapes", "gpt2-small", "--pairs", "8"]) == 0
    out = json.loads(capsys.readouterr().out)
    shape = out["shapes"]["gpt2-small"]
    assert shape["edges"] == 32_491 and shape["work_items"] == -(-32_491 // 8)
    assert shape["seconds"] > 0 and shape["peak_rss_beyond_interpreter_gib"] > 0
    assert shape["summary_lines"] < 100  # a summary, not a line per hypothesis
    assert "vector_extensions" in out["host"]
