"""A researcher's text dataset in a spec: the [dataset] keys, their errors before any model
work, the ready job jobs/text_induction.toml run end to end, its identity the tokenized pairs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pathpatch.errors import PathPatchError
from pipeline.cli import main
from pipeline.resolve import resolve
from pipeline.spec import load_spec, parse_spec
from pipeline.store import META_KEY
from pipeline.sweep import run_sweep

JOBS = Path(__file__).resolve().parents[2] / "jobs"
SPEC = """\
model = "attn-only-2l"
metric = "logit_diff"
shard_size = 8
[dataset]
{dataset}
[[hypotheses]]
name = "all"
pattern = "all"
"""


def _spec(folder: Path, dataset: str) -> Path:
    shutil.copy(JOBS / "induction_text.jsonl", folder / "pairs.jsonl")
    path = folder / "spec.toml"
    path.write_text(SPEC.format(dataset=dataset))
    return path


def test_text_keys_parse_and_bad_ones_name_the_key(tmp_path):
    spec = load_spec(_spec(tmp_path, 'path = "pairs.jsonl"\ncolumns = {clean = "clean"}\n'
                                      'prepend_bos = false\nanswer_tokens = "first"'))
    assert dict(spec.dataset.text) == {"columns": (("clean", "clean"),), "prepend_bos": False,
                                       "answer_tokens": "first"}
    assert spec.dataset.table()["columns"] == {"clean": "clean"}
    for bad, words in (('columns = {prompt = "x"}', "unknown role(s) ['prompt']"),
                       ("prepend_bos = 1", "dataset.prepend_bos = 1: give true or false"),
                       ('answer_tokens = "all"', "allowed are ['one', 'first']"),
                       ("kind = 1", "unknown")):
        with pytest.raises(PathPatchError) as err:
            parse_spec(SPEC.format(dataset=f'path = "pairs.jsonl"\n{bad}'), base_dir=tmp_path)
        assert words in str(err.value), (bad, err.value)


def test_a_bad_row_is_refused_before_any_model_work(tmp_path, capsys):
    spec = _spec(tmp_path, 'path = "pairs.jsonl"')
    rows = (tmp_path / "pairs.jsonl").read_text().splitlines()
    bad = json.loads(rows[3]) | {"answer": "t1 t2"}
    (tmp_path / "pairs.jsonl").write_text("\n".join([*rows[:3], json.dumps(bad), *rows[4:]]) + "\n")
    out = tmp_path / "out"
    assert main(["run", str(spec), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "dataset.path = " in err and "pairs.jsonl' row 3: answer 't1 t2' is 2 tokens" in err
    assert not out.exists()


def test_the_ready_text_job_runs_and_its_identity_is_the_tokenized_pairs(tmp_path, capsys):
    """jobs/text_induction.toml end to end, in process; the same pairs written otherwise (another
    format, token ids instead of text) plan the very same work items, so a rerun reuses them."""
    spec = load_spec(JOBS / "text_induction.toml")
    out = tmp_path / "sweep"
    outcome = run_sweep(spec, out, backend="inprocess", progress=False)
    assert outcome.failed == 0
    assert "read 32 pairs" in capsys.readouterr().err
    from pipeline.query import open_sweeps

    (n, examples), = open_sweeps(out).sql(
        "SELECT count(*), count(DISTINCT example) FROM results").fetchall()
    assert (n, examples) == (12 * 32, 32)
    first = resolve(spec)
    rows = [json.loads(line) for line in (JOBS / "induction_text.jsonl").read_text().splitlines()]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "pairs.parquet")
    text = (JOBS / "text_induction.toml").read_text().replace('"induction_text.jsonl"',
                                                              f'"{tmp_path / "pairs.parquet"}"')
    again = resolve(parse_spec(text, base_dir=JOBS))
    assert [i.id for i in again.plan.items] == [i.id for i in first.plan.items]
    assert again.dataset.digest() == first.dataset.digest()


def test_a_checkpoint_takes_its_tokenizer_from_beside_it_or_from_the_spec(tmp_path, checkpoint,
                                                                          capsys):
    """A checkpoint has no tokenizer of its own: `x.tokenizer.json` beside it, or the spec's
    `tokenizer` key (a file, a directory or a model name); without either, an error saying so."""
    text = SPEC.replace('"attn-only-2l"', f'"{checkpoint}"')
    shutil.copy(JOBS / "induction_text.jsonl", tmp_path / "pairs.jsonl")
    path = tmp_path / "spec.toml"
    path.write_text(text.format(dataset='path = "pairs.jsonl"'))
    assert main(["run", str(path), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert f"model = '{checkpoint}'" in err and "has no tokenizer" in err
    assert "tiny.tokenizer.json" in err and "[dataset] tokenizer" in err
    for tokenizer in ("attn-only-2l", str(Path(__file__).parents[2] / "pathpatch" / "bundled"
                                          / "attn-only-2l.tokenizer.json")):
        path.write_text(text.format(dataset=f'path = "pairs.jsonl"\ntokenizer = "{tokenizer}"'))
        assert main(["run", str(path), "--dry-run"]) == 0
        assert "read 32 pairs" in capsys.readouterr().err


def test_text_keys_on_a_token_pairs_file_are_refused(tmp_path, capsys):
    from pathpatch.data.pairs import save_parquet
    from pathpatch.data.tasks import make_dataset

    save_parquet(make_dataset("induction", n=4), tmp_path / "pairs.parquet")
    path = tmp_path / "spec.toml"
    path.write_text(SPEC.replace("logit_diff", "kl").format(
        dataset='path = "pairs.parquet"\nprepend_bos = true'))
    assert main(["run", str(path), "--dry-run"]) == 2
    assert "the text keys ['prepend_bos'] do not apply to it" in capsys.readouterr().err


def test_the_ready_mean_ablation_job_runs_on_the_text_dataset(tmp_path):
    """jobs/text_induction_mean.toml: the ready text pairs with mean ablation, in process; its
    rows record the intervention and differ from the resample job's (another counterfactual)."""
    from pipeline.query import open_sweeps

    outs = {}
    for job in ("text_induction", "text_induction_mean"):
        outs[job] = tmp_path / job
        assert run_sweep(load_spec(JOBS / f"{job}.toml"), outs[job], backend="inprocess",
                         progress=False).failed == 0
    mean, resample = (open_sweeps(outs[j]).sql(
        "SELECT hypothesis, example, ue, te FROM results ORDER BY hypothesis, example").fetchall()
        for j in ("text_induction_mean", "text_induction"))
    assert len(mean) == len(resample) == 12 * 32
    assert [r[:2] for r in mean] == [r[:2] for r in resample]
    assert any(abs(m[3] - r[3]) > 1e-6 for m, r in zip(mean, resample))  # TE: another run
    provenance = [json.loads(pq.read_schema(f).metadata[META_KEY])
                  for f in sorted((outs["text_induction_mean"] / "items").glob("*.parquet"))]
    assert provenance and all(p["intervention"] == "mean" for p in provenance)


def test_a_parquet_file_that_is_not_parquet_is_named(tmp_path, capsys):
    (tmp_path / "pairs.parquet").write_text("not parquet")
    path = _spec(tmp_path, 'path = "pairs.parquet"')
    assert main(["run", str(path), "--dry-run"]) == 2
    assert "cannot be read as Parquet" in capsys.readouterr().err


def test_the_loss_metric_on_a_text_dataset_is_refused_with_the_reason(tmp_path, capsys):
    """A text dataset scores each prompt's last token, whose next token is the answer (not in
    the prompt) or padding: `loss` would read those, so it is refused in the user's terms."""
    path = _spec(tmp_path, 'path = "pairs.jsonl"')
    path.write_text(path.read_text().replace("logit_diff", "loss"))
    assert main(["run", str(path), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "metric = 'loss': it scores the prompt's next token, but a text dataset" in err
    assert "use metric 'logit_diff'" in err
