"""`bench engine` runs end to end on a small model: every figure present, the hook baseline
checked against the engine, and its phases announced (timings are not tested)."""

import torch

from pathpatch.benchmark import BENCH_PHASES, run_engine_benchmark
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
