"""Results at scale: a sweep folder of generated rows (default: the 32,491-edge scan of GPT-2
small x 1,000 examples = 32 M rows), then `pathpatch status`, the `scores` view and the report
timed over it. Prints one JSON object.

Run: .venv/bin/python scripts/scale_rows.py [--hypotheses 32491] [--examples 1000] [--keep DIR]
The rows are random (ue, te >= 0); the folder is a real one: manifest, one Parquet file per
item written by the store, the views and the report reading it as they read any sweep.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from pathpatch.language.hypotheses import Facts  # noqa: E402
from pathpatch.model.graph import Graph  # noqa: E402
from pipeline.plan import HypothesisInfo, Shard, make_plan  # noqa: E402
from pipeline.store import SweepFolder, build_manifest  # noqa: E402


def generate(folder: Path, n_hypotheses: int, n_examples: int, group_size: int,
             shard_size: int) -> dict:
    graph = Graph(n_layers=12, n_heads=12, has_mlp=True)  # GPT-2 small's graph: edge names
    edges = [str(e) for e in graph.edges][:n_hypotheses]
    hypotheses = tuple(HypothesisInfo(f"remove {e}", f"remove({e})", 40, 0.5,
                                      facts=Facts("edge_removal", "remove_edge", e))
                       for e in edges)
    hypotheses += tuple(HypothesisInfo(f"h{i}", "remove()", 40, 0.5)
                        for i in range(len(edges), n_hypotheses))
    shards = tuple(Shard(i, s, min(s + shard_size, n_examples), f"{i:064x}")
                   for i, s in enumerate(range(0, n_examples, shard_size)))
    plan = make_plan(model_digest="generated", shards=shards, hypotheses=hypotheses,
                     group_size=group_size, metric="kl", dtype="float32")
    sweep = SweepFolder(folder)
    with sweep.locked():
        sweep.write_manifest(build_manifest(plan, spec_name="scale", spec_hash="generated",
                                            spec_file="", base_dir=".", model="generated",
                                            seed=0, provenance={}))
        sweep.write_hypotheses(plan)
        sweep.write_spec("# generated rows (scripts/scale_rows.py)\n", "generated")
        rng = np.random.default_rng(0)
        start = time.perf_counter()
        for item in plan.items:
            n_ex, n_h = item.n_examples, len(item.hypotheses)
            te = np.tile(rng.gamma(2.0, 1.0, n_ex), n_h)
            table = pa.table({
                "hypothesis": pa.array(np.repeat([h.name for h in item.hypotheses], n_ex)),
                "example": pa.array(np.tile(np.arange(item.shard.start, item.shard.stop), n_h)),
                "ue": pa.array(te * rng.random(n_ex * n_h)),
                "te": pa.array(te),
            })
            sweep.write_item(item, table, {"generated": True})
        write_s = time.perf_counter() - start
    files = list((folder / "items").glob("*.parquet"))
    return {"rows": n_hypotheses * n_examples, "items": len(plan.items), "files": len(files),
            "bytes": sum(f.stat().st_size for f in files), "write_s": round(write_s, 1)}


def timed(command: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    return round(time.perf_counter() - start, 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hypotheses", type=int, default=32491)
    parser.add_argument("--examples", type=int, default=1000)
    parser.add_argument("--group-size", type=int, default=64)
    parser.add_argument("--shard-size", type=int, default=1000)
    parser.add_argument("--keep", help="write the folder here and keep it")
    args = parser.parse_args()
    folder = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="pathpatch-rows-"))
    shutil.rmtree(folder, ignore_errors=True)
    try:
        result = generate(folder, args.hypotheses, args.examples, args.group_size, args.shard_size)
        cli = [sys.executable, "-m", "pipeline.cli"]
        result["status_s"] = timed(cli + ["status", str(folder)])
        result["scores_s"] = timed(cli + ["sql", str(folder), "SELECT count(*), avg(aue) FROM scores"])
        result["top10_s"] = timed(cli + ["sql", str(folder), "SELECT hypothesis, proportion_explained "
                                         "FROM scores ORDER BY proportion_explained LIMIT 10"])
        result["report_s"] = timed(cli + ["report", str(folder)])
    finally:
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
