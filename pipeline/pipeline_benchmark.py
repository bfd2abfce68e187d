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
import os
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

from pathpatch.engine.evaluation import compile_all
from pathpatch.engine.stage_plan import GroupPlan
from pathpatch.language.hypotheses import Facts
from pathpatch.model.graph import Graph
from pathpatch.model.loading import build_model, save_checkpoint
from pathpatch.tools.engine_benchmarks import SHAPES, cpu_description
from pipeline.driver import Outcome, RunOptions, drive, prepare_ray_environment, worker_config
from pipeline.execution import ExecutorOptions, InProcessExecutor
from pipeline.plan import HypothesisInfo, Shard, make_plan
from pipeline.query import open_sweeps
from pipeline.resolve import Resolved, resolve
from pipeline.spec import load_spec, parse_spec
from pipeline.store import SweepFolder
from pipeline.sweep import SweepRounds, run_sweep
from pipeline.worker import TaskInfo, Worker

DEFAULT_SPEC = Path(__file__).resolve().parent.parent / "jobs" / "bench.toml"


def _rows_per_s(outcome: Outcome) -> float:
    """Result rows (hypothesis x example) per second of execution."""
    return outcome.rows / max(outcome.seconds, 1e-9)


def _rows(folder: Path):
    return open_sweeps(folder).sql("SELECT hypothesis, example, ue, te FROM results "
                                   "ORDER BY hypothesis, example").to_arrow_table()


def _solo(spec_path: str, n_items: int, start_at: float) -> None:
    """Subprocess body: evaluate the first items on one thread from `start_at`; print items/s."""
    torch.set_num_threads(1)
    resolved = resolve(load_spec(spec_path))
    worker = Worker(worker_config(resolved, device="cpu"), model=resolved.model)
    shards = {s.id: s for s in resolved.shards}
    rounds = SweepRounds(resolved, progress=False)
    items = resolved.plan.items[:n_items]
    time.sleep(max(0.0, start_at - time.time()))
    start = time.perf_counter()
    for item in items:
        worker.run(rounds.task(item), shards[item.shard.id].take(resolved.dataset))
    print(json.dumps({"items_per_s": len(items) / (time.perf_counter() - start)}))


