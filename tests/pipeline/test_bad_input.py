"""A corpus of malformed inputs: each gets exit status 2, a message naming the input and the fix,
no traceback, and leaves every file on disk as it was (nothing written, nothing lost)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from pipeline.cli import EXIT_BAD_INPUT, main
from tests.pipeline.conftest import ROOT, env

SPEC = """\
name = "{name}"
model = "{model}"
metric = "{metric}"
shard_size = 16
group_size = 4
[dataset]
kind = "induction"
{dataset}
[resources]
workers = 1
{hypotheses}"""
HYPOTHESES = """
[[hypotheses]]
name = "direct"
pattern = "in -> out"

[[hypotheses]]
name = "not a0.0"
pattern = "~a0.0"
"""


def write(folder: Path, *, name="bad", model="attn-only-2l", metric="kl", dataset="n = 16",
          hypotheses=HYPOTHESES, extra="", file="spec.toml") -> Path:
    path = folder / file
    path.write_text(extra + SPEC.format(name=name, model=model, metric=metric, dataset=dataset,
                                        hypotheses=hypotheses))
    return path


def snapshot(root: Path) -> dict[str, str]:
    """Every file and folder under root, with its content hash."""
    out = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        out[rel] = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "dir"
    return out


@pytest.fixture
def work(tmp_path, monkeypatch):
    """A scratch folder as the working directory (a default sweeps/ would land here)."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


def refused(work: Path, argv: list[str], *expected: str, capsys) -> str:
    """Run the CLI; assert exit 2, the expected phrases, no traceback and an unchanged disk."""
    before = snapshot(work)
    status = main(argv)
    err = capsys.readouterr().err
    assert status == EXIT_BAD_INPUT, err
    assert err.startswith("error: ") and "Traceback" not in err, err
    for phrase in expected:
        assert phrase in err, (phrase, err)
    assert snapshot(work) == before, "a refused input changed files on disk"
    return err


def _sweep_folder(folder: Path, spec: Path) -> None:
    """A real sweep folder, run in process (no Ray)."""
    assert main(["run", str(spec), "--out", str(folder), "--backend", "inprocess",
                 "--no-progress", "--quiet"]) == 0


# --- nothing a user wrote is overwritten -------------------------------------------------------


def test_out_into_a_folder_of_the_users_own_files(work, capsys):
    mine = work / "mine"
    mine.mkdir()
    (mine / "manifest.json").write_text('{"my": "own manifest"}')
    (mine / "spec.toml").write_text("my own spec")
    refused(work, ["run", str(write(work)), "--out", str(mine)],
            "holds a manifest.json that is not a pathpatch sweep's", "new or empty folder",
            capsys=capsys)
    (mine / "manifest.json").unlink()
    refused(work, ["run", str(write(work)), "--out", str(mine)],
            "is not empty and is not a pathpatch sweep folder", "spec.toml", capsys=capsys)


def test_out_naming_a_file_or_a_path_under_a_file(work, capsys):
    (work / "notes.txt").write_text("keep me")
    refused(work, ["run", str(write(work)), "--out", "notes.txt"], "is a file", capsys=capsys)
    refused(work, ["run", str(write(work)), "--out", "notes.txt/sweep"],
            "is under notes.txt, which is a file", capsys=capsys)


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write into a read-only folder")
def test_out_in_a_read_only_folder(work, capsys):
    locked = work / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        refused(work, ["run", str(write(work)), "--out", "locked/sweep"], "is not writable",
                capsys=capsys)
    finally:
        locked.chmod(0o755)


