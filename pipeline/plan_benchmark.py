"""`pathpatch bench plan`: what planning a full single-edge scan costs the driver, from the
architecture alone (a Hugging Face directory holding config.json only: no weights exist).

Each shape is planned in a fresh interpreter, as `pathpatch run --dry-run` plans it
(`resolve(spec, weights=False)` and the printed summary), so its peak memory is the plan's:
the figure is the peak RSS while planning (the peak reset after the imports, where Linux
allows) minus the resident size before. Grows with the hypothesis
count: the hypotheses, their cost reports, their `HypothesisInfo`s and the work items.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any

PLAN_SHAPES = ("qwen2.5-0.5b", "gemma-2-2b", "llama-3.1-8b")
"""The default shapes: MIB's three largest models (179,749, 74,218 and 1,592,881 edges)."""

_SPEC = textwrap.dedent("""\
    name = "{name}-scan"
    model = "{model}"
    metric = "kl"
    [dataset]
    kind = "induction"
    n = {pairs}
    [[hypotheses]]
    family = "edge_removal"
    """)


def bench_plan(shapes: tuple[str, ...] = PLAN_SHAPES, *, pairs: int = 64) -> dict[str, Any]:
    """Plan each shape's full single-edge scan over `pairs` induction pairs (one shard per 64)
    in a child interpreter; per shape: edges, work items, seconds, peak driver memory beyond
    the interpreter, and bytes per hypothesis."""
    from pathpatch.tools.engine_benchmarks import HF_CONFIGS, cpu_description, write_hf_config

    unknown = [s for s in shapes if s not in HF_CONFIGS]
    if unknown:
        from pathpatch.errors import PathPatchError

        raise PathPatchError(f"--shape {unknown[0]!r}: the shapes are {', '.join(HF_CONFIGS)}")
    out: dict[str, Any] = {"host": cpu_description(), "pairs": pairs, "shapes": {}}
    with tempfile.TemporaryDirectory(prefix="pathpatch-bench-plan-") as tmp:
        for name in shapes:
            folder = write_hf_config(name, Path(tmp) / name)
            spec = Path(tmp) / f"{name}.toml"
            spec.write_text(_SPEC.format(name=name, model=folder, pairs=pairs))
            child = subprocess.run([sys.executable, "-m", "pipeline.plan_benchmark", str(spec)],
                                   capture_output=True, text=True, check=False)
            if child.returncode != 0:
                raise RuntimeError(f"planning {name} failed:\n{child.stderr[-4000:]}")
            out["shapes"][name] = json.loads(child.stdout.strip().splitlines()[-1])
    return out


def _status_bytes(field: str) -> int | None:
    """A /proc/self/status memory field (VmRSS, VmHWM) in bytes; None off Linux."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _reset_peak() -> int:
    """The resident size now, with the peak reset to it where Linux allows (clear_refs 5), so
    that the peak measured next is the plan's and not the imports'."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    now = _status_bytes("VmRSS")
    return now if now is not None else _rss_peak_bytes()


def _rss_peak_bytes() -> int:
    peak = _status_bytes("VmHWM")
    return peak if peak is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _plan_one(spec_path: str) -> dict[str, Any]:
    """In the child: import what a dry-run imports, then plan and describe, timed."""
    from pipeline.plan import describe
    from pipeline.resolve import resolve
    from pipeline.spec import load_spec

    baseline = _reset_peak()
    start = time.perf_counter()
    resolved = resolve(load_spec(spec_path), weights=False)
    summary = describe(resolved.plan)
    seconds = time.perf_counter() - start
    beyond = _rss_peak_bytes() - baseline
    n = len(resolved.plan.hypotheses)
    return {"edges": n, "work_items": len(resolved.plan.items), "seconds": round(seconds, 2),
            "peak_rss_beyond_interpreter_gib": round(beyond / 2**30, 3),
            "bytes_per_hypothesis": round(beyond / n), "summary_lines": summary.count("\n") + 1}


if __name__ == "__main__":
    print(json.dumps(_plan_one(sys.argv[1])))
