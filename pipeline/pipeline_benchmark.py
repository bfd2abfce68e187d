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

from pathpatch.engine.evaluation import compile_all
from pathpatch.engine.stage_plan import GroupPlan
from pathpatch.model.graph import Graph
from pathpatch.model.loading import build_model, save_checkpoint
from pathpatch.tools.engine_benchmarks import SHAPES, cpu_description
from pipeline.driver import Outcome, prepare_ray_environment, worker_config
from pipeline.query import open_sweeps
from pipeline.resolve import resolve
from pipeline.spec import load_spec
from pipeline.store import SweepFolder
from pipeline.sweep import SweepRounds, run_sweep
from pipeline.worker import Worker

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
