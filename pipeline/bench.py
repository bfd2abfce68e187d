"""`pathpatch bench pipeline`: what Ray costs and gains on one sweep, as one JSON object.

The same sweep runs in this process (one torch thread), then through Ray with one and with two
workers (one thread each; actors are started before the clock starts, so cluster and worker
start-up are excluded), then the finished sweep is run again. Targets: `ray1_over_inprocess`
>= 0.9 (little overhead), `ray2_over_ray1` >= 1.8 (scales; needs two idle cores),
`resume_evaluations` == 0 (nothing recomputed). Run it alone: anything else computing on the
machine makes the ratios meaningless; `two_processes_over_one_without_ray` measures what
two cores give right now without Ray (the ceiling for `ray2_over_ray1`).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from pipeline.resolve import resolve
from pipeline.spec import load_spec
from pipeline.sweep import SweepOutcome, run_sweep

DEFAULT_SPEC = Path(__file__).resolve().parent.parent / "jobs" / "bench.toml"


def _rows_per_s(outcome: SweepOutcome) -> float:
    """Result rows (hypothesis x example) per second of execution."""
    return outcome.rows / max(outcome.seconds, 1e-9)


def _rows(folder: Path):
    from pipeline.query import open_sweeps

    return open_sweeps(folder).sql("SELECT hypothesis, example, ue, te FROM results "
                                   "ORDER BY hypothesis, example").to_arrow_table()


def _solo(spec_path: str, n_items: int, start_at: float) -> None:
    """Subprocess body: evaluate the first items on one thread from `start_at`; print items/s."""
    from pipeline.sweep import worker_config
    from pipeline.worker import Task, Worker

    torch.set_num_threads(1)
    resolved = resolve(load_spec(spec_path))
    worker = Worker(worker_config(resolved, device="cpu"), model=resolved.model)
    shards = {s.id: s for s in resolved.shards}
    items = resolved.plan.items[:n_items]
    time.sleep(max(0.0, start_at - time.time()))
    start = time.perf_counter()
    for item in items:
        names = tuple(h.name for h in item.hypotheses)
        task = Task(item.id, item.shard.id, tuple(resolved.hypotheses_of(names)))
        worker.evaluate(task, shards[item.shard.id].take(resolved.dataset))
    print(json.dumps({"items_per_s": len(items) / (time.perf_counter() - start)}))


def machine_scaling(spec_path: str | Path, n_items: int = 8) -> float:
    """Throughput of two single-threaded processes at once over one alone, without Ray.

    The ceiling for `ray2_over_ray1` on this machine right now: about 2 on two idle cores,
    less when other work shares them.
    """
    def run(copies: int) -> float:
        start_at = time.time() + 15  # after every process has loaded the model
        code = (f"from pipeline.bench import _solo; _solo({str(spec_path)!r}, {n_items}, "
                f"{start_at})")
        procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE,
                                  stderr=subprocess.DEVNULL, text=True) for _ in range(copies)]
        rates = [json.loads(p.communicate(timeout=600)[0].strip().splitlines()[-1])
                 ["items_per_s"] for p in procs]
        return sum(rates)

    return run(2) / run(1)


def bench_phases(repeats: int = 2) -> int:
    """How many times `bench_pipeline` calls `progress`: three ways per repeat, the resume and
    the scaling without Ray."""
    return 3 * repeats + 2


def bench_pipeline(spec_path: str | Path | None = None, *, keep: str | Path | None = None,
                   repeats: int = 2, progress: Callable[[str], None] | None = None
                   ) -> dict[str, Any]:
    """Time the sweep at `spec_path` (default jobs/bench.toml) three ways; see module doc.

    Each way runs `repeats` times, alternating, into fresh folders; the fastest run counts
    (other load on the machine only ever slows a run down). `progress(phase)` is called as each
    of the `bench_phases(repeats)` phases starts.
    """
    from pipeline.executor import ray_session

    step = progress or (lambda phase: None)
    spec = load_spec(spec_path or DEFAULT_SPEC)
    one = spec.with_resources(workers=1, threads_per_worker=1)
    two = spec.with_resources(workers=2, threads_per_worker=1)
    resolved = resolve(one)
    root = Path(keep) if keep else Path(tempfile.mkdtemp(prefix="pathpatch-bench-"))
    runs: dict[str, list[SweepOutcome]] = {"inprocess": [], "ray1": [], "ray2": []}
    threads = torch.get_num_threads()
    warm = {"warm_start": True}
    try:
        torch.set_num_threads(1)
        for name in [f"{way}-{r}" for r in range(repeats) for way in runs]:
            shutil.rmtree(root / name, ignore_errors=True)
        with ray_session(None):
            for r in range(repeats):
                step(f"in process, run {r + 1}/{repeats}")
                runs["inprocess"].append(run_sweep(
                    one, root / f"inprocess-{r}", backend="inprocess", resolved=resolved,
                    progress=False))
                step(f"Ray, 1 worker, run {r + 1}/{repeats}")
                runs["ray1"].append(run_sweep(one, root / f"ray1-{r}", resolved=resolved,
                                              progress=False, executor_options=warm))
                step(f"Ray, 2 workers, run {r + 1}/{repeats}")
                runs["ray2"].append(run_sweep(two, root / f"ray2-{r}",
                                              resolved=replace(resolved, spec=two),
                                              progress=False, executor_options=warm))
        step("resume of a finished sweep")
        resume = run_sweep(two, root / "ray2-0", resolved=replace(resolved, spec=two),
                           progress=False)
        first = _rows(root / "inprocess-0")
        identical = all(_rows(root / f"{way}-{r}").equals(first)
                        for way in runs for r in range(repeats))
    finally:
        torch.set_num_threads(threads)
        if not keep:
            shutil.rmtree(root, ignore_errors=True)
    step("two plain processes without Ray")
    scaling = machine_scaling(spec_path or DEFAULT_SPEC)
    best = {way: max(outcomes, key=_rows_per_s) for way, outcomes in runs.items()}
    rates = {way: _rows_per_s(o) for way, o in best.items()}
    return {
        "spec": str(spec_path or DEFAULT_SPEC),
        "items": len(resolved.plan.items),
        "examples": resolved.plan.n_examples,
        "hypotheses": len(resolved.hypotheses),
        "repeats": repeats,
        "seconds": {way: round(o.seconds, 3) for way, o in best.items()},
        "rows_per_s": {way: round(v, 1) for way, v in rates.items()},
        "ray1_over_inprocess": round(rates["ray1"] / rates["inprocess"], 3),
        "ray2_over_ray1": round(rates["ray2"] / rates["ray1"], 3),
        "resume_evaluations": resume.evaluations,
        "identical_results": bool(identical),
        "two_processes_over_one_without_ray": round(scaling, 3),
    }
