"""A scan's plan on a simulated cluster of many small nodes: Ray's multi-node test cluster on
this machine (loopback), each node with logical GPUs, workers placed one per GPU; nodes are
killed and added while the sweep runs. The rows must equal a one-worker (in-process) run of the
same spec, bitwise. Prints one JSON object: items, workers, node changes, wall times and the
driver's scheduling overhead per item (its CPU seconds per item, which include writing each
item's Parquet file).

Run: .venv/bin/python scripts/cluster_scale.py [--pairs 1235] [--nodes 8] [--gpus-per-node 2]
     [--kill 2] [--add 3] [--keep DIR]
The default plan: every single-edge removal of the bundled attn-only-2l (81 edges), one per
item, on 1,235 one-pair shards: 100,035 work items. `--pairs 40` makes a 3,240-item check.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import textwrap
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from pipeline.query import open_sweeps  # noqa: E402
from pipeline.spec import load_spec  # noqa: E402
from pipeline.sweep import run_sweep  # noqa: E402

LOOPBACK = "127.0.0.2"  # Ray rewrites 127.0.0.1 to the machine's address; this it keeps
NODE_MEMORY = 80 * 2**20  # each node's object store: small, the shards are tiny


def _spec(folder: Path, pairs: int) -> Path:
    path = folder / "cluster_scale.toml"
    path.write_text(textwrap.dedent(f"""\
        name = "cluster-scale"
        model = "attn-only-2l"
        metric = "kl"
        shard_size = 1
        group_size = 1
        seed = 0
        [dataset]
        kind = "induction"
        n = {pairs}
        [[hypotheses]]
        family = "edge_removal"
        [resources]
        threads_per_worker = 1
        gpus_per_worker = 1
        [execution]
        max_attempts = 3
        """))
    return path


def _rows(folder: Path):
    return open_sweeps(folder).sql(
        "SELECT hypothesis, example, ue, te FROM results ORDER BY hypothesis, example"
    ).to_arrow_table()


def _done(folder: Path) -> int:
    items = folder / "items"
    return sum(1 for p in items.iterdir() if p.suffix == ".parquet") if items.is_dir() else 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=1235)
    parser.add_argument("--nodes", type=int, default=8)
    parser.add_argument("--gpus-per-node", type=int, default=2)
    parser.add_argument("--kill", type=int, default=2, help="nodes removed at 30%% of the items")
    parser.add_argument("--add", type=int, default=3, help="nodes added at 50%% of the items")
    parser.add_argument("--keep", default=None, help="keep the sweep folders under this folder")
    args = parser.parse_args()

    from ray.cluster_utils import Cluster

    root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="pathpatch-cluster-"))
    root.mkdir(parents=True, exist_ok=True)
    spec = load_spec(_spec(root, args.pairs))
    out: dict = {"pairs": args.pairs}

    start = time.perf_counter()
    one = run_sweep(spec, root / "one-worker", backend="inprocess", progress=False)
    out["one_worker"] = {"items": one.evaluations, "seconds": round(time.perf_counter() - start, 1)}
    out["items"] = one.evaluations

    node_args = {"num_cpus": args.gpus_per_node, "num_gpus": args.gpus_per_node,
                 "node_ip_address": LOOPBACK, "object_store_memory": NODE_MEMORY}
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 0, "node_ip_address": LOOPBACK, "include_dashboard": False,
        "object_store_memory": NODE_MEMORY})
    nodes = [cluster.add_node(**node_args) for _ in range(args.nodes)]
    cluster.wait_for_nodes()
    changes: list[dict] = []
    folder = root / "cluster"
    total = one.evaluations
    # the driver in a process of its own (as `pathpatch run --address` on a login node), so that
    # this one changes the cluster while it runs (Ray adds nodes from the main thread only)
    import resource
    import subprocess

    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    driver = subprocess.Popen(
        [sys.executable, "-m", "pipeline.cli", "run", str(root / "cluster_scale.toml"),
         "--out", str(folder), "--address", cluster.address, "--no-progress", "--quiet"],
        cwd=Path(__file__).resolve().parent.parent)
    try:
        for fraction, action in ((0.3, "kill"), (0.5, "add")):
            while _done(folder) < fraction * total and driver.poll() is None:
                time.sleep(1.0)
            if driver.poll() is not None:
                break
            if action == "kill":
                for node in nodes[:args.kill]:
                    cluster.remove_node(node)
            else:
                for _ in range(args.add):
                    cluster.add_node(**node_args)
            changes.append({"at_items_done": _done(folder),
                            action: args.kill if action == "kill" else args.add,
                            "seconds": round(time.perf_counter() - start, 1)})
        status = driver.wait()
        seconds = time.perf_counter() - start
    finally:
        if driver.poll() is None:
            driver.kill()
        cluster.shutdown()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    events = [json.loads(line) for line in (folder / "events.jsonl").read_text().splitlines()]
    workers = {(e["node"], e["pid"]) for e in events if e.get("event") == "item_done"}
    done = [e for e in events if e.get("event") == "item_done"]
    finished = next((e for e in reversed(events) if e.get("event") == "run_finished"), {})
    out["cluster"] = {
        "nodes": args.nodes, "gpus_per_node": args.gpus_per_node, "node_changes": changes,
        "driver_exit": status, "workers_used": len(workers), "items": len(done),
        "failed": finished.get("failed"), "requeues": finished.get("requeues"),
        "seconds": round(seconds, 1), "items_per_s": round(len(done) / seconds, 1),
        "driver_cpu_s_per_item": round(cpu / max(len(done), 1), 5),
        "nodes_seen": len({e["node"] for e in done})}
    out["rows_equal_one_worker"] = _rows(folder).equals(_rows(root / "one-worker"))
    if not args.keep:
        shutil.rmtree(root, ignore_errors=True)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
