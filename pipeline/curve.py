"""`pathpatch curve SCAN`: from a finished single-edge scan to its faithfulness-curve sweep.

The scan's exact single-edge effects (each `remove <edge>` hypothesis's mean unexplained effect,
read from the `scores` view) become a ranking table beside the scan's folder, and a spec for
the `circuit_curve` of that ranking, on the scan's model, data and metric, is written next to
it; `pathpatch run` then runs it like any sweep (resumable, distributed). Both files are plain
and deterministic, so the curve can be rerun or edited by hand.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pathpatch.atomic import atomic_write_bytes
from pathpatch.errors import PathPatchError
from pipeline.query import open_sweeps
from pipeline.sweep import load_sweep_spec

EDGE_SCORES_SQL = r"""
SELECT regexp_extract(hypothesis, '^remove (.+)$', 1) AS edge, aue AS score, partial
FROM scores WHERE regexp_full_match(hypothesis, '^remove .+->.+$') ORDER BY hypothesis
"""
"""Each removed edge's mean unexplained effect: the exact single-edge ranking."""


def write_curve_spec(scan: str | Path, fractions: Sequence[float] | None = None
                     ) -> tuple[Path, Path]:
    """Write `<scan's name>.csv` (edge, score) and `<scan's name>-curve.toml` beside the scan's
    folder (the name is the scan's spec's); return (the spec's path, the ranking's).

    Raises:
        PathPatchError: the folder holds no edge removals, or some of them are not finished.
    """
    scan = Path(scan)
    spec = load_sweep_spec(scan)
    rows = open_sweeps(scan).sql(EDGE_SCORES_SQL).fetchall()
    if not rows:
        raise PathPatchError(f"{scan}: no single-edge removals ('remove <edge>' hypotheses, the "
                             "edge_removal family) in this sweep: run an edge scan first")
    partial = sum(1 for *_, p in rows if p)
    if partial:
        raise PathPatchError(f"{scan}: {partial} of its {len(rows)} edge removals are not finished "
                             f"(work items pending or failed): `pathpatch resume {scan}` first")
    ranking = scan.parent / f"{spec.name}.csv"
    lines = ["edge,score"] + [f"{edge},{score!r}" for edge, score, _ in rows]
    atomic_write_bytes(ranking, ("\n".join(lines) + "\n").encode())
    name = f"{spec.name}-curve"
    curve: dict[str, Any] = {"family": "circuit_curve", "ranking": str(ranking.resolve())}
    if fractions:
        curve["fractions"] = list(fractions)
    top = {"name": name, "model": spec.model, "metric": spec.metric, "seed": spec.seed,
           "dtype": spec.dtype, "shard_size": spec.shard_size, "group_size": 11,
           "max_mixed_copies": spec.max_mixed_copies}
    dataset = ({"path": spec.dataset.path} if spec.dataset.path is not None
               else {"kind": spec.dataset.kind, **spec.dataset_params()})
    text = [f"# The faithfulness curve of {scan}'s exact single-edge ranking ({ranking.name}),",
            "# written by `pathpatch curve`; run with `pathpatch run` like any sweep.",
            *(f"{k} = {_toml(v)}" for k, v in top.items()), "", "[dataset]",
            *(f"{k} = {_toml(v)}" for k, v in dataset.items()), "", "[[hypotheses]]",
            *(f"{k} = {_toml(v)}" for k, v in curve.items())]
    path = scan.parent / f"{name}.toml"
    atomic_write_bytes(path, ("\n".join(text) + "\n").encode())
    return path, ranking


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
    raise PathPatchError(f"pathpatch curve: cannot write {value!r} into a spec; edit the spec by hand")
