"""`bench engine` runs end to end on a small model: every figure present, the hook baseline
checked against the engine, and its phases announced (timings are not tested)."""

import pytest
import torch

from pathpatch.benchmark import BENCH_PHASES, hook_baseline, run_engine_benchmark
from pathpatch.errors import PathPatchError
from pathpatch.graph import Graph
from tests.pathpatch.conftest import tiny_model


def test_engine_benchmark_reports_every_ratio_and_its_phases():
    model = tiny_model("mlp", n_layers=2, n_heads=2, d_vocab=11, dtype=torch.float32)
    phases: list[str] = []
    result = run_engine_benchmark(model, n_hypotheses=3, batch=2, seq_len=8, repeats=1,
                                  progress=phases.append)
    assert phases == ["engine: circuits", "engine: edge_removal", "engine: induction",
                      "hook baseline"]
    assert len(phases) == BENCH_PHASES
    for family in ("circuits", "edge_removal", "induction"):
        assert result[f"engine_over_forward_{family}"] > 0
        assert result[f"groups_{family}"] >= 1
    assert result["hook_baseline_over_engine"] > 0
    assert result["baseline_max_abs_diff"] < 1e-3
    assert result["mixing_kernel"] in ("onednn", "blas")
    assert result["model_shape"]["d_vocab"] == 11 and result["peak_rss_mib"] > 0


def test_a_model_without_a_linear_hook_baseline_gets_the_engine_figures_and_says_why():
    """Gemma-2's norm after attention makes head outputs non-additive: the hook baseline refuses
    it, and the benchmark reports the engine's ratios with the reason the baseline is absent."""
    model = tiny_model("gemma", n_layers=2, n_heads=2, d_vocab=11, dtype=torch.float32)
    result = run_engine_benchmark(model, n_hypotheses=2, batch=2, seq_len=6, repeats=1)
    assert all(result[f"engine_over_forward_{f}"] > 0 for f in ("circuits", "edge_removal", "induction"))
    assert "Gemma-2" in result["hook_baseline"] and "hook_baseline_over_engine" not in result
    xr = torch.zeros(1, 4, dtype=torch.long)
    with pytest.raises(PathPatchError, match="no hook baseline"):
        hook_baseline(model, Graph.from_model(model), set(), xr, {})
