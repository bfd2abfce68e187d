"""`bench engine` runs end to end on a small model: every figure present, the hook baseline
checked against the engine, and its phases announced (timings are not tested)."""

from types import SimpleNamespace

import pytest
import torch

from pathpatch.errors import PathPatchError
from pathpatch.model.graph import Graph
from pathpatch.tools import engine_benchmarks as benchmark
from pathpatch.tools.engine_benchmarks import BENCH_PHASES, hook_baseline, run_engine_benchmark
from tests.pathpatch.conftest import tiny_model


def test_engine_benchmark_reports_every_ratio_and_its_phases():
    model = tiny_model("mlp", n_layers=2, n_heads=2, d_vocab=11, dtype=torch.float32)
    phases: list[str] = []
    result = run_engine_benchmark(model, n_hypotheses=3, batch=2, seq_len=8, repeats=1,
                                  progress=phases.append)
    assert phases == ["engine: circuits", "engine: edge_removal", "engine: induction",
                      "cached runs", "hook baseline"]
    assert len(phases) == BENCH_PHASES
    assert result["cached_runs_forwards"] > 0
    for family in ("circuits", "edge_removal", "induction"):
        assert result[f"engine_over_forward_{family}"] > 0
        # less by exactly the family's share (1/3: 3 hypotheses) of the cached runs, timed
        # apart; the three figures are each rounded to 3 decimals (at most 0.0005 * 7/3 apart)
        assert result[f"engine_over_forward_{family}_beyond_cached_runs"] == pytest.approx(
            result[f"engine_over_forward_{family}"] - result["cached_runs_forwards"] / 3,
            abs=0.0012)
        assert result[f"groups_{family}"] == 1  # 3 hypotheses of a tiny model: one group
        assert 0 < result[f"estimated_forwards_{family}"] < 5  # the arithmetic of its copies
    assert result["hook_baseline_over_engine"] > 0
    assert result["baseline_max_abs_diff"] < 1e-3
    assert result["model_shape"]["d_vocab"] == 11 and result["peak_rss_mib"] > 0


def test_each_timed_run_is_divided_by_the_faster_of_the_forwards_next_to_it(monkeypatch):
    clock = [0.0]
    monkeypatch.setattr(benchmark, "time", SimpleNamespace(perf_counter=lambda: clock[0]))

    def taking(seconds):
        def run():
            clock[0] += seconds.pop(0)
        return run

    side_by_side = benchmark._SideBySide(taking([2.0, 4.0, 3.0]), forward_repeats=1)
    # runs of 10 s between forwards of 2 and 4 s, then 12 s between 4 and 3 s: 5 and 4 forwards
    assert side_by_side.forwards_taken(taking([10.0, 12.0]), repeats=2) == 4.0
    result = {}
    side_by_side.report(result)
    assert result == {"forward_s": 2.0, "forward_s_slowest": 4.0}


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


def test_engine_benchmark_takes_a_count_per_family():
    model = tiny_model("mlp", n_layers=2, n_heads=2, d_vocab=11, dtype=torch.float32)
    counts = {"circuits": 1, "edge_removal": 3, "induction": 2}
    result = run_engine_benchmark(model, n_hypotheses=counts, batch=2, seq_len=6, repeats=1,
                                  forward_repeats=1)
    assert result["n_hypotheses"] == counts and result["hook_baseline_hypotheses"] == 1
    with pytest.raises(PathPatchError, match="a count for each of circuits, edge_removal, induction"):
        run_engine_benchmark(model, n_hypotheses={"circuits": 1}, batch=2, seq_len=6, repeats=1)


def test_discovery_benchmark_reports_each_ranking_s_cost_and_the_search_s_rates():
    from pathpatch.tools.engine_benchmarks import DISCOVERY_PHASES, run_discovery_benchmark

    model = tiny_model("mlp", n_layers=2, n_heads=2, d_vocab=11, dtype=torch.float32)
    phases: list[str] = []
    result = run_discovery_benchmark(model, batch=2, seq_len=8, steps=2, decisions=4,
                                     exact_sample=6, repeats=1, progress=phases.append)
    assert len(phases) == DISCOVERY_PHASES
    edges = len(Graph.from_model(model).edges)
    assert result["edges"] == edges
    assert result["eap"]["forwards"] > 0 and result["eap_ig"]["steps"] == 2
    assert result["exact"]["sampled_edges"] == 6 and result["exact"]["forwards"] > 0
    search = result["search"]
    for where in ("into_out", "into_layer_0"):
        for window in (1, 8):
            s = search[f"{where}_window_{window}"]
            assert s["decisions"] >= 4 and s["evaluations"] >= s["decisions"]
            assert s["evaluations_per_edge"] == round(s["evaluations"] / s["decisions"], 3)
            # the product of the two rates, each of the three rounded to 3 decimals
            per_edge, per_eval = s["evaluations_per_edge"], s["forwards_per_evaluation"]
            assert 0 < s["forwards_per_edge"] == pytest.approx(
                per_edge * per_eval, abs=0.0005 * (1 + per_edge + per_eval) + 1e-6)
        assert search[f"{where}_window_1"]["evaluations_per_edge"] == 1
    # a whole search costs each end's forwards per decided edge (window 8) times every edge;
    # forwards_per_edge is rounded to 3 decimals, the bound to an integer
    for bound, where in zip(search["whole_search_forwards_between"], ("into_out", "into_layer_0"),
                            strict=True):
        per_edge = search[f"{where}_window_8"]["forwards_per_edge"]
        assert bound > 0 and abs(bound - per_edge * edges) <= 0.5 + 0.0005 * edges
