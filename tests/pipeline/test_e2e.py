"""End to end on one local Ray cluster: run, resume after SIGKILL, faults, edits, bad files."""

from __future__ import annotations

import json
import os
import re
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
    submitted = []  # (item, actor, its pid), in the order the driver handed them out

    def record(event, **fields):
        if event == "submitted":
            submitted.append((fields["item"], fields["worker"], fields["pid"]))

    first = run_sweep(spec, tmp_path / "out", progress=False, on_event=record,
                      executor_options={"warm_start": True})
    assert (first.evaluations, first.failed, first.reused) == (6, 0, 0)
    _same_rows(rows(tmp_path / "out"), reference)  # Ray == in process, bitwise
    # locality: an actor takes the next group of a shard it holds; it takes another's shard
    # only rather than sit idle. warm_start: both actors are up before the first fill, which
    # queues 2 calls on each (6 items wait, more than 2 per actor): both groups of shard 0 on
    # actor 0, both of shard 1 (nobody holds it) on actor 1; shard 2 goes to whichever is
    # free first, so 6 items cost 3 or 4 shard transfers, not 6
    folder = SweepFolder(tmp_path / "out")
    shard_of = {i["id"]: i["shard"] for i in folder.read_manifest()["items"]}
    assert [(shard_of[i], w) for i, w, _ in submitted[:4]] == [(0, 0), (0, 0), (1, 1), (1, 1)]
    assert len(submitted) == 6 and [shard_of[i] for i, *_ in submitted[4:]] == [2, 2]
    assert len({(w, shard_of[i]) for i, w, _ in submitted}) in (3, 4)
    # two actor processes, and each item's rows came from the process it was handed to
    pid_of = {w: pid for _, w, pid in submitted}
    assert sorted(pid_of) == [0, 1] and len(set(pid_of.values())) == 2
    assert all(pid_of[w] == pid for _, w, pid in submitted)
    done_by = {e["item"]: e["pid"] for e in folder.events() if e["event"] == "item_done"}
    assert done_by == {i: pid for i, _, pid in submitted}
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
    submitted = []  # (item, actor, its pid)

    def kill_first(event, **fields):
        if event == "submitted":
            if not submitted:
                os.kill(fields["pid"], signal.SIGKILL)
            submitted.append((fields["item"], fields["worker"], fields["pid"]))

    outcome = run_sweep(spec, tmp_path / "out", progress=False, on_event=kill_first)
    # the first actor up is handed 2 calls at once (6 items wait, more than 2 per actor): the
    # killed one and the one queued behind it; both are requeued, and only the first is
    # charged an attempt
    (item, worker, pid), (queued, worker_2, _) = submitted[:2]
    assert worker_2 == worker and queued != item
    assert (outcome.evaluations, outcome.requeues, outcome.failed) == (6, 2, 0)
    _same_rows(rows(tmp_path / "out"), reference)
    events = SweepFolder(tmp_path / "out").events()
    lost = [e for e in events if e["event"] == "worker_lost"]
    assert [(e["worker"], e["pid"], e["items"]) for e in lost] == [(worker, pid, [item, queued])]
    assert [(e["item"], e["attempts"]) for e in events if e["event"] == "requeued"] == [
        (item, 1), (queued, 0)]
    assert [e["worker"] for e in events if e["event"] == "worker_replaced"] == [worker]
    # the killed process ran nothing more; both items were done again by live actors
    done_by = {e["item"]: e["pid"] for e in events if e["event"] == "item_done"}
    assert pid not in done_by.values() and {item, queued} <= done_by.keys()


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
    """item_timeout_s is enforced even when the call finishes between two deadline checks.

    No race: one actor, one call at a time, and a poll longer than the test, so the driver
    checks deadlines only after each result has arrived; every call sleeps 0.15 s (slow_kl)
    from its submission on, past its 0.05 s, so every result arrives late and is refused on
    arrival (the deadline check's own path is test_hung_item_times_out_and_nothing_hangs)."""
    spec = load_spec(write_spec(tmp_path, checkpoint, metric="tests.pipeline.slow_metric:slow_kl",
                                workers=1, execution="max_attempts = 1\nitem_timeout_s = 0.05\n"
                                                     "in_flight_per_worker = 1"))
    outcome = run_sweep(spec, tmp_path / "out", progress=False,
                        executor_options={"poll_s": 600.0})
    assert (outcome.evaluations, outcome.failed, outcome.requeues) == (0, 6, 0)
    folder = SweepFolder(tmp_path / "out")
    errors = [f["error"] for f in folder.failures().values()]
    assert len(errors) == 6 and all(
        re.fullmatch(r"took \S+ s, over item_timeout_s = 0\.05 s", e) for e in errors), errors
    assert all(float(e.split()[1]) >= 0.15 for e in errors), errors
    # refused on arrival: its actor finished the call and lives on (none lost or replaced)
    events = [e["event"] for e in folder.events()]
    assert "worker_lost" not in events and "worker_replaced" not in events, events


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
