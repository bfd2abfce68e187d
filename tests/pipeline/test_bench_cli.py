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
            "engine_over_forward_induction", "hook_baseline_over_engine"} <= result.keys()
    assert "bench engine: hook baseline (3/4 done" in captured.err
    assert "bench engine: done (4/4 done" in captured.err