def test_out_over_another_sweep_needs_force(work, capsys):
    first = write(work, name="first", file="first.toml")
    _sweep_folder(work / "out", first)
    capsys.readouterr()
    other = write(work, name="first", metric="loss", file="other.toml")
    refused(work, ["run", str(other), "--out", "out"], "holds another sweep",
            "metric 'kl' -> 'loss'", "--force", capsys=capsys)
    old_items = {p.name for p in (work / "out" / "items").iterdir()}
    assert main(["run", str(other), "--out", "out", "--backend", "inprocess", "--no-progress",
                 "--quiet", "--force"]) == 0
    assert {p.name for p in (work / "out" / "superseded").iterdir()} == old_items  # kept aside


def test_a_sweep_made_before_its_model_digest_changed_is_refused_and_says_why(work, capsys):
    """The same model path now holding other weights (as a float64 checkpoint that TransformerLens
    3 rounded through float32 reads differently now): refused, never mixed; --force keeps the old
    rows in superseded/."""
    from pathpatch.model.loading import build_model, save_checkpoint
    from pathpatch.model.sources import INDUCTION_ARCH

    save_checkpoint(build_model(INDUCTION_ARCH), INDUCTION_ARCH, work / "m.safetensors")
    spec = write(work, model=str(work / "m.safetensors"), file="m.toml")
    _sweep_folder(work / "out", spec)
    capsys.readouterr()
    save_checkpoint(build_model(INDUCTION_ARCH), INDUCTION_ARCH, work / "m.safetensors")
    refused(work, ["run", str(spec), "--out", "out"], "holds another sweep", "model_digest '",
            "same model now has other weights", "--force", capsys=capsys)
    old_items = {p.name for p in (work / "out" / "items").iterdir()}
    assert main(["run", str(spec), "--out", "out", "--backend", "inprocess", "--no-progress",
                 "--quiet", "--force"]) == 0
    assert {p.name for p in (work / "out" / "superseded").iterdir()} == old_items


@pytest.mark.parametrize("name", ["../../../x", "/tmp/abs", ".hidden", "a/b", "two\nlines"])
def test_spec_name_cannot_leave_sweeps(work, name, capsys):
    spec = work / "spec.toml"
    spec.write_text(SPEC.format(name=name.replace("\n", "\\n"), model="attn-only-2l",
                                metric="kl", dataset="n = 16", hypotheses=HYPOTHESES))
    refused(work, ["run", str(spec)], "must be a plain folder name", capsys=capsys)


# --- memory and time: checked before anything is allocated ------------------------------------


@pytest.mark.parametrize("dataset,phrase", [
    ("n = 16\nseq_len = 100000", "longer than the model's context (n_ctx = 64"),
    ("n = 16\nseq_len = 65", "give seq_len <= 64"),
    ("n = 9223372036854775807", "more than half of this machine's"),
    ("n = 1e3", "dataset.n = 1000.0: give the number of pairs as an integer"),
    ("n = 0", "dataset.n = 0"),
    ("n = 16\nseq_len = 0", "dataset.seq_len = 0"),
])
def test_dataset_sizes_are_checked_before_allocation(work, dataset, phrase, capsys):
    refused(work, ["run", str(write(work, dataset=dataset)), "--dry-run"], phrase, capsys=capsys)


def test_positions_beyond_the_sequence(work, capsys):
    far = '\n[[hypotheses]]\nname = "far"\npattern = "in -> a0.0@pos=999 -> out"\n'
    refused(work, ["run", str(write(work, hypotheses=HYPOTHESES + far)), "--dry-run"],
            "hypothesis 'far': @pos=999 reaches position 999", "positions 0-63", capsys=capsys)
    ahead = '\n[[hypotheses]]\nname = "ahead"\npattern = "in -> a1.0[k]@offset=64 -> out"\n'
    refused(work, ["run", str(write(work, hypotheses=HYPOTHESES + ahead)), "--dry-run"],
            "'ahead': @offset=64", capsys=capsys)


# --- misleading or internal messages -------------------------------------------------------------