def machine_scaling(spec_path: str | Path, n_items: int = 8) -> float:
    """Throughput of two single-threaded processes at once over one alone, without Ray.

    The ceiling for `ray2_over_ray1` on this machine right now: about 2 on two idle cores,
    less when other work shares them.
    """
    def run(copies: int) -> float:
        start_at = time.time() + 15  # after every process has loaded the model
        code = (f"from pipeline.pipeline_benchmark import _solo; _solo({str(spec_path)!r}, {n_items}, "
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
    prepare_ray_environment(None)
    from pipeline.ray_executor import ray_session  # Ray loads only when a run uses it

    step = progress or (lambda phase: None)
    spec = load_spec(spec_path or DEFAULT_SPEC)
    one = spec.with_resources(workers=1, threads_per_worker=1)
    two = spec.with_resources(workers=2, threads_per_worker=1)
    resolved = resolve(one)
    root = Path(keep) if keep else Path(tempfile.mkdtemp(prefix="pathpatch-bench-"))
    runs: dict[str, list[Outcome]] = {"inprocess": [], "ray1": [], "ray2": []}
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
    scaling = machine_scaling(spec_path or DEFAULT_SPEC, n_items=min(96, len(resolved.plan.items)))
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


# --- bench scan ----------------------------------------------------------------------------------

SCAN_ARCH = dict(SHAPES["gpt2-small"], n_ctx=64)
"""GPT-2 small's shape (random weights: nothing is downloaded)."""
SCAN_PHASES = 4


def _scan_spec(model: Path, pairs: int, seq_len: int, group_size: int, vocab: int,
               device: str, memory_budget: int | None) -> str:
    resources = ("gpus_per_worker = 1\n" if device == "cuda" else "threads_per_worker = 1\n")
    if memory_budget is not None:
        resources += f"memory_budget = {memory_budget}\n"
    return (f'name = "scan"\nmodel = "{model}"\nshard_size = {pairs}\ngroup_size = {group_size}\n'
            f'[dataset]\nkind = "induction"\nn = {pairs}\nseq_len = {seq_len}\n'
            f'vocab_size = {vocab}\n[resources]\nworkers = 1\n{resources}'
            '[[hypotheses]]\nfamily = "edge_removal"\n')


def bench_scan(*, pairs: int = 16, seq_len: int = 32, sample_items: int = 3, group_size: int = 64,
               keep: str | Path | None = None, progress: Callable[[str], None] | None = None,
               arch: dict[str, Any] | None = None, device: str = "cpu",
               memory_budget: int | None = None) -> dict[str, Any]:
    """The full single-edge scan of a GPT-2-small-shaped model, planned whole, with a fixed
    sample of its items (evenly spaced over the plan) run through the pipeline; see
    docs/PIPELINE.md for what each figure means.

    On "cpu" the items run in this process on one torch thread; on "cuda" they run on one Ray
    actor holding one GPU (what a GPU sweep does), and `memory_budget` (bytes per engine call)
    lets the engine use the GPU's memory. `progress(phase)` is called as each of the
    SCAN_PHASES phases starts; `arch` replaces the GPT-2-small shape (tests use a tiny one).
    """
    import resource

    if sample_items < 1 or pairs < 1:
        raise ValueError("sample_items and pairs must be >= 1")
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device {device!r}: allowed are cpu, cuda")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device cuda: torch sees no CUDA device here")
    step = progress or (lambda phase: None)
    root = Path(keep) if keep else Path(tempfile.mkdtemp(prefix="pathpatch-scan-"))
    threads = torch.get_num_threads()
    try:
        step("build and save the GPT-2-small-shaped model")
        root.mkdir(parents=True, exist_ok=True)
        arch = dict(arch or SCAN_ARCH)
        checkpoint = root / ("gpt2-small-shape.safetensors" if arch == SCAN_ARCH else
                             "scan-model.safetensors")
        if not checkpoint.exists():
            torch.manual_seed(0)
            save_checkpoint(build_model(arch), arch, checkpoint)
        spec_path = root / "scan.toml"
        spec_path.write_text(_scan_spec(checkpoint, pairs, seq_len, group_size, arch["d_vocab"],
                                        device, memory_budget))
        spec = load_spec(spec_path)

        step("validate and plan the whole scan")
        start = time.perf_counter()
        resolved = resolve(spec)
        plan_s = time.perf_counter() - start
        peak_after_plan = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        plan = resolved.plan
        k = min(sample_items, len(plan.items))
        sample = tuple(plan.items[round(i * (len(plan.items) - 1) / max(k - 1, 1))] for i in range(k))

        step(f"compile and schedule the {k} sampled items' groups on their own")
        torch.set_num_threads(1)
        graph = Graph.from_model(resolved.model)
        compile_s = schedule_s = 0.0
        rounds = SweepRounds(resolved, progress=False)
        for item in sample:
            hyps = rounds.task(item).hypotheses  # a scan's items are all evaluations
            t0 = time.perf_counter()
            copy_graphs = compile_all(graph, hyps)
            t1 = time.perf_counter()
            GroupPlan(graph, copy_graphs)
            compile_s += t1 - t0
            schedule_s += time.perf_counter() - t1

        step(f"run the {k} sampled items through the pipeline")
        out = root / "sweep"
        shutil.rmtree(out, ignore_errors=True)
        subset = replace(resolved, plan=replace(plan, items=sample))
        if device == "cpu":
            outcome = run_sweep(spec, out, backend="inprocess", resolved=subset, progress=False)
        else:
            outcome = run_sweep(spec, out, resolved=subset, progress=False,
                                executor_options={"warm_start": True})
        item_s = sum(e["seconds"] for e in SweepFolder(out).events() if e["event"] == "item_done")
        model = resolved.model.to(device)
        tokens = resolved.dataset.reference[:pairs].to(device)
        forward_s = min(_timed(lambda: model(tokens)) for _ in range(3))
    finally:
        torch.set_num_threads(threads)
        if not keep:
            shutil.rmtree(root, ignore_errors=True)
    n_hyp = sum(len(item.hypotheses) for item in sample)
    total_s = outcome.seconds
    per_hyp_example = total_s / (n_hyp * pairs)
    return {
        **cpu_description(), "device": device if device == "cpu" else
        torch.cuda.get_device_name(0),
        "model_shape": {k: arch[k] for k in ("n_layers", "n_heads", "d_model", "d_mlp", "d_vocab")},
        "hypotheses": len(plan.hypotheses), "items": len(plan.items), "pairs": pairs,
        "seq_len": seq_len, "group_size": group_size,
        "validate_and_plan_s": round(plan_s, 2),
        "driver_peak_rss_mib_after_plan": round(peak_after_plan, 1),
        "sampled_items": k, "sampled_hypotheses": n_hyp, "failed": outcome.failed,
        "sample_wall_s": round(total_s, 2),
        "share_compile": round(compile_s / total_s, 4),
        "share_schedule": round(schedule_s / total_s, 4),
        "share_evaluate": round(item_s / total_s, 4),  # includes compile and schedule
        "share_write_and_driver": round(max(total_s - item_s, 0.0) / total_s, 4),
        "forward_s": round(forward_s, 4),
        "forwards_per_hypothesis": round(total_s / n_hyp / forward_s, 3),
        "hypotheses_per_s_per_worker": round(n_hyp / total_s, 3),
        "projected_hours_1000_prompts_one_worker": round(
            len(plan.hypotheses) * 1000 * per_hyp_example / 3600, 1),
    }


