"""A sweep: its plan's work items as the driver loop's one round.

`run_sweep` is the whole life of one driver on one sweep folder: resolve (all user errors
here, nothing written yet), check the folder, then `pipeline.driver.drive`: take the folder's
lock, record the spec and manifest, set aside the results of items no longer planned, and
evaluate the pending items on Ray (or in this process), writing each result as it completes.
Running it again is resuming.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.driver import BACKENDS, Outcome, RunOptions, drive, folder_identity
from pipeline.plan import WorkItem
from pipeline.progress import Progress
from pipeline.resolve import Resolved, resolve
from pipeline.spec import SweepSpec, parse_spec
from pipeline.store import SweepFolder
from pipeline.worker import Attribute, Evaluate, Task

if TYPE_CHECKING:  # annotations only: result tables are built by the engine
    import pyarrow as pa


class SweepRounds:
    """The plan's items, all in one round; a failed item is recorded and the sweep goes on."""

    label = "run"

    def __init__(self, resolved: Resolved, *, progress: bool):
        self.resolved = resolved
        self.enabled = progress
        self.attributions = {a.name: a for a in resolved.attributions}
        self.hypotheses = {h.name: h for h in resolved.hypotheses}
        self.given = False

    def prepare(self, folder: SweepFolder) -> dict[str, Any]:
        set_aside, restored = folder.set_aside({item.id for item in self.resolved.plan.items})
        return {"superseded_set_aside": set_aside, "superseded_restored": restored}

    def manifest(self, manifest: dict[str, Any]) -> dict[str, Any]:
        return manifest

    def next_round(self) -> Sequence[WorkItem] | None:
        if self.given:
            return None
        self.given = True
        return self.resolved.plan.items

    def task(self, item: WorkItem) -> Task:
        """What a worker runs for one of the plan's items (the benchmarks ask here too)."""
        if item.kind == "attribution":  # an attribution method is an item on its own
            return Attribute(item.id, item.shard.id, self.attributions[item.hypotheses[0].name])
        return Evaluate(item.id, item.shard.id, tuple(self.hypotheses[h.name] for h in item.hypotheses))

    def computed(self, item: WorkItem, table: pa.Table) -> None:
        """Written, and no longer needed here."""

    def settle(self, items: Sequence[WorkItem], failed: list[str]) -> None:
        """Nothing to decide: failures are recorded, the exit status reports them."""

    def progress(self, pending: int, outcome: Outcome) -> Progress:
        return Progress(pending, skipped=outcome.reused, enabled=self.enabled and pending > 0)

    def finish(self, folder: SweepFolder, manifest: dict[str, Any]) -> dict[str, Any]:
        return {}


def load_sweep_spec(folder: str | Path) -> SweepSpec:
    """The spec a sweep folder was last run with (relative paths read from its old folder)."""
    sweep = SweepFolder(folder)
    manifest = sweep.read_manifest()
    return parse_spec(sweep.spec_path.read_text(), base_dir=manifest["base_dir"],
                      default_name=manifest["name"], where=str(sweep.spec_path))


def run_sweep(
    spec: SweepSpec,
    out: str | Path,
    *,
    backend: str = "ray",
    address: str | None = None,
    progress: bool = True,
    resolved: Resolved | None = None,
    on_event: Callable[..., None] | None = None,
    ray_init: dict[str, Any] | None = None,
    spec_file: str = "",
    executor_options: dict[str, Any] | None = None,
    force: bool = False,
) -> Outcome:
    """Run (or resume) the sweep `spec` into folder `out`.

    Args:
        spec: the validated spec.
        out: sweep folder (created; reused when it exists).
        backend: "ray" (local cluster on demand, or `address` / RAY_ADDRESS) or "inprocess".
        address: Ray cluster address.
        progress: show a tqdm bar on stderr.
        resolved: `resolve(spec)` when the caller has it already.
        on_event: called as on_event(event, **fields) for every scheduling event (tests).
        ray_init: extra `ray.init` arguments for a local cluster started here.
        spec_file: where the spec was read from (recorded in the manifest).
        executor_options: `ExecutorOptions` fields to override (e.g. warm_start=True).
        force: take over `out` when it holds a sweep of another identity (`check_target`).

    Raises:
        PathPatchError: invalid spec or a folder that must not be written (before anything is
            written), folder locked by another driver, or no worker could start.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend {backend!r}: allowed are {BACKENDS}")
    resolved = resolved or resolve(spec)
    address = address or os.environ.get("RAY_ADDRESS") or None
    if backend == "ray" and address:
        from pipeline.ray_executor import probe_address  # Ray loads only when a run uses it

        probe_address(address)  # a wrong address fails here, before anything is written
    plan = resolved.plan
    folder = SweepFolder(out)
    folder.check_target(folder_identity(resolved), force=force)
    outcome = Outcome(folder=folder.root, total=len(plan.items), metric=plan.metric)
    return drive(resolved, folder, SweepRounds(resolved, progress=progress), outcome,
                 RunOptions(backend=backend, address=address,
                            on_event=on_event, ray_init=ray_init,
                            executor_options=executor_options, spec_file=spec_file))