@pytest.mark.parametrize("entry,phrase", [
    ('family = "induction_initial"\nprev_heads = "a0.3"\ninduction_heads = ["a1.*"]',
     'needs prev_heads as a non-empty list of node globs, e.g. prev_heads = ["a0.3"]'),
    ('name = "bad\\u0000name"\npattern = "in -> out"', "must be one line of printable"),
    ('name = "two\\nlines"\npattern = "in -> out"', "must be one line of printable"),
    ('name = "p"\npattern = 3', "pattern = 3 must be a string"),
    ('name = "p"\npattern = "in -> a7.2 -> out"', "'a7.2' matches no node; the model has nodes"),
])
def test_bad_hypotheses(work, entry, phrase, capsys):
    refused(work, ["run", str(write(work, hypotheses=f"\n[[hypotheses]]\n{entry}\n")), "--dry-run"],
            phrase, capsys=capsys)


def test_spec_paths_and_syntax(work, capsys):
    (work / "jobs").mkdir()
    refused(work, ["run", "jobs"], "is a folder", capsys=capsys)
    refused(work, ["run", "missing.toml"], "does not exist", capsys=capsys)
    refused(work, ["run", str(write(work, extra="nmae = 'x'\n"))], "unknown key 'nmae'",
            capsys=capsys)
    (work / "broken.toml").write_text("name = [unclosed\n")
    refused(work, ["run", "broken.toml"], "not valid TOML", capsys=capsys)
    refused(work, ["run", str(write(work)), "--workers", "0"], "--workers 0", capsys=capsys)


def test_bad_model_files(work, capsys):
    from pathpatch.model.loading import build_model, save_checkpoint
    from pathpatch.model.sources import INDUCTION_ARCH

    save_checkpoint(build_model(INDUCTION_ARCH), INDUCTION_ARCH, work / "good.safetensors")
    shutil.copy(work / "good.json", work / "cut.json")
    (work / "cut.safetensors").write_bytes((work / "good.safetensors").read_bytes()[:1000])
    refused(work, ["run", str(write(work, model=str(work / "cut.safetensors"))), "--dry-run"],
            "is not a readable safetensors file", "truncated or corrupt", capsys=capsys)
    other = build_model(INDUCTION_ARCH)  # same shapes, other weights
    save_checkpoint(other, INDUCTION_ARCH, work / "other.safetensors")
    shutil.copy(work / "good.json", work / "other.json")  # a JSON that belongs to other weights
    # whether the values are the JSON's is known only by reading them: a dry-run plans from the
    # architecture and says so, the run itself refuses before anything is written
    spec = str(write(work, model=str(work / "other.safetensors")))
    assert main(["run", spec, "--dry-run"]) == 0
    assert "weights not read (planned from the architecture)" in capsys.readouterr().out
    refused(work, ["run", spec, "--out", str(work / "out")],
            "do not match the digest in their JSON", capsys=capsys)
    # a TransformerLens 3 checkpoint JSON naming a feature pathpatch does not compute
    shutil.copy(work / "good.safetensors", work / "sinks.safetensors")
    config = json.loads((work / "good.json").read_text())
    config["architecture"]["use_attention_sinks"] = True
    (work / "sinks.json").write_text(json.dumps(config))
    refused(work, ["graph", str(work / "sinks.safetensors")],
            "use_attention_sinks=True: attention sinks (a learned extra softmax column) is not "
            "computed exactly", capsys=capsys)


def test_folders_that_are_not_sweeps(work, capsys):
    (work / "empty").mkdir()
    for argv in (["resume", "empty"], ["status", "empty"], ["report", "empty"],
                 ["sql", "empty", "SELECT 1"]):
        refused(work, argv, "is not a sweep folder (no manifest.json)", capsys=capsys)


def test_sql_that_writes(work, capsys):
    _sweep_folder(work / "out", write(work))
    capsys.readouterr()
    for query in ("CREATE TABLE t AS SELECT 1", "CREATE TEMP TABLE t AS SELECT 1",
                  "COPY results TO 'x.csv'", "ATTACH 'x.duckdb'"):
        refused(work, ["sql", "out", query], "sql is read-only", capsys=capsys)


