"""The sweep folder: atomic result files, whole-file checks, stale temps, the driver lock."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pytest

from pipeline.cli import main
from pipeline.plan import HypothesisInfo, Shard, make_plan
from pipeline.store import SweepFolder, SweepLocked, item_status, summarize_status
from tests.pipeline.conftest import ROOT, env, rows, write_spec


def _item():
    shard = Shard(index=0, start=0, stop=2, digest="0" * 64)
    p = make_plan(model_digest="m", shards=(shard,), hypotheses=(HypothesisInfo("h", "all"),),
                  group_size=1, metric="kl", dtype="float32")
    return p.items[0]


def test_write_item_reads_back_and_truncation_is_detected(tmp_path: Path):
    folder, item = SweepFolder(tmp_path), _item()
    table = pa.table({"hypothesis": ["h", "h"], "example": pa.array([0, 1], pa.int64()),
                      "ue": [0.1, 0.2], "te": [1.0, 1.0]})
    path = folder.write_item(item, table, {"spec_hash": "x"})
    assert folder.is_whole(item.id, 2) and folder.is_whole(item.id, 2, full=False)
    assert not folder.is_whole(item.id, 3)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    assert not folder.is_whole(item.id, 2) and not folder.is_whole(item.id, 2, full=False)
    with pytest.raises(Exception, match="expected 2"):
        folder.write_item(item, table.slice(0, 1), {})
    assert not list(tmp_path.glob("items/.*"))  # no temp left behind


def test_stale_temps_are_removed(tmp_path: Path):
    folder = SweepFolder(tmp_path)
    folder.items_dir.mkdir(parents=True)
    stale = folder.items_dir / ".abc.parquet.tmp-123"
    stale.write_bytes(b"partial")
    with folder.locked():
        assert folder.remove_stale_temps() == 1
    assert not stale.exists()


def test_second_driver_is_refused_and_sigkill_releases_the_lock(tmp_path: Path,
                                                                 checkpoint: Path, capsys):
    spec = write_spec(tmp_path, checkpoint)
    out = tmp_path / "out"
    out.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom pipeline.store import SweepFolder\n"
         f"with SweepFolder({str(out)!r}).locked():\n    print('held', flush=True)\n"
         "    time.sleep(300)"],
        stdout=subprocess.PIPE, text=True, cwd=ROOT, env=env())
    try:
        assert holder.stdout.readline().strip() == "held"
        before = sorted(p.name for p in out.iterdir())
        with pytest.raises(SweepLocked, match="in use by another driver"):
            with SweepFolder(out).locked():
                pass
        code = main(["run", str(spec), "--out", str(out), "--backend", "inprocess",
                     "--no-progress"])
        err = capsys.readouterr().err
        assert code == 2 and "in use by another driver" in err and "pid" in err, err
        assert sorted(p.name for p in out.iterdir()) == before  # nothing written
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait(timeout=30)
    time.sleep(0.1)
    assert main(["run", str(spec), "--out", str(out), "--backend", "inprocess",
                 "--no-progress", "--quiet"]) == 0
    assert rows(out).num_rows == 4 * 48


def test_inprocess_run_status_and_resume(tmp_path: Path, checkpoint: Path, capsys):
    spec = write_spec(tmp_path, checkpoint)
    out = tmp_path / "out"
    assert main(["run", str(spec), "--out", str(out), "--backend", "inprocess",
                 "--no-progress", "--quiet"]) == 0
    folder = SweepFolder(out)
    manifest = folder.read_manifest()
    status = summarize_status(item_status(folder, manifest), by="hypothesis")
    assert status["done"] == status["total"] == 6 and status["by_hypothesis"]["direct"] == {
        "done": 3, "failed": 0, "pending": 0, "total": 3}
    assert (out / "spec.toml").read_text() == spec.read_text()
    capsys.readouterr()
    assert main(["status", str(out), "--json", "--by", "shard"]) == 0
    assert '"by_shard"' in capsys.readouterr().out
    assert main(["resume", str(out), "--backend", "inprocess", "--no-progress",
                 "--quiet"]) == 0
    assert "0 computed" in capsys.readouterr().out
    assert main(["status", str(tmp_path)]) == 2
    assert "not a sweep folder" in capsys.readouterr().err


def _items(n: int):
    shards = tuple(Shard(index=i, start=2 * i, stop=2 * i + 2, digest=f"{i + 1:064x}")
                   for i in range(n))
    p = make_plan(model_digest="m", shards=shards, hypotheses=(HypothesisInfo("h", "all"),),
                  group_size=1, metric="kl", dtype="float32")
    return p.items


def _write(folder: SweepFolder, item) -> Path:
    table = pa.table({"hypothesis": ["h", "h"], "example": pa.array([0, 1], pa.int64()),
                      "ue": [0.1, 0.2], "te": [1.0, 1.0]})
    return folder.write_item(item, table, {"spec_hash": "x"})


def _reads(monkeypatch) -> list[str]:
    """Every whole-file read of a result file, by path."""
    import pyarrow.parquet as pq

    read, seen = pq.read_table, []
    monkeypatch.setattr(pq, "read_table", lambda path, *a, **k: seen.append(str(path))
                        or read(path, *a, **k))
    return seen


def test_resume_trusts_the_done_index_and_reads_no_file(tmp_path: Path, monkeypatch):
    folder, items = SweepFolder(tmp_path), _items(4)
    for item in items:
        _write(folder, item)
    reads = _reads(monkeypatch)
    whole, broken = SweepFolder(tmp_path).whole_items([(i.id, 2) for i in items])
    assert whole == {i.id for i in items} and not broken and reads == []
    # a row count the plan no longer expects is not vouched for: the file is read
    whole, broken = SweepFolder(tmp_path).whole_items([(items[0].id, 3)])
    assert (whole, broken) == (set(), {items[0].id}) and len(reads) == 1


def test_a_file_changed_after_it_was_recorded_is_read_in_full_and_redone(tmp_path: Path):
    folder, items = SweepFolder(tmp_path), _items(3)
    paths = [_write(folder, item) for item in items]
    data = paths[0].read_bytes()
    paths[0].write_bytes(data[: len(data) // 2])  # truncated
    data = bytearray(paths[1].read_bytes())
    data[8:40] = bytes(32)  # damaged in place, same size, later mtime
    paths[1].write_bytes(bytes(data))
    st = paths[1].stat()
    os.utime(paths[1], ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    whole, broken = SweepFolder(tmp_path).whole_items([(i.id, 2) for i in items])
    assert whole == {items[2].id} and broken == {items[0].id, items[1].id}


def test_a_file_the_index_does_not_know_is_read_in_full_then_recorded(tmp_path: Path,
                                                                       monkeypatch):
    folder, items = SweepFolder(tmp_path), _items(2)
    for item in items:
        _write(folder, item)
    folder.done_path.unlink()  # e.g. written by a pathpatch before the index
    reads = _reads(monkeypatch)
    assert SweepFolder(tmp_path).whole_items([(i.id, 2) for i in items])[0] == {
        i.id for i in items}
    assert len(reads) == 2
    assert SweepFolder(tmp_path).whole_items([(i.id, 2) for i in items])[0] == {
        i.id for i in items}
    assert len(reads) == 2  # recorded by the first check: not read again


def test_a_line_cut_by_a_crash_is_skipped_and_the_next_one_starts_clean(tmp_path: Path):
    folder, items = SweepFolder(tmp_path), _items(3)
    _write(folder, items[0])
    with open(folder.done_path, "ab") as f:
        f.write(f"{items[1].id}\t12".encode())  # a crash in the middle of a line
    assert set(folder.done_index()) == {items[0].id}
    _write(folder, items[2])
    assert set(folder.done_index()) == {items[0].id, items[2].id}


def test_a_batch_not_yet_made_durable_is_not_vouched_for(tmp_path: Path, monkeypatch):
    import pipeline.store as store

    monkeypatch.setattr(store, "BATCH_SECONDS", 1e9)
    folder, items = SweepFolder(tmp_path), _items(3)
    with folder.locked(), folder.batched():
        path = _write(folder, items[0])
        folder.log("item_done", item=items[0].id)
        assert folder.done_index() == {}  # written, visible whole, not yet synced
        # a power cut now could leave it damaged: the next driver would find it so
        data = bytearray(path.read_bytes())
        data[8:40] = bytes(32)
        path.write_bytes(bytes(data))
        assert SweepFolder(tmp_path).whole_items([(items[0].id, 2)]) == (set(), {items[0].id})
        path.unlink()
        _write(folder, items[1])
        monkeypatch.setattr(store, "BATCH_ITEMS", 2)
        _write(folder, items[2])  # the second of the batch: synced and recorded
        assert set(folder.done_index()) == {items[1].id, items[2].id}
    assert [e["event"] for e in folder.events()] == ["item_done"]
