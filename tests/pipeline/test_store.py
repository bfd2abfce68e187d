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