def test_sql_refusals_name_the_statement_as_written_and_every_view(work, capsys):
    from pipeline.query import VIEWS, open_sweeps

    _sweep_folder(work / "out", write(work))
    capsys.readouterr()
    for query, keyword in (("INSTALL httpfs", "INSTALL"), ("CHECKPOINT", "CHECKPOINT"),
                           ("/* a comment */ USE memory", "USE"), ("LOAD httpfs", "LOAD")):
        err = refused(work, ["sql", "out", query], f"sql is read-only: {keyword} is not allowed",
                      capsys=capsys)
        assert all(view in err for view in VIEWS), err
    con = open_sweeps(work / "out")
    made = {name for (name,) in con.sql("SELECT table_name FROM information_schema.tables "
                                        "WHERE NOT starts_with(table_name, '_')").fetchall()}
    con.close()
    assert made == set(VIEWS)
    err = refused(work, ["sql", "out"], "usage: pathpatch sql", capsys=capsys)
    assert all(view in err for view in VIEWS), err


def test_a_callable_metric_is_tried_before_any_work(work, capsys):
    """`os:system` imports fine; called as a metric it fails: --dry-run says so, by name."""
    refused(work, ["run", str(write(work, metric="os:system")), "--dry-run"],
            "metric = 'os:system' failed when tried on the dataset's first 2 examples",
            "TypeError", "fn(clean_logits", capsys=capsys)
    refused(work, ["run", str(write(work, metric="os:getcwd")), "--dry-run"],
            "metric = 'os:getcwd'", capsys=capsys)
    wrong_shape = "tests.pipeline.slow_metric:per_position"
    refused(work, ["run", str(write(work, metric=wrong_shape)), "--dry-run"],
            f"metric = '{wrong_shape}', tried on the dataset's first 2 examples", "returned [2, ",
            "a tensor of shape [2]", capsys=capsys)
    # under an x_c-free intervention, a metric that reads x_c fails the probe by name
    reads_xc = "tests.pipeline.slow_metric:reads_counterfactual"
    refused(work, ["run", str(write(work, metric=reads_xc, extra='intervention = "zero"\n')),
                   "--dry-run"],
            f"metric = '{reads_xc}', tried on the dataset's first 2 examples",
            "read the batch's counterfactual prompts", "intervention = 'zero'", capsys=capsys)
    assert main(["run", str(write(work, metric=reads_xc)), "--dry-run"]) == 0  # resample: fine
    # a metric that works on the first examples and fails later still fails in the items
    assert main(["run", str(write(work, metric="tests.pipeline.slow_metric:poison_kl")),
                 "--dry-run"]) == 0


def test_an_entry_with_both_pattern_and_family(work, capsys):
    both = '\n[[hypotheses]]\nname = "x"\npattern = "in -> out"\nfamily = "node_removal"\n'
    err = refused(work, ["run", str(write(work, hypotheses=both)), "--dry-run"],
                  "hypotheses[0]: has both family = 'node_removal' and name and pattern",
                  "split it into two [[hypotheses]] entries", capsys=capsys)
    assert "unexpected keyword" not in err
    unknown = '\n[[hypotheses]]\nfamily = "induction_initial"\nheads = ["a0.1"]\n'
    refused(work, ["run", str(write(work, hypotheses=unknown)), "--dry-run"],
            "family 'induction_initial' has no parameter 'heads'; its parameters are "
            "prev_heads, induction_heads", capsys=capsys)


def test_a_missing_model_path_says_where_it_looked(work, capsys):
    (work / "specs").mkdir()
    err = refused(work, ["run", str(write(work / "specs", model="/nowhere/tiny-model")),
                         "--dry-run"],
                  "model = '/nowhere/tiny-model': no such file or directory", capsys=capsys)
    assert "looked in" not in err and "specs" not in err.split("model =")[1], err
    refused(work, ["run", str(write(work / "specs", model="../models/tiny")), "--dry-run"],
            f"looked for {work / 'models' / 'tiny'} beside the spec and "
            f"{work.parent / 'models' / 'tiny'} in the working directory", capsys=capsys)


