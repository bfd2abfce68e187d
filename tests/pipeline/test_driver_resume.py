"""The driver on stand-in workers (no model): what a resume reads, and that damaged results are
found and computed again (`bench driver`'s sweep, small)."""

from __future__ import annotations

import os
from pathlib import Path

import pyarrow.parquet as pq

from pipeline.driver import Outcome, RunOptions, drive
from pipeline.execution import ExecutorOptions, InProcessExecutor
from pipeline.pipeline_benchmark import (
    StandInWorker,
    _driver_resolved,
    bench_driver,
    stand_in_tables,
)
from pipeline.query import open_sweeps
from pipeline.store import SweepFolder
from pipeline.sweep import SweepRounds


def _drive(resolved, out: Path) -> Outcome:
    outcome = Outcome(folder=out, total=len(resolved.plan.items), metric="logit_diff")
    executor = InProcessExecutor(StandInWorker(stand_in_tables(4)), ExecutorOptions(),
                                 stats=outcome)
    return drive(resolved, SweepFolder(out), SweepRounds(resolved, progress=False), outcome,
                 RunOptions(backend="inprocess", executor=executor))


def test_a_resume_opens_no_result_file_and_redoes_the_damaged_ones(tmp_path: Path, monkeypatch):
    resolved = _driver_resolved(10, 5, "logit_diff")
    out = tmp_path / "sweep"
    first = _drive(resolved, out)
    assert (first.evaluations, first.rows) == (10, 10 * 512)
    folder = SweepFolder(out)
    paths = [folder.item_path(item.id) for item in resolved.plan.items]
    assert len(folder.done_index()) == 10

    read, reads = pq.read_table, []
    monkeypatch.setattr(pq, "read_table", lambda p, *a, **k: reads.append(p) or read(p, *a, **k))
    again = _drive(resolved, out)
    assert (again.reused, again.evaluations, again.redone, reads) == (10, 0, 0, [])

    paths[0].write_bytes(paths[0].read_bytes()[:100])  # truncated
    data = bytearray(paths[1].read_bytes())
    data[4:200] = bytes(196)  # damaged in place, later mtime
    paths[1].write_bytes(bytes(data))
    st = paths[1].stat()
    os.utime(paths[1], ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    paths[2].unlink()  # gone
    fixed = _drive(resolved, out)
    assert (fixed.reused, fixed.evaluations, fixed.redone) == (7, 3, 2)
    assert len(reads) == 2  # only the two files the index no longer vouched for
    events = [e for e in folder.events() if e["event"] == "broken_file_removed"]
    assert sorted(e["item"] for e in events) == sorted(p.stem for p in paths[:2])
    # every item reads back through the views, provenance included
    con = open_sweeps(out)
    assert con.sql("SELECT count(*), count(DISTINCT item) FROM results").fetchall() == [
        (10 * 512, 10)]
    assert {"hypothesis", "example", "ue", "te", "m", "m_clean", "m_cf", "item", "shard"} <= set(
        con.sql("SELECT * FROM results LIMIT 1").columns)


def test_bench_driver_reports_throughput_memory_and_the_resume(tmp_path: Path):
    result = bench_driver(items=50, shards=5, keep=tmp_path, bar=False)
    assert (result["items"], result["rows"], result["files"], result["failed"]) == (
        50, 50 * 512, 50, 0)
    assert result["items_per_s"] > 0 and result["rows_per_s"] > 0
    assert result["resume_reused"] == 50 and result["resume_evaluations"] == 0
    assert "vector_extensions" in result and "50" in result["rss_mib_after_items"]