def _timed(fn: Callable[[], Any]) -> float:
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    with torch.inference_mode():
        sync()
        start = time.perf_counter()
        fn()
        sync()
        return time.perf_counter() - start


# --- bench driver --------------------------------------------------------------------------------

DRIVER_PHASES = 4


class StandInWorker:
    """A worker without a model: hands back a precomputed result table for every item, at most
    `rate` items per second (None: as fast as the driver takes them), so that what is measured
    is the driver's path alone (check, Parquet write with provenance, event log, progress).

    It also notes the driver's resident memory after the item counts in `marks`.
    """

    node = "stand-in"

    def __init__(self, tables: list[Any], *, rate: float | None = None,
                 marks: tuple[int, ...] = ()):
        self.tables = tables
        self.rate = rate
        self.marks = set(marks)
        self.rss: dict[int, int] = {}
        self.calls = 0
        self.started: float | None = None

    def holds(self, shard_id: str) -> bool:
        return True  # the shards' data is never asked for

    def run(self, task: Any, data: Any = None) -> tuple[Any, Any]:
        if self.calls in self.marks:
            self.rss[self.calls] = rss_bytes()
        if self.started is None:
            self.started = time.perf_counter()
        elif self.rate:  # the item is ready at its slot of the set rate, not before
            wait = self.started + self.calls / self.rate - time.perf_counter()
            if wait > 0:
                time.sleep(wait)
        table = self.tables[self.calls % len(self.tables)]
        self.calls += 1
        return table, TaskInfo(node=self.node, pid=0, seconds=0.0, examples=DRIVER_SHARD_SIZE)