def test_a_pattern_that_matches_nothing_is_warned_about(work, capsys):
    nothing = '\n[[hypotheses]]\nname = "nothing"\npattern = "a0.0 & ~a0.0"\n'
    assert main(["run", str(write(work, hypotheses=HYPOTHESES + nothing)), "--dry-run"]) == 0
    err = capsys.readouterr().err
    assert "warning: hypothesis 'nothing' (a0.0 & ~a0.0) matches no path" in err


# --- the environment ------------------------------------------------------------------------------


@pytest.mark.slow
def test_ctrl_c_stops_with_one_line_and_a_resumable_folder(work):
    # 16 shards: seconds of work remain after the first item, even on a loaded 2-core host
    spec = write(work, metric="tests.pipeline.slow_metric:slow_kl", dataset="n = 256")
    out = work / "out"
    cmd = [sys.executable, "-m", "pipeline.cli"]
    driver = subprocess.Popen(cmd + ["run", str(spec), "--out", str(out), "--backend", "inprocess",
                                     "--no-progress", "--quiet"], cwd=ROOT, env=env(),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              # an ignored SIGINT is inherited, and an earlier test in the same
                              # pytest process may have left it ignored: Ctrl-C as a shell gives it
                              preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 120
    while not list((out / "items").glob("*.parquet")) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert driver.poll() is None, "the sweep finished before it could be interrupted"
    driver.send_signal(signal.SIGINT)
    _, err = driver.communicate(timeout=60)
    assert driver.returncode == 130, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines == [f"interrupted: every result written so far is kept; `pathpatch resume {out}` "
                     "finishes it"], err
    resumed = subprocess.run(cmd + ["resume", str(out), "--backend", "inprocess", "--no-progress",
                                    "--quiet"], cwd=ROOT, env=env(), capture_output=True,
                             text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert "already done" in resumed.stdout and " 0 already done" not in resumed.stdout


@pytest.mark.slow
def test_a_folder_named_like_the_package_does_not_shadow_it(tmp_path):
    """The clone's parent folder as working directory: `pathpatch/` there is the checkout (no
    __init__.py), which must not replace the installed packages, in a notebook or on Ray. (The
    Makefile's strict editable install links the package files from build/__editable__.*/:
    their paths resolve to the checkout's.)"""
    (tmp_path / "pathpatch" / "jobs").mkdir(parents=True)
    (tmp_path / "pipeline").mkdir()
    spec = write(tmp_path / "pathpatch" / "jobs", name="shadow", dataset="n = 8")
    clean_env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "RAY_ADDRESS")}
    notebook = subprocess.run(
        [sys.executable, "-c", textwrap.dedent("""\
            import pathlib, pathpatch, pipeline
            from pathpatch.model.loading import load_model
            print(*(pathlib.Path(m.__file__).resolve() for m in (pathpatch, pipeline)),
                  load_model("attn-only-2l").cfg.n_layers)
        """)], cwd=tmp_path, env=clean_env, capture_output=True, text=True, timeout=120)
    assert notebook.returncode == 0, notebook.stderr
    assert notebook.stdout.split() == [str(ROOT / "pathpatch" / "__init__.py"),
                                       str(ROOT / "pipeline" / "__init__.py"), "2"]
    cli = Path(sys.executable).parent / "pathpatch"
    run = subprocess.run([str(cli), "run", str(spec.relative_to(tmp_path)), "--no-progress",
                          "--quiet"], cwd=tmp_path, env=clean_env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr
    assert (tmp_path / "sweeps" / "shadow" / "manifest.json").is_file()
