"""The same sweep on a multi-node Ray cluster (several nodes on this machine, loopback only)."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.spec import load_spec
from pipeline.store import SweepFolder
from pipeline.sweep import run_sweep
from tests.pipeline.conftest import rows, write_spec

pytestmark = pytest.mark.slow

LOOPBACK = "127.0.0.2"  # Ray rewrites 127.0.0.1 to the machine's address; this it keeps


@pytest.fixture(scope="module")
def cluster():
    """Head (1 CPU) plus two worker nodes (1 CPU each); the test process is its driver."""
    import ray
    from ray.cluster_utils import Cluster

    c = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 1, "node_ip_address": LOOPBACK, "include_dashboard": False,
        "object_store_memory": 100 * 2**20})
    nodes = [c.add_node(num_cpus=1, node_ip_address=LOOPBACK,
                        object_store_memory=100 * 2**20) for _ in range(2)]
    c.wait_for_nodes()
    ray.init(address=c.address, log_to_driver=False)
    try:
        yield c, nodes
    finally:
        ray.shutdown()
        c.shutdown()


@pytest.fixture(scope="module")
def reference(tmp_path_factory, checkpoint: Path):
    tmp = tmp_path_factory.mktemp("reference")
    run_sweep(load_spec(write_spec(tmp, checkpoint)), tmp / "out", backend="inprocess",
              progress=False)
    return rows(tmp / "out").select(["hypothesis", "example", "ue", "te"])


def test_work_spreads_over_nodes_with_identical_results(cluster, tmp_path, checkpoint,
                                                        reference):
    # warm_start: both actors are up before work is handed out, so both get some
    outcome = run_sweep(load_spec(write_spec(tmp_path, checkpoint)), tmp_path / "out",
                        progress=False, executor_options={"warm_start": True})
    assert outcome.evaluations == 6 and len(outcome.nodes) >= 2, outcome.nodes
    done_on = {e["node"] for e in SweepFolder(tmp_path / "out").events()
               if e["event"] == "item_done"}
    assert len(done_on) >= 2  # recorded in the event log too
    assert rows(tmp_path / "out").select(["hypothesis", "example", "ue", "te"]).equals(
        reference)


def test_node_removed_mid_item(cluster, tmp_path, checkpoint, reference):
    import ray

    c, nodes = cluster
    head_id = c.head_node.node_id
    removed = []  # the first item handed to an actor off the head node
    submitted = []  # (item, actor)

    def remove_worker_node(event, **fields):
        if event != "submitted":
            return
        submitted.append((fields["item"], fields["worker"]))
        if removed or fields["node"] == head_id:
            return
        node = next(n for n in nodes if n.node_id == fields["node"])
        c.remove_node(node)  # takes the actor with it, mid-item
        removed.append((fields["item"], fields["worker"]))

    spec = load_spec(write_spec(tmp_path, checkpoint,
                                metric="tests.pipeline.slow_metric:slow_kl"))
    outcome = run_sweep(spec, tmp_path / "out", progress=False, on_event=remove_worker_node,
                        executor_options={"warm_start": True})
    # warm_start: the first fill hands each actor 2 calls at once (6 items wait, more than 2
    # per actor), so the removed node's actor held the item it ran and one queued behind it:
    # both requeued, only the first charged an attempt
    (item, worker), = removed
    on_it = [i for i, w in submitted[:4] if w == worker]
    assert len(on_it) == 2 and on_it[0] == item
    assert (outcome.evaluations, outcome.requeues, outcome.failed) == (6, 2, 0)
    events = SweepFolder(tmp_path / "out").events()
    lost = [e for e in events if e["event"] == "worker_lost"]
    assert [(e["worker"], e["items"]) for e in lost] == [(worker, on_it)]
    assert [(e["item"], e["attempts"]) for e in events if e["event"] == "requeued"] == [
        (on_it[0], 1), (on_it[1], 0)]
    got = rows(tmp_path / "out").select(["hypothesis", "example", "ue", "te"])
    assert got.num_rows == reference.num_rows
    # slow_kl is kl after a pause: the same numbers as the reference sweep
    assert got.column("ue").equals(reference.column("ue"))
    assert len([n for n in ray.nodes() if n["Alive"]]) == 2
