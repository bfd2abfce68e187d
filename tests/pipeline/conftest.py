"""Shared pieces of the pipeline tests: a tiny random checkpoint, spec writing, row reading."""

from __future__ import annotations

import os
import sys
import textwrap
from pathlib import Path

import pyarrow as pa
import pytest
import torch

from pathpatch.model.loading import build_model, save_checkpoint
from pathpatch.model.sources import INDUCTION_ARCH

ROOT = Path(__file__).resolve().parents[2]
PATHPATCH = [sys.executable, "-m", "pipeline.cli"]
HYPOTHESES = """
[[hypotheses]]
name = "direct"
pattern = "in -> out"

[[hypotheses]]
name = "via a1"
pattern = "in -> ... -> a1.* -> out"

[[hypotheses]]
name = "prev-token K"
pattern = "in -> a0.* -> a1.*[k] -> out"

[[hypotheses]]
name = "not a0.0"
pattern = "~a0.0"
"""


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory) -> Path:
    """A random model with the bundled induction architecture, saved as a checkpoint."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("model") / "tiny.safetensors"
    save_checkpoint(build_model(INDUCTION_ARCH), INDUCTION_ARCH, path)
    return path


def write_spec(folder: Path, checkpoint: Path, *, name: str = "spec", n: int = 48,
               shard_size: int = 16, group_size: int = 2, hypotheses: str = HYPOTHESES,
               metric: str = "kl", workers: int = 2, top: str = "", execution: str = "",
               dataset: str | None = None) -> Path:
    """Write a small sweep spec over `checkpoint` and return its path."""
    dataset = dataset or f'kind = "induction"\nn = {n}'
    text = textwrap.dedent(f"""\
        name = "{name}"
        model = "{checkpoint}"
        metric = "{metric}"
        shard_size = {shard_size}
        group_size = {group_size}
        seed = 3
        {top}
        [dataset]
        {dataset}

        [resources]
        workers = {workers}
        threads_per_worker = 1

        [execution]
        {execution}
        """) + hypotheses
    path = folder / f"{name}.toml"
    path.write_text(text)
    return path


def rows(*folders: Path) -> pa.Table:
    """Every current per-example row of the sweep folders, in a fixed order."""
    from pipeline.query import open_sweeps

    con = open_sweeps(*folders)
    return con.sql("SELECT hypothesis, example, ue, te, item, shard FROM results "
                   "ORDER BY hypothesis, example").to_arrow_table()


def env() -> dict[str, str]:
    """Environment for subprocess drivers: this repo importable, no progress noise."""
    e = dict(os.environ)
    e["PYTHONPATH"] = str(ROOT) + os.pathsep + e.get("PYTHONPATH", "")
    return e


@pytest.fixture(scope="module")
def ray_local():
    """One small local Ray cluster for a test module; yields its GCS address."""
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, object_store_memory=100 * 2**20,
             log_to_driver=False)
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()


def sigkill_driver_after(args: list[str], items: Path, count: int, *, poll_s: float) -> None:
    """Run `pathpatch <args>` in a subprocess and SIGKILL it once `items` holds `count` result
    files (or it ended, or 120 s passed): a driver killed mid-run."""
    import signal
    import subprocess
    import time

    driver = subprocess.Popen(PATHPATCH + args, cwd=ROOT, env=env(),
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and driver.poll() is None:
        if items.is_dir() and len(list(items.glob("*.parquet"))) >= count:
            break
        time.sleep(poll_s)
    os.kill(driver.pid, signal.SIGKILL)
    driver.wait(timeout=30)
