"""End to end on one local Ray cluster: run, resume after SIGKILL, faults, edits, bad files."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

import pyarrow.compute as pc
import pytest

from pipeline.spec import load_spec
from pipeline.store import SweepFolder, item_status, summarize_status
from pipeline.sweep import run_sweep
from tests.pipeline.conftest import (
    HYPOTHESES,
    PATHPATCH,
    ROOT,
    env,
    rows,
    sigkill_driver_after,
    write_spec,
)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def reference(tmp_path_factory, checkpoint: Path):
    """The sweep run uninterrupted, in process (no Ray): the rows every variant must equal."""
    tmp = tmp_path_factory.mktemp("reference")
    spec = write_spec(tmp, checkpoint)
    run_sweep(load_spec(spec), tmp / "out", backend="inprocess", progress=False)
    return rows(tmp / "out")


def _same_rows(a, b) -> None:
    assert a.num_rows == b.num_rows
    assert a.select(["hypothesis", "example", "ue", "te"]).equals(
        b.select(["hypothesis", "example", "ue", "te"]))


def test_run_on_local_ray_then_rerun_skips_everything(ray_local, tmp_path, checkpoint,
                                                      reference):
    spec = load_spec(write_spec(tmp_path, checkpoint))
    first = run_sweep(spec, tmp_path / "out", progress=False,
                      executor_options={"warm_start": True})
    assert (first.evaluations, first.failed, first.reused) == (6, 0, 0)
    _same_rows(rows(tmp_path / "out"), reference)  # Ray == in process, bitwise
    # locality: an actor takes the next group of a shard it holds; it takes another's shard
    # only rather than sit idle (so 6 items cost at most 4 shard transfers here, not 6)
    folder = SweepFolder(tmp_path / "out")
    shard_of = {i["id"]: i["shard"] for i in folder.read_manifest()["items"]}
    ran_on = {}
    for e in folder.events():
        if e["event"] == "item_done":
            ran_on.setdefault(shard_of[e["item"]], set()).add(e["pid"])
    assert sorted(ran_on) == [0, 1, 2], ran_on
    assert len(ran_on[0]) == len(ran_on[1]) == 1 and sum(map(len, ran_on.values())) <= 4
    assert len(set().union(*ran_on.values())) == 2  # and both actors worked
    again = run_sweep(spec, tmp_path / "out", progress=False)
    assert (again.evaluations, again.reused) == (0, 6)


def test_sigkill_driver_then_resume(ray_local, tmp_path, checkpoint):
    spec = write_spec(tmp_path, checkpoint, metric="tests.pipeline.slow_metric:slow_kl",
                      group_size=1, workers=1)
    expected = rows_of_uninterrupted(tmp_path, spec)
    out = tmp_path / "out"
    items = out / "items"
    sigkill_driver_after(["run", str(spec), "--out", str(out), "--address", ray_local,
                          "--no-progress", "--quiet"], items, 2, poll_s=0.02)
    folder = SweepFolder(out)
    status = summarize_status(item_status(folder, folder.read_manifest(), full=True))
    assert 0 < status["done"] < status["total"] == 12, status  # partial state
    assert status["failed"] == 0

    resumed = subprocess.run(PATHPATCH + ["resume", str(out), "--address", ray_local,
                                          "--no-progress", "--quiet"],
                             cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert f"{status['done']} already done, {12 - status['done']} computed" in resumed.stdout
    got = rows(out)
    _same_rows(got, expected)  # identical, nothing missing, nothing duplicated
    assert not list(items.glob(".*"))  # no temp files left


def rows_of_uninterrupted(tmp_path: Path, spec: Path):
    ref = tmp_path / "uninterrupted"
    run_sweep(load_spec(spec), ref, backend="inprocess", progress=False)
    return rows(ref)


def test_actor_killed_mid_item_is_replaced_and_requeued(ray_local, tmp_path, checkpoint,
                                                        reference):
    spec = load_spec(write_spec(tmp_path, checkpoint))
    killed = []

    def kill_first(event, **fields):
        if event == "submitted" and not killed:
            os.kill(fields["pid"], signal.SIGKILL)
            killed.append(fields["item"])

    outcome = run_sweep(spec, tmp_path / "out", progress=False, on_event=kill_first)
    assert killed and outcome.requeues >= 1 and outcome.failed == 0
    _same_rows(rows(tmp_path / "out"), reference)
    events = [e["event"] for e in SweepFolder(tmp_path / "out").events()]
    assert "worker_lost" in events and "requeued" in events and "worker_replaced" in events


def test_truncated_file_is_redone(ray_local, tmp_path, checkpoint, reference):
    spec = load_spec(write_spec(tmp_path, checkpoint))
    run_sweep(spec, tmp_path / "out", progress=False, backend="inprocess")
    victim = sorted((tmp_path / "out" / "items").glob("*.parquet"))[0]
    victim.write_bytes(victim.read_bytes()[:100])
    (tmp_path / "out" / "items" / ".stale.parquet.tmp-1").write_bytes(b"x")
    again = run_sweep(spec, tmp_path / "out", progress=False)
    assert (again.redone, again.evaluations, again.reused) == (1, 1, 5)
    _same_rows(rows(tmp_path / "out"), reference)
    assert not (tmp_path / "out" / "items" / ".stale.parquet.tmp-1").exists()


def test_adding_a_hypothesis_runs_only_its_items(ray_local, tmp_path, checkpoint):
    spec_path = write_spec(tmp_path, checkpoint)
    run_sweep(load_spec(spec_path), tmp_path / "out", progress=False, backend="inprocess")
    before = rows(tmp_path / "out")
    extra = '\n[[hypotheses]]\nname = "only a1.1"\npattern = "in -> a1.1 -> out"\n'
    spec_path.write_text(spec_path.read_text() + extra)
    outcome = run_sweep(load_spec(spec_path), tmp_path / "out", progress=False)
    assert (outcome.evaluations, outcome.reused) == (3, 6)  # one new group x 3 shards
    after = rows(tmp_path / "out")
    assert after.num_rows == before.num_rows + 48
    old = after.filter(pc.not_equal(after["hypothesis"], "only a1.1"))
    _same_rows(old, before)
    # and after removing hypotheses, the views show the current spec's items only
    spec_path.write_text(spec_path.read_text().replace(HYPOTHESES, "\n[[hypotheses]]\n"
                                                       'name = "direct"\npattern = "in -> out"\n'))
    outcome = run_sweep(load_spec(spec_path), tmp_path / "out", progress=False)
    assert outcome.evaluations == 3  # group ("direct", "only a1.1") is new
    current = rows(tmp_path / "out")
    assert sorted(set(current["hypothesis"].to_pylist())) == ["direct", "only a1.1"]
    assert current.num_rows == 2 * 48


def test_poison_item_fails_after_capped_attempts_and_the_sweep_goes_on(ray_local, tmp_path,
                                                                        checkpoint, capsys):
    from pipeline.cli import main

    spec = write_spec(tmp_path, checkpoint, metric="tests.pipeline.slow_metric:poison_kl",
                      execution="max_attempts = 2")
    out = tmp_path / "out"
    code = main(["run", str(spec), "--out", str(out), "--no-progress", "--quiet",
                 "--address", ray_local])
    assert code == 1
    assert "failed every attempt" in capsys.readouterr().err
    assert main(["status", str(out), "--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    # example 20 lies in shard 1: both of its groups fail, the 4 other items are done
    assert (status["done"], status["failed"], status["pending"]) == (4, 2, 0)
    assert all("poisoned example 20" in f["error"] and f["attempts"] == 2
               for f in status["failures"])


def test_hung_item_times_out_and_nothing_hangs(ray_local, tmp_path, checkpoint):
    spec = load_spec(write_spec(tmp_path, checkpoint, metric="tests.pipeline.slow_metric:hang_kl",
                                execution="max_attempts = 1\nitem_timeout_s = 4",
                                hypotheses=HYPOTHESES.split("[[hypotheses]]\nname = \"via")[0]))
    outcome = run_sweep(spec, tmp_path / "out", progress=False)  # returns: the hang was cut
    assert (outcome.evaluations, outcome.failed) == (2, 1)
    failure = next(iter(SweepFolder(tmp_path / "out").failures().values()))
    assert "timed out" in failure["error"]


def test_a_result_that_arrives_after_the_timeout_is_a_timeout(ray_local, tmp_path, checkpoint):
    """item_timeout_s is enforced even when the call finishes between two deadline checks."""
    spec = load_spec(write_spec(tmp_path, checkpoint, metric="tests.pipeline.slow_metric:slow_kl",
                                execution="max_attempts = 1\nitem_timeout_s = 0.05"))
    outcome = run_sweep(spec, tmp_path / "out", progress=False)
    assert (outcome.evaluations, outcome.failed) == (0, 6)
    errors = [f["error"] for f in SweepFolder(tmp_path / "out").failures().values()]
    # cut by the deadline check, or refused on arrival when it finished between two checks
    assert len(errors) == 6 and all("timed out after 0.05 s" in e or "over item_timeout_s = 0.05 s"
                                    in e for e in errors), errors


def test_cli_run_and_status_through_subprocess(ray_local, tmp_path, checkpoint):
    spec = write_spec(tmp_path, checkpoint)
    out = tmp_path / "out"
    run = subprocess.run(PATHPATCH + ["run", str(spec), "--out", str(out), "--address",
                                      ray_local],
                         cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "items" in run.stderr and "ex_per_s" in run.stderr  # tqdm progress
    assert "proportion_explained" in run.stdout
    status = subprocess.run(PATHPATCH + ["status", str(out), "--by", "hypothesis"], cwd=ROOT,
                            env=env(), capture_output=True, text=True, timeout=120)
    assert "6 done, 0 failed, 0 pending of 6" in status.stdout, status.stdout


def test_items_folder_holds_exactly_the_views_rows_across_spec_edits(tmp_path, checkpoint):
    """Files of items a spec no longer names move to superseded/ (and back, for free, when a
    spec names them again), so reading items/*.parquet directly gives the results view."""
    import duckdb

    spec_path = write_spec(tmp_path, checkpoint)
    out = tmp_path / "out"
    full_text = spec_path.read_text()
    run_sweep(load_spec(spec_path), out, progress=False, backend="inprocess")
    spec_path.write_text(full_text.replace(HYPOTHESES, HYPOTHESES.split("[[hypotheses]]\nname = \"prev")[0]))
    run_sweep(load_spec(spec_path), out, progress=False, backend="inprocess")

    def direct():
        with duckdb.connect() as con:  # not duckdb.sql: its default connection lives to exit
            return con.sql(f"SELECT hypothesis, example, ue, te, item, shard FROM "
                           f"'{out}/items/*.parquet' ORDER BY hypothesis, "
                           "example").to_arrow_table()

    assert sorted(p.name for p in (out / "superseded").iterdir())  # the removed group's files
    assert direct().equals(rows(out)) and direct().num_rows == 2 * 48
    spec_path.write_text(full_text)  # the spec as it was: nothing to recompute
    again = run_sweep(load_spec(spec_path), out, progress=False, backend="inprocess")
    assert (again.evaluations, again.reused) == (0, 6)
    assert list((out / "superseded").iterdir()) == []
    assert direct().equals(rows(out)) and direct().num_rows == 4 * 48
