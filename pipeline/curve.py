"""`pathpatch curve SCAN [SEARCH ...]`: from finished rankings to one faithfulness-curve sweep.

Every ranking the scan holds (its `edge_scores` view: the exact single-edge effects of its edge
removals, and each [[attributions]] method) and the circuit of each greedy search folder given
(`circuit.csv`: its edges first) become ranking tables beside the scan's folder, and one spec
with a `circuit_curve` per ranking, on the scan's model, data and metric, is written next to
them; `pathpatch run` then runs it like any sweep (resumable, distributed), and its report
sets the curves side by side with the rankings' agreement. Every file is plain and
deterministic, so the curve can be rerun or edited by hand.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pathpatch.data.atomic import atomic_write_bytes
from pathpatch.errors import PathPatchError
from pipeline.query import open_sweeps
from pipeline.store import SweepFolder
from pipeline.sweep import load_sweep_spec

RANKINGS_SQL = """
SELECT method, edge, importance, partial FROM edge_scores ORDER BY method, edge
"""
"""Every ranking of a scan: importance oriented so that higher means the edge matters more."""


def write_curve_spec(scan: str | Path, fractions: Sequence[float] | None = None,
                     searches: Sequence[str | Path] = ()) -> tuple[Path, list[Path]]:
    """Write `<scan's name>-<method>.csv` (edge, score) per ranking of the scan,
    `<search's name>.csv` per search, and `<scan's name>-curve.toml` beside the scan's folder
    (names from the specs); return (the spec's path, the rankings' paths).

    Raises:
        PathPatchError: the scan holds no ranking, some of its work items are not finished, or
            a search folder is not a finished search on the same model.
    """
    scan = Path(scan)
    spec = load_sweep_spec(scan)
    con = open_sweeps(scan)
    unfinished = con.sql("SELECT count(*) FROM items WHERE status <> 'done'").fetchall()[0][0]
    if unfinished:
        raise PathPatchError(f"{scan}: {unfinished} work items are not finished (pending or "
                             f"failed), so some rankings are partial or missing: `pathpatch "
                             f"resume {scan}` first")
    rows = con.sql(RANKINGS_SQL).fetchall()
    if not rows and not searches:
        raise PathPatchError(
            f"{scan}: no ranking in this sweep (single-edge removals, the edge_removal family, "
            "or [[attributions]]): run an edge scan first")
    rankings: list[Path] = []
    for method in sorted({method for method, *_ in rows}):
        path = scan.parent / f"{spec.name}-{method}.csv"
        lines = ["edge,score"] + [f"{edge},{score!r}" for m, edge, score, _ in rows if m == method]
        atomic_write_bytes(path, ("\n".join(lines) + "\n").encode())
        rankings.append(path)
    digest = SweepFolder(scan).read_manifest()["model_digest"]
    for search in map(Path, searches):
        manifest = SweepFolder(search).read_manifest()
        circuit = search / "circuit.csv"
        if "circuit_edges" not in manifest.get("search", {}) or not circuit.is_file():
            raise PathPatchError(f"{search}: not a finished search (no circuit yet): run its "
                                 "[search] spec to the end first")
        if manifest["model_digest"] != digest:
            raise PathPatchError(f"{search}: searched model {manifest['model']!r}, not the "
                                 f"scan's {spec.model!r}: give a search of the same model")
        path = scan.parent / f"{manifest['name']}.csv"
        if path in rankings:
            raise PathPatchError(f"{search}: its ranking would be {path.name}, which another "
                                 "ranking of this curve already is: give the search's spec "
                                 "another name")
        shutil.copyfile(circuit, path)
        rankings.append(path)
    name = f"{spec.name}-curve"
    top = {"name": name, "model": spec.model, "metric": spec.metric, "seed": spec.seed,
           "dtype": spec.dtype, "shard_size": spec.shard_size, "group_size": 11,
           "max_mixed_copies": spec.max_mixed_copies}
    dataset = (spec.dataset.table() if spec.dataset.path is not None
               else {"kind": spec.dataset.kind, **spec.dataset_params()})
    text = [f"# The faithfulness curves of {scan}'s rankings, written by `pathpatch curve`;",
            "# run with `pathpatch run` like any sweep.",
            *(f"{k} = {_toml(v)}" for k, v in top.items()), "", "[dataset]",
            *(f"{k} = {_toml(v)}" for k, v in dataset.items())]
    for ranking in rankings:
        curve: dict[str, Any] = {"family": "circuit_curve", "ranking": str(ranking.resolve())}
        if fractions:
            curve["fractions"] = list(fractions)
        text += ["", "[[hypotheses]]", *(f"{k} = {_toml(v)}" for k, v in curve.items())]
    path = scan.parent / f"{name}.toml"
    atomic_write_bytes(path, ("\n".join(text) + "\n").encode())
    return path, rankings


def _toml(value: Any) -> str:
    """A TOML value of the plain kinds a spec holds (strings, numbers, booleans, lists)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a TOML basic string: the same escapes
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    if isinstance(value, dict):  # an inline table (a text dataset's columns)
        return "{" + ", ".join(f"{k} = {_toml(v)}" for k, v in value.items()) + "}"
    raise PathPatchError(f"pathpatch curve: cannot write {value!r} into a spec; edit the spec by hand")
