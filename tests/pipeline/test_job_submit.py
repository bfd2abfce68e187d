"""The README's cluster recipe: `ray start` a head and a second node (auth on), then
`ray job submit -- pathpatch run ...` on that 2-node cluster."""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from pipeline.spec import load_spec
from pipeline.sweep import run_sweep
from tests.pipeline.conftest import ROOT, env, rows, write_spec

pytestmark = pytest.mark.slow



def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.2", 0))
        return s.getsockname()[1]


def _ray_bin() -> str:
    import sys

    return str(Path(sys.executable).parent / "ray")


def _wait_for_nodes(e: dict[str, str], gcs: str, n: int, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    script = (f"import ray; ray.init(address={gcs!r}, log_to_driver=False); "
              "print(sum(x['Alive'] for x in ray.nodes()))")
    while True:
        probe = subprocess.run([_python(), "-c", script], env=e, capture_output=True, text=True,
                               timeout=120)
        if probe.returncode == 0 and probe.stdout.strip().splitlines()[-1:] == [str(n)]:
            return
        assert time.monotonic() < deadline, probe.stdout[-1000:] + probe.stderr[-2000:]
        time.sleep(0.5)


def _python() -> str:
    import sys

    return sys.executable


def _stop(process: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=30)


def test_ray_job_submit_runs_a_sweep(tmp_path: Path, checkpoint: Path):
    # The auth-token trap: once ~/.ray/auth_token exists, `ray start --head` turns token auth
    # on, and Ray commands that do not know it fail. The same RAY_AUTH_MODE everywhere works;
    # a token file of our own keeps the test hermetic (a fresh machine has none).
    token = tmp_path / "auth_token"
    token.write_text(secrets.token_hex(32))
    e = env()
    e["RAY_AUTH_MODE"] = "token"
    e["RAY_AUTH_TOKEN_PATH"] = str(token)
    e.pop("RAY_ADDRESS", None)
    gcs, dash = _free_port(), _free_port()
    log = open(tmp_path / "head.log", "w")
    head = subprocess.Popen(
        [_ray_bin(), "start", "--head", "--block", "--node-ip-address=127.0.0.2",
         f"--port={gcs}", "--num-cpus=1", "--include-dashboard=true",
         "--dashboard-host=127.0.0.2", f"--dashboard-port={dash}",
         "--object-store-memory=100000000", "--disable-usage-stats"],
        env=e, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.2:{dash}"
    node = None
    try:
        deadline = time.monotonic() + 120
        while True:
            probe = subprocess.run([_ray_bin(), "job", "list", "--address", address], env=e,
                                   capture_output=True, text=True, timeout=60)
            if probe.returncode == 0:
                break
            assert time.monotonic() < deadline, probe.stderr[-2000:]
            time.sleep(0.5)
        node_log = open(tmp_path / "node.log", "w")
        node = subprocess.Popen(  # a second node, joining with the same RAY_AUTH_MODE
            [_ray_bin(), "start", f"--address=127.0.0.2:{gcs}", "--block",
             "--node-ip-address=127.0.0.2", "--num-cpus=1", "--object-store-memory=100000000",
             "--disable-usage-stats"],
            env=e, stdout=node_log, stderr=subprocess.STDOUT, start_new_session=True)
        _wait_for_nodes(e, f"127.0.0.2:{gcs}", 2)
        spec = write_spec(tmp_path, checkpoint)
        out = tmp_path / "out"
        job = subprocess.run(
            [_ray_bin(), "job", "submit", "--address", address, "--",
             str(Path(_ray_bin()).parent / "pathpatch"), "run", str(spec), "--out", str(out),
             "--no-progress", "--quiet"],
            env=e, capture_output=True, text=True, timeout=300, cwd=ROOT)
        assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-3000:]
        assert "0 already done, 6 computed, 0 failed" in job.stdout
        # which node ran what is not asserted: the first actor up may finish all six tiny items
        # before the other has started (test_multinode checks the spread, with warm_start)
    finally:
        if node is not None:
            _stop(node)
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
        with contextlib.suppress(ProcessLookupError):
            os.killpg(head.pid, signal.SIGKILL)  # what SIGTERM left of our own cluster
        head.wait(timeout=30)
        log.close()
    ref = tmp_path / "ref"
    run_sweep(load_spec(spec), ref, backend="inprocess", progress=False)
    assert rows(out).select(["hypothesis", "example", "ue", "te"]).equals(
        rows(ref).select(["hypothesis", "example", "ue", "te"]))