def rss_bytes() -> int:
    """This process's resident memory now (Linux; 0 elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * (os.sysconf("SC_PAGE_SIZE"))
    except (OSError, ValueError):
        return 0


DRIVER_SHARD_SIZE = 64
DRIVER_GROUP_SIZE = 8


def _driver_resolved(items: int, shards: int, metric: str) -> Any:
    """A scan-like sweep of `items` items (`shards` shards x items/shards groups of 8 edge
    removals, 64 examples per shard) as `drive` takes it, with no model or data behind it."""
    if items < shards or items % shards:
        raise ValueError(f"items {items}: give a multiple of shards ({shards})")
    n_hyp = items // shards * DRIVER_GROUP_SIZE
    edges = [str(e) for e in Graph(n_layers=12, n_heads=12, has_mlp=True).edges]
    names = [edges[i % len(edges)] + (f"#{i // len(edges)}" if i >= len(edges) else "")
             for i in range(n_hyp)]
    hypotheses = tuple(HypothesisInfo(f"remove {e}", f"remove({e})", 40, 0.5,
                                      facts=Facts("edge_removal", "remove_edge", e.split("#")[0]))
                       for e in names)
    shard_list = tuple(Shard(i, i * DRIVER_SHARD_SIZE, (i + 1) * DRIVER_SHARD_SIZE, f"{i + 1:064x}")
                       for i in range(shards))
    plan = make_plan(model_digest="stand-in-" + "0" * 55, shards=shard_list,
                     hypotheses=hypotheses, group_size=DRIVER_GROUP_SIZE, metric=metric,
                     dtype="float32")
    spec = parse_spec(f'name = "driver"\nmodel = "attn-only-2l"\nmetric = "{metric}"\n'
                      f'shard_size = {DRIVER_SHARD_SIZE}\ngroup_size = {DRIVER_GROUP_SIZE}\n'
                      f'[dataset]\nkind = "induction"\nn = {shards * DRIVER_SHARD_SIZE}\n'
                      '[[hypotheses]]\nfamily = "edge_removal"\n', default_name="driver")
    return Resolved(spec=spec, model=None, dataset=None, shards=shard_list,
                    hypotheses=hypotheses, plan=plan)


def stand_in_tables(n_tables: int = 16, *, values: bool = True, seed: int = 0) -> list[Any]:
    """Result tables as an Evaluate item returns them (8 hypotheses x 64 examples: hypothesis,
    example, ue, te and, for a metric with a statistic, m, m_clean, m_cf), random values."""
    import numpy as np
    import pyarrow as pa

    rng = np.random.default_rng(seed)
    edges = [str(e) for e in Graph(n_layers=12, n_heads=12, has_mlp=True).edges]
    n_h, n_ex = DRIVER_GROUP_SIZE, DRIVER_SHARD_SIZE
    out = []
    for t in range(n_tables):
        names = [f"remove {edges[(t * n_h + i) % len(edges)]}" for i in range(n_h)]
        te = rng.gamma(2.0, 1.0, n_ex)
        columns = {
            "hypothesis": pa.array(np.repeat(names, n_ex), pa.string()),
            "example": pa.array(np.tile(np.arange(n_ex) + t * n_ex, n_h), pa.int64()),
            "ue": pa.array(np.tile(te, n_h) * rng.random(n_ex * n_h), pa.float64()),
            "te": pa.array(np.tile(te, n_h), pa.float64()),
        }
        if values:
            m_clean, m_cf = rng.normal(3.0, 1.0, n_ex), rng.normal(0.0, 1.0, n_ex)
            columns["m"] = pa.array(rng.normal(1.5, 1.0, n_ex * n_h), pa.float64())
            columns["m_clean"] = pa.array(np.tile(m_clean, n_h), pa.float64())
            columns["m_cf"] = pa.array(np.tile(m_cf, n_h), pa.float64())
        out.append(pa.table(columns))
    return out


def bench_driver(*, items: int = 10_000, shards: int = 25, rate: float | None = None,
                 keep: str | Path | None = None, progress: Callable[[str], None] | None = None,
                 bar: bool = True, resume: bool = True) -> dict[str, Any]:
    """What the driver sustains end to end with workers that are never the bottleneck: a
    scan-like plan of `items` items (8 hypotheses x 64 examples, 512 rows of the real
    `logit_diff` schema each) run through `drive`, its `_Loop` and the real sweep folder, on
    stand-in workers returning precomputed tables (at `rate` items/s, default unlimited). Then
    the finished sweep is resumed (nothing pending) and timed: `resume_s`.

    Prints items/s, rows/s, the driver's CPU per item and its resident memory after 10^3,
    10^4 and 10^5 items (those reached). `bar` keeps the progress bar on (its output goes to
    /dev/null), as a real run has it.
    """
    import contextlib

    step = progress or (lambda phase: None)
    root = Path(keep) if keep else Path(tempfile.mkdtemp(prefix="pathpatch-driver-"))
    try:
        step(f"plan {items} items")
        start = time.perf_counter()
        resolved = _driver_resolved(items, shards, "logit_diff")
        plan_s = time.perf_counter() - start
        tables = stand_in_tables()
        marks = tuple(m for m in (1_000, 10_000, 100_000) if m < items)
        worker = StandInWorker(tables, rate=rate, marks=marks)
        out = root / "sweep"
        shutil.rmtree(out, ignore_errors=True)
        folder = SweepFolder(out)

        def run_once(stand_in: bool) -> tuple[Outcome, float, float]:
            outcome = Outcome(folder=out, total=len(resolved.plan.items), metric="logit_diff")
            executor = (InProcessExecutor(worker, ExecutorOptions(), stats=outcome)
                        if stand_in else None)  # a resume that computed something would fail
            options = RunOptions(backend="inprocess", executor=executor)
            with open(os.devnull, "w") as devnull, contextlib.redirect_stderr(devnull):
                wall, cpu = time.perf_counter(), time.process_time()
                drive(resolved, folder, SweepRounds(resolved, progress=bar), outcome, options)
                return outcome, time.perf_counter() - wall, time.process_time() - cpu

        step(f"drive {items} items through the stand-in workers")
        rss_before = rss_bytes()
        outcome, wall_s, cpu_s = run_once(True)
        rss_after = rss_bytes()
        step("resume the finished sweep")
        resumed = run_once(False) if resume else None
        step("measure the folder")
        files = list(folder.items_dir.glob("*.parquet"))
        disk = sum(f.stat().st_size for f in files)
    finally:
        if not keep:
            shutil.rmtree(root, ignore_errors=True)
    rss = {**{str(k): v for k, v in worker.rss.items()}, str(items): rss_after}
    mib = 1 << 20
    result = {
        **cpu_description(),
        "items": items, "rows": outcome.rows, "rows_per_item": outcome.rows // max(items, 1),
        "rate_items_per_s": rate, "progress_bar": bar, "plan_s": round(plan_s, 2),
        "failed": outcome.failed,
        "executor_s": round(outcome.seconds, 2), "drive_s": round(wall_s, 2),
        "items_per_s": round(items / outcome.seconds, 1),
        "rows_per_s": round(outcome.rows / outcome.seconds),
        "driver_cpu_ms_per_item": round(1000 * cpu_s / items, 3),
        "rss_mib_before": round(rss_before / mib, 1),
        "rss_mib_after_items": {k: round(v / mib, 1) for k, v in rss.items()},
        "files": len(files), "mb_on_disk": round(disk / 1e6, 1),
    }
    if "10000" in rss and items > 10_000:
        result["rss_bytes_per_item_after_10000"] = round(
            (rss_after - rss["10000"]) / (items - 10_000), 1)
    if resumed is not None:
        result |= {"resume_s": round(resumed[1], 3), "resume_reused": resumed[0].reused,
                   "resume_evaluations": resumed[0].evaluations}
    return result
