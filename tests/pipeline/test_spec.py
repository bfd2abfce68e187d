"""Spec validation: every malformed spec fails with a clear message, exit 2, nothing written."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pathpatch.data.pairs import PairDataset, save_parquet
from pipeline.cli import main
from pipeline.spec import parse_spec
from tests.pipeline.conftest import HYPOTHESES, write_spec

# (what the spec gets wrong, keyword arguments for write_spec or a text edit, words the error
# must contain)
BAD_SPECS = [
    ("unknown top-level key", {"top": "shardsize = 4"}, ["unknown key 'shardsize'"]),
    ("unknown execution key", {"top": "", "execution": "retries = 3"},
     ["execution.retries", "max_attempts"]),
    ("shard_size not a number", {"top": ""}, None),
    ("missing dataset file", {"dataset": 'path = "missing.parquet"'},
     ["dataset.path", "missing.parquet"]),
    ("unknown dataset parameter", {"dataset": 'kind = "induction"\nn = 8\nlength = 3'},
     ["length", "induction"]),
    ("unknown dataset kind", {"dataset": 'kind = "parity"\nn = 8'}, ["parity", "induction"]),
    ("empty dataset", {"dataset": 'kind = "induction"\nn = 0'}, ["dataset"]),
    ("vocabulary mismatch", {"dataset": 'kind = "induction"\nn = 8\nvocab_size = 1000'},
     ["vocabulary", "128"]),
    ("unknown node", {"hypotheses": '[[hypotheses]]\nname = "x"\npattern = "in -> a7.2 -> out"'},
     ["a7.2"]),
    ("bad pattern", {"hypotheses": '[[hypotheses]]\nname = "bad"\npattern = "in -> -> out"'},
     ["bad"]),
    ("over max_mixed_copies", {"top": "max_mixed_copies = 2"},
     ["max_mixed_copies", "prev-token K"]),
    ("missing mask", {"hypotheses": '[[hypotheses]]\nname = "m"\n'
                                    'pattern = "in -> a1.*[k]@mask=nosuch -> out"'},
     ["nosuch"]),
    ("unknown family", {"hypotheses": '[[hypotheses]]\nfamily = "head_swap"'},
     ["head_swap", "node_removal"]),
    ("duplicate hypothesis", {"hypotheses": HYPOTHESES + '[[hypotheses]]\nname = "direct"\n'
                                                        'pattern = "all"'}, ["direct"]),
    ("no hypotheses", {"hypotheses": "hypotheses = []"}, ["hypotheses"]),
    ("unknown metric", {"metric": "klx"}, ["metric", "klx"]),
    ("bad dtype", {"top": 'dtype = "float8"'}, ["dtype", "float8", "float32"]),
    ("zero attempts", {"top": "", "execution": "max_attempts = 0"},
     ["execution.max_attempts", "0"]),
    ("bad hypothesis entry", {"hypotheses": '[[hypotheses]]\nname = "x"\npatern = "all"'},
     ["hypotheses[0]", "patern"]),
]


def _run(argv: list[str], capsys) -> tuple[int, str]:
    code = main(argv)
    err = capsys.readouterr().err
    return code, err


@pytest.mark.parametrize("case", BAD_SPECS, ids=[c[0] for c in BAD_SPECS])
def test_malformed_spec_is_a_clear_error(case, tmp_path: Path, checkpoint: Path, capsys):
    what, kwargs, words = case
    spec = write_spec(tmp_path, checkpoint, **kwargs)
    if what == "shard_size not a number":
        spec.write_text(spec.read_text().replace("shard_size = 16", 'shard_size = "x"'))
        words = ["shard_size", "'x'", "integer"]
    out = tmp_path / "out"
    code, err = _run(["run", str(spec), "--out", str(out), "--no-progress"], capsys)
    assert code == 2, err
    assert err.startswith("error: "), err
    assert "Traceback" not in err
    for word in words:
        assert word in err, (word, err)
    assert not out.exists(), "a failed validation must write nothing"


def test_more_malformed_specs(tmp_path: Path, checkpoint: Path, capsys):
    out = tmp_path / "out"
    cases = {
        "not toml": ("model = = 3\n", ["not valid TOML"]),
        "missing model": ('[dataset]\nkind = "induction"\nn = 4\n' + HYPOTHESES,
                          ["missing required key 'model'"]),
        "missing checkpoint": ('model = "./gone.safetensors"\n[dataset]\nkind = "induction"\n'
                               'n = 4\n' + HYPOTHESES, ["model", "gone.safetensors"]),
        "unknown model": ('model = "no-such-model-xyz"\n[dataset]\nkind = "induction"\n'
                          'n = 4\n' + HYPOTHESES, ["model", "no-such-model-xyz"]),
        "dataset without kind": (f'model = "{checkpoint}"\n[dataset]\nn = 4\n' + HYPOTHESES,
                                 ["kind", "path"]),
        "bad budget": (f'model = "{checkpoint}"\n[dataset]\nkind = "induction"\nn = 4\n'
                       '[resources]\nmemory_budget = "lots"\n' + HYPOTHESES,
                       ["resources.memory_budget", "lots"]),
        "bad workers": (f'model = "{checkpoint}"\n[dataset]\nkind = "induction"\nn = 4\n'
                        '[resources]\nworkers = 0\n' + HYPOTHESES, ["resources.workers"]),
    }
    for name, (text, words) in cases.items():
        spec = tmp_path / f"{name.replace(' ', '_')}.toml"
        spec.write_text(text)
        code, err = _run(["run", str(spec), "--out", str(out)], capsys)
        assert code == 2, (name, err)
        assert "Traceback" not in err
        for word in words:
            assert word in err, (name, word, err)
        assert not out.exists()
    code, err = _run(["run", str(tmp_path / "nope.toml"), "--out", str(out)], capsys)
    assert code == 2 and "does not exist" in err and not out.exists()


def test_parquet_dataset_with_wrong_vocabulary(tmp_path: Path, checkpoint: Path, capsys):
    tokens = torch.full((4, 8), 500, dtype=torch.int64)
    scored = torch.zeros(4, 8, dtype=torch.bool)
    scored[:, 3] = True
    save_parquet(PairDataset(tokens, tokens.clone(), scored), tmp_path / "pairs.parquet")
    spec = write_spec(tmp_path, checkpoint, dataset='path = "pairs.parquet"')
    out = tmp_path / "out"
    code, err = _run(["run", str(spec), "--out", str(out)], capsys)
    assert code == 2 and "500" in err and "vocabulary" in err, err
    assert not out.exists()


def test_dry_run_prints_plan_and_writes_nothing(tmp_path: Path, checkpoint: Path, capsys):
    spec = write_spec(tmp_path, checkpoint)
    out = tmp_path / "out"
    assert main(["run", str(spec), "--out", str(out), "--dry-run"]) == 0
    text = capsys.readouterr().out
    assert "6 work items = 2 hypothesis groups x 3 shards" in text
    assert "prev-token K" in text and "mixed copies" in text and "est. cost" in text
    assert not out.exists()


def test_spec_parsing_and_hash():
    text = ('model = "m"\nshard_size = 4\n[dataset]\nkind = "induction"\nn = 8\n'
            'distances = [3, 4]\n[resources]\nmemory_budget = "2MiB"\nworkers = 3\n'
            '[[hypotheses]]\nname = "a"\npattern = "all"\n')
    spec = parse_spec(text)
    assert spec.resources.memory_budget == 2 * 2**20
    assert spec.dataset_params() == {"n": 8, "distances": [3, 4], "seed": 0}
    assert spec.hypothesis_entries() == [{"name": "a", "pattern": "all"}]
    assert spec.digest() == parse_spec(text).digest()
    assert spec.digest() != parse_spec(text.replace("n = 8", "n = 9")).digest()
    assert spec.with_resources(workers=1).resources.workers == 1
    hash(spec)


def test_unreachable_cluster_is_a_clear_error(tmp_path: Path, checkpoint: Path, capsys):
    spec = write_spec(tmp_path, checkpoint)
    out = tmp_path / "out"
    code, err = _run(["run", str(spec), "--out", str(out), "--address", "127.0.0.2:1"], capsys)
    assert code == 2 and "no Ray cluster answers at '127.0.0.2:1'" in err, err
    assert not out.exists()


def test_a_family_s_ranking_file_is_read_from_the_spec_s_folder(tmp_path: Path):
    from pathpatch.errors import PathPatchError

    (tmp_path / "scores.csv").write_text("edge,score\n")
    body = ('model = "attn-only-2l"\n[dataset]\nkind = "induction"\n'
            '[[hypotheses]]\nfamily = "circuit_curve"\nranking = "{}"\n')
    spec = parse_spec(body.format("scores.csv"), base_dir=tmp_path)
    (entry,) = spec.hypothesis_entries()
    assert entry["ranking"] == str((tmp_path / "scores.csv").resolve())
    with pytest.raises(PathPatchError, match=r"hypotheses\[0\]\.ranking = 'nope.csv': no such file"):
        parse_spec(body.format("nope.csv"), base_dir=tmp_path)
