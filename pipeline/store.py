"""The sweep folder: where a sweep's spec, plan and results live, written crash-safely.

Layout (see docs/PIPELINE.md)::

    SWEEP/
      spec.toml              the spec as given (latest run); specs/<hash>.toml keeps each one
      manifest.json          the current plan: items, shards, hypotheses, provenance
      hypotheses.parquet     what each hypothesis of the plan is (`HYPOTHESES_SCHEMA`): family,
                             kind, target, ranking, k, ... (rewritten with the manifest)
      items/<id>.parquet     one file per work item of the current plan: per-example rows
      superseded/<id>.parquet  results of items the current spec no longer names
      failed/<id>.json       items that failed every attempt, with the error (cleared on success)
      events.jsonl           what happened: runs, requeues, replaced workers, failures
      steps/<index>.parquet  a search's decisions (`STEP_SCHEMA`), one file per round
      circuit.json, circuit.csv  the circuit a search found (EAP-IG format; a ranking)
      done.tsv               the done index: a line per result file made durable (item id,
                             size, mtime_ns, rows), appended as items are written
      .lock                  flock'ed by the one driver allowed at a time

A result file is written whole or not at all (`pathpatch.data.atomic`). A driver counts it
done without opening it when the done index records it at its current size and modification
time (a line is written only once the file is durable); any other file counts as done only if
it reads back whole (row count and identity from its own metadata), and is then recorded. So a
resume reads the index and stats the files, and reads in full only files the index does not
vouch for (written by an older pathpatch, by a driver stopped before its batch was made
durable, or changed since). Only the driver holding the lock writes; readers (status, sql) need
no lock and check each file's footer.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import hashlib
import importlib.metadata
import json
import os
import subprocess
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pathpatch.data.atomic import (
    TEMP_MARK,
    atomic_write,
    atomic_write_bytes,
    fsync_dir,
    sync_filesystem,
)
from pathpatch.errors import PathPatchError
from pathpatch.model.names import edge_parts, node_parts
from pipeline.plan import HypothesisInfo, Plan, WorkItem

MANIFEST_FORMAT = "pathpatch-sweep/1"
META_KEY = b"pathpatch.provenance"
PLAN_KEY = b"pathpatch.plan"
"""`hypotheses.parquet`'s metadata key: the digest of the plan's (name, canonical) pairs it
describes, checked against the manifest's (a run stopped between writing the two)."""
DONE_INDEX = "done.tsv"
BATCH_ITEMS = 256
BATCH_SECONDS = 1.0
"""Inside `SweepFolder.batched`, result files are made durable together every BATCH_ITEMS files
or BATCH_SECONDS, whichever comes first (a slow sweep's every file at once)."""
LIBRARIES = ("pathpatch", "torch", "transformer-lens", "pyarrow", "numpy", "ray", "duckdb")


STEP_SCHEMA = pa.schema([
    ("index", pa.int64()), ("edge", pa.string()), ("receiver", pa.string()),
    ("before", pa.float64()), ("after", pa.float64()), ("removed", pa.bool_()),
    ("evaluated", pa.bool_()), ("circuit_edges", pa.int64()),
])
"""One row per decision (`pathpatch.discovery.greedy.Step`), the `search_steps` view's columns."""


HYPOTHESES_SCHEMA = pa.schema([
    ("hypothesis", pa.string()), ("family", pa.string()), ("kind", pa.string()),
    ("target", pa.string()), ("sender", pa.string()), ("receiver", pa.string()),
    ("channel", pa.string()), ("layer", pa.int64()), ("head", pa.int64()),
    ("ranking", pa.string()), ("ordering", pa.string()), ("k", pa.float64()),
    ("n_edges", pa.int64()), ("n_pruned", pa.int64()), ("edges", pa.list_(pa.string())),
])
"""One row per hypothesis of the plan (`hypotheses.parquet`, the `hypotheses` view): its name
and its `pathpatch.language.hypotheses.Facts`, with an edge target's sender, receiver and
channel and a node target's layer and head (head NULL for an MLP) beside it. NULL where a
fact does not apply; every fact NULL for a free-form hypothesis."""

_FACTS = ("family", "kind", "target", "ranking", "ordering", "k", "n_edges", "n_pruned", "edges")


def hypotheses_table(hypotheses: Sequence[HypothesisInfo]) -> pa.Table:
    """The `HYPOTHESES_SCHEMA` table of a plan's evaluated hypotheses (attribution methods have
    rows in `attributions`, not here), in plan order: one pass per column."""
    evaluated = [h for h in hypotheses if h.kind == "evaluation"]
    facts = [h.facts for h in evaluated]
    columns: dict[str, list] = {"hypothesis": [h.name for h in evaluated]}
    columns |= {name: [getattr(f, name) for f in facts] for name in _FACTS}
    n = len(facts)
    sender, receiver, channel, layer, head = ([None] * n for _ in range(5))
    for i, f in enumerate(facts):  # the target's parts, by the one codec of names
        if f.kind == "remove_edge":
            sender[i], receiver[i], channel[i] = edge_parts(f.target)
        elif f.kind in ("remove_node", "through_node"):
            _, layer[i], head[i] = node_parts(f.target)
    columns |= {"sender": sender, "receiver": receiver, "channel": channel, "layer": layer,
                "head": head}
    return pa.table({name: pa.array(columns[name], type) for name, type in
                     zip(HYPOTHESES_SCHEMA.names, HYPOTHESES_SCHEMA.types, strict=True)},
                    schema=HYPOTHESES_SCHEMA)


class _Batch:
    """Result files written since the last barrier (item id, rows), and whether anything
    (an event line) waits for it."""

    def __init__(self) -> None:
        self.pending: list[tuple[str, int]] = []
        self.failed: set[str] = set()  # items with a failed/ record (cleared on success)
        self.dirty = False
        self.since = time.monotonic()


class SweepLocked(PathPatchError):
    """Another driver holds the sweep folder's lock."""


@functools.cache
def git_revision() -> str:
    """The source tree's git commit (+"-dirty" when it has changes), or "unknown"."""
    here = Path(__file__).resolve().parent
    try:
        rev = subprocess.run(["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True,
                             text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(here), "status", "--porcelain",
                                "--untracked-files=no"], capture_output=True, text=True,
                               timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return rev + ("-dirty" if dirty else "")


@functools.cache
def library_versions() -> dict[str, str]:
    """Installed versions of the libraries that shape a result."""
    out = {}
    for name in LIBRARIES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "absent"
    return out


class SweepFolder:
    """One sweep's folder on disk (created by `prepare`; readers use it as it is)."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.items_dir = self.root / "items"
        self.steps_dir = self.root / "steps"
        self.failed_dir = self.root / "failed"
        self.manifest_path = self.root / "manifest.json"
        self.hypotheses_path = self.root / "hypotheses.parquet"
        self.spec_path = self.root / "spec.toml"
        self.events_path = self.root / "events.jsonl"
        self.lock_path = self.root / ".lock"
        self.done_path = self.root / DONE_INDEX
        self._batch: _Batch | None = None
        self._events: Any = None  # the event log, kept open inside `batched`

    # --- lock -----------------------------------------------------------------------------

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the folder's OS lock (flock) for this driver; the OS frees it if we die.

        Raises:
            SweepLocked: another live driver holds it.
        """
        self.root.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as err:
                if err.errno not in (errno.EWOULDBLOCK, errno.EACCES):
                    raise
                holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "unknown"
                raise SweepLocked(
                    f"sweep folder {str(self.root)!r} is in use by another driver ({holder}); "
                    "wait for it to finish or stop it, or give another --out folder"
                ) from None
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"pid {os.getpid()} since {time.strftime('%Y-%m-%d %H:%M:%S')}"
                      .encode(), 0)
            yield
        finally:
            os.close(fd)  # closing the descriptor releases the flock

    # --- what may be written where ------------------------------------------------------------

    def check_target(self, identity: dict[str, Any] | None, *, force: bool = False) -> None:
        """Refuse, before anything is written, a folder this sweep would damage or hide.

        Writes go to a new folder, an empty one, or a sweep folder of the same identity (name,
        model digest, metric, dtype: what makes its rows comparable); another sweep's folder
        only with `force` (its result files move to `superseded/`, out of the views). A folder holding
        anything else is never written into. `identity=None` checks all but the identity
        (before the model is loaded).

        Raises:
            PathPatchError: naming the folder, what is in the way, and the fix.
        """
        root = self.root
        existing = next(p for p in [root, *root.parents] if p.exists() or p == p.parent)
        if existing.exists() and not existing.is_dir():
            where = "is a file" if existing == root else f"is under {existing}, which is a file"
            raise PathPatchError(f"sweep folder {str(root)!r} {where}: give a folder path (--out)")
        if existing.exists() and not os.access(existing, os.W_OK | os.X_OK):
            raise PathPatchError(f"sweep folder {str(root)!r}: {existing} is not writable by this "
                                 "user; give --out a folder you can write to")
        if not root.is_dir():
            return
        if not self.manifest_path.exists():
            theirs = sorted(p.name for p in root.iterdir()
                            if p.name != ".lock" and TEMP_MARK not in p.name)
            if theirs:
                raise PathPatchError(
                    f"{str(root)!r} is not empty and is not a pathpatch sweep folder (it holds "
                    f"{', '.join(theirs[:5])}{' ...' if len(theirs) > 5 else ''}): nothing there "
                    "is overwritten; give --out a new or empty folder")
            return
        try:
            manifest = self.read_manifest()
        except PathPatchError:
            raise PathPatchError(
                f"{str(root)!r} holds a manifest.json that is not a pathpatch sweep's: nothing "
                "there is overwritten; give --out a new or empty folder") from None
        differ = [f"{key} {manifest.get(key)!r} -> {value!r}"
                  for key, value in (identity or {}).items() if manifest.get(key) != value]
        if differ and not force:
            why = ""
            if [key for key in identity if manifest.get(key) != identity[key]] == ["model_digest"]:
                why = (" The same model now has other weights: its files changed, or pathpatch "
                       "loads them differently (since TransformerLens 4, a checkpoint is read in "
                       "the dtype asked for, never rounded through float32 first), so the old "
                       "rows are not comparable with new ones.")
            raise PathPatchError(
                f"{str(root)!r} holds another sweep ({'; '.join(differ)}): its results would "
                f"drop out of the views.{why} Give --out a new folder, or --force to take the "
                "folder over (its result files are kept in superseded/)")

    # --- spec, manifest, events -------------------------------------------------------------

    def exists(self) -> bool:
        return self.manifest_path.is_file()

    def write_spec(self, text: str, spec_hash: str) -> None:
        """Keep the spec as given: `spec.toml` (latest) and `specs/<hash>.toml` (each)."""
        (self.root / "specs").mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(self.spec_path, text.encode())
        atomic_write_bytes(self.root / "specs" / f"{spec_hash[:16]}.toml", text.encode())

    def write_manifest(self, manifest: dict[str, Any]) -> None:
        """Write the manifest, unless the folder's is equal (a resume of the same plan: at 10^5
        items, encoding it took seconds and reading it back a fraction of that)."""
        with contextlib.suppress(OSError, ValueError):
            if json.loads(self.manifest_path.read_bytes()) == manifest:
                return
        atomic_write_bytes(self.manifest_path,
                           (json.dumps(manifest, indent=1, sort_keys=True) + "\n").encode())

    def write_hypotheses(self, plan: Plan) -> None:
        """Write `hypotheses.parquet`: what each of the plan's hypotheses is (call right after
        the manifest: its metadata names the plan both describe)."""
        table = hypotheses_table(plan.hypotheses)
        digest = plan_digest([(h.name, h.canonical) for h in plan.hypotheses])
        table = table.replace_schema_metadata({PLAN_KEY: digest.encode()})
        atomic_write(self.hypotheses_path,
                     lambda f: pq.write_table(table, f, compression="zstd"))

    def missing_hypotheses(self, manifest: dict[str, Any]) -> str | None:
        """Why this folder's `hypotheses` view cannot be built, or None when it can: its plan
        names hypotheses but the folder has no `hypotheses.parquet` (written by a pathpatch
        older than the table)."""
        planned = manifest.get("hypotheses", [])
        fix = (f"`pathpatch resume {self.root}` writes the table from its spec without "
               "recomputing any work item")
        if self.hypotheses_path.is_file():
            try:
                written = (pq.read_schema(self.hypotheses_path).metadata or {}).get(PLAN_KEY)
            except (OSError, pa.ArrowException):
                written = None
            if written == plan_digest([(h["name"], h["canonical"]) for h in planned]).encode():
                return None
            return (f"sweep folder {str(self.root)!r}: its hypotheses.parquet describes another "
                    "plan than its manifest.json (a run stopped between writing the two, or another "
                    "version of pathpatch wrote it): "
                    + fix)
        if not any(h.get("kind", "evaluation") == "evaluation" for h in planned):
            return None
        return (f"sweep folder {str(self.root)!r} has no hypotheses.parquet (the table of what "
                "each hypothesis is: family, target edge or node, ranking, k, ...), which the "
                f"curve, edge and node views join on; it was written by an older pathpatch: {fix}")

    def read_manifest(self) -> dict[str, Any]:
        """The manifest; an error that says what to do when this is not a sweep folder."""
        if not self.manifest_path.is_file():
            raise PathPatchError(
                f"{str(self.root)!r} is not a sweep folder (no manifest.json): give the folder "
                "that `pathpatch run SPEC --out DIR` wrote"
            )
        try:
            manifest = json.loads(self.manifest_path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise PathPatchError(f"{self.manifest_path}: unreadable manifest ({err}); run the "
                                 "sweep again to rewrite it") from None
        if manifest.get("format") != MANIFEST_FORMAT:
            raise PathPatchError(f"{self.manifest_path}: format {manifest.get('format')!r}, "
                                 f"expected {MANIFEST_FORMAT!r}")
        return manifest

    def log(self, event: str, **fields: Any) -> None:
        """Append one event line (flushed and fsynced: it is the record of what happened;
        inside `batched`, fsynced with the batch)."""
        line = json.dumps({"time": round(time.time(), 3), "event": event, **fields},
                          sort_keys=True, default=str)
        if self._events is not None and self._batch is not None:  # fsynced with the batch
            self._events.write(line + "\n")
            self._events.flush()  # the OS has it: a killed driver loses no line
            self._batch.dirty = True
            return
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.events_path, "a") as f:
            f.write(line + "\n")
            f.flush()
            os.fsync(f.fileno())

    def events(self) -> list[dict[str, Any]]:
        if not self.events_path.is_file():
            return []
        out = []
        for line in self.events_path.read_text().splitlines():
            with contextlib.suppress(json.JSONDecodeError):  # a line cut by a crash
                out.append(json.loads(line))
        return out

    # --- result files -----------------------------------------------------------------------

    def item_path(self, item_id: str) -> Path:
        return self.items_dir / f"{item_id}.parquet"

    def remove_stale_temps(self) -> int:
        """Delete temp files a killed driver left (only call while holding the lock)."""
        removed = 0
        for folder in (self.items_dir, self.failed_dir, self.root, self.root / "specs"):
            if not folder.is_dir():
                continue
            for path in folder.iterdir():
                if TEMP_MARK in path.name:
                    path.unlink(missing_ok=True)
                    removed += 1
        return removed

    def set_aside(self, current: set[str]) -> tuple[int, int]:
        """Keep `items/` exactly the current plan's results: files of items the plan no longer
        names move to `superseded/`, and back when a plan names them again (so editing a spec
        back costs nothing). Only call while holding the lock.

        Returns:
            (files moved out, files moved back).
        """
        out = back = 0
        aside = self.root / "superseded"
        if self.items_dir.is_dir():
            for path in self.items_dir.glob("*.parquet"):
                if path.stem not in current:
                    aside.mkdir(exist_ok=True)
                    os.replace(path, aside / path.name)
                    out += 1
        if aside.is_dir():
            for path in aside.glob("*.parquet"):
                if path.stem in current and not self.item_path(path.stem).exists():
                    self.items_dir.mkdir(parents=True, exist_ok=True)
                    os.replace(path, self.item_path(path.stem))
                    back += 1
        if out or back:
            for folder in (self.items_dir, aside):
                if folder.is_dir():
                    fsync_dir(folder)
        return out, back

    def is_whole(self, item_id: str, expected_rows: int, *, full: bool = True) -> bool:
        """Does the item's file read back whole? (`full=False` reads the footer only.)"""
        path = self.item_path(item_id)
        if not path.is_file():
            return False
        try:
            if full:
                table = pq.read_table(path)
                meta, rows = table.schema.metadata or {}, table.num_rows
            else:
                md = pq.read_metadata(path)
                meta, rows = md.metadata or {}, md.num_rows
            prov = json.loads(meta.get(META_KEY, b"{}"))
        except (OSError, pa.ArrowException, ValueError):
            return False
        return rows == expected_rows and prov.get("item") == item_id

    def write_item(self, item: WorkItem, table: pa.Table, provenance: dict[str, Any]) -> Path:
        """Write one item's rows atomically and check its footer reads back (rows, item id).

        Adds columns `item` (identity) and `shard` (index) so rows can be joined and broken
        down. Raises PathPatchError when the rows are not one per (hypothesis, example).
        """
        if table.num_rows != item.expected_rows:
            raise PathPatchError(
                f"item {item.id}: the engine returned {table.num_rows} rows, expected "
                f"{item.expected_rows} ({len(item.hypotheses)} hypotheses x "
                f"{item.n_examples} examples)"
            )
        table = table.append_column("item", pa.array([item.id] * table.num_rows, pa.string()))
        table = table.append_column("shard",
                                    pa.array([item.shard.index] * table.num_rows, pa.int32()))
        meta = dict(table.schema.metadata or {})
        meta[META_KEY] = json.dumps({**provenance, "item": item.id, "rows": table.num_rows},
                                    sort_keys=True).encode()
        table = table.replace_schema_metadata(meta)
        sink = pa.BufferOutputStream()  # encoded in memory, written in one call
        # dictionaries only where values repeat (names, ids, indices): a float column's would
        # be as long as the column, and cost a fifth of the write
        pq.write_table(table, sink, compression="zstd", use_dictionary=[
            f.name for f in table.schema if not pa.types.is_floating(f.type)])
        data = sink.getvalue()
        if self._batch is None:
            self.items_dir.mkdir(parents=True, exist_ok=True)
        path = self.item_path(item.id)
        atomic_write_bytes(path, data, sync=self._batch is None)
        # The size, not the rows: just written, the rows would come back from the page cache,
        # so reading them checks pyarrow against itself (it doubled the driver's cost per item).
        if path.stat().st_size != data.size:
            path.unlink(missing_ok=True)
            raise OSError(f"{path} did not read back whole; the disk may be full or failing")
        self.clear_failure(item.id)
        if self._batch is None:
            self._record_done([(item.id, table.num_rows)])
        else:
            self._batch.pending.append((item.id, table.num_rows))
            if (len(self._batch.pending) >= BATCH_ITEMS
                    or time.monotonic() - self._batch.since >= BATCH_SECONDS):
                self.flush()
        return path

    # --- durability in batches, and the done index --------------------------------------------

    @contextlib.contextmanager
    def batched(self) -> Iterator[None]:
        """Within: result files and event lines are written as they come (each file appears
        whole at once) but made durable together, by one `sync_filesystem` per batch
        (`BATCH_ITEMS` files or `BATCH_SECONDS`), after which their done-index lines are
        written; and on leaving. A killed driver loses nothing it wrote; a power cut loses at
        most the last batch's durability: those files are not in the done index, so the next
        run reads them in full (`whole_items`) and redoes any that are damaged. Only call while
        holding the lock.
        """
        self.items_dir.mkdir(parents=True, exist_ok=True)
        self._batch = _Batch()
        self._batch.failed = set(self.failures_listed())
        self._events = open(self.events_path, "a")  # noqa: SIM115 -- closed below
        try:
            yield
        finally:
            try:
                self.flush()
            finally:
                self._events.close()
                self._events, self._batch = None, None

    def flush(self) -> None:
        """Make what this batch wrote durable, then record its files in the done index."""
        batch = self._batch
        if batch is None or not (batch.pending or batch.dirty):
            return
        sync_filesystem(self.root)
        self._record_done(batch.pending)
        batch.pending, batch.dirty, batch.since = [], False, time.monotonic()

    def _record_done(self, written: Sequence[tuple[str, int]]) -> None:
        """Append the done-index lines of durable result files (item id, rows), and fsync."""
        lines = []
        for item_id, rows in written:
            try:
                st = self.item_path(item_id).stat()
            except FileNotFoundError:
                continue
            lines.append(f"{item_id}\t{st.st_size}\t{st.st_mtime_ns}\t{rows}\n")
        if not lines:
            return
        with open(self.done_path, "a+b") as f:
            if f.tell() and os.pread(f.fileno(), 1, f.tell() - 1) != b"\n":
                f.write(b"\n")  # end a line a crash cut short: it is skipped, not extended
            f.write("".join(lines).encode())
            f.flush()
            os.fsync(f.fileno())

    def done_index(self) -> dict[str, tuple[int, int, int]]:
        """The done index: item id -> (size, mtime_ns, rows) of its file when it was recorded
        (the latest line wins; a line a crash cut short, or not of this form, is skipped)."""
        try:
            text = self.done_path.read_bytes().decode(errors="replace")
        except FileNotFoundError:
            return {}
        out: dict[str, tuple[int, int, int]] = {}
        lines = text.split("\n")
        for line in lines[:-1]:  # the last is "" after a whole line, else a cut one
            parts = line.split("\t")
            if len(parts) == 4 and parts[1].isdigit() and parts[2].isdigit() and parts[3].isdigit():
                out[parts[0]] = (int(parts[1]), int(parts[2]), int(parts[3]))
        if len(lines) > 2 * len(out) + 1024:  # mostly superseded lines: rewrite it compact
            atomic_write_bytes(self.done_path, "".join(
                f"{k}\t{a}\t{b}\t{c}\n" for k, (a, b, c) in out.items()).encode())
        return out

    def whole_items(self, items: Sequence[tuple[str, int]]) -> tuple[set[str], set[str]]:
        """Which of these (item id, expected rows) have a whole result file, and which have a
        file that is not whole (truncated, corrupt, another item's). A file the done index
        records at its current size and mtime is whole without being opened; any other is read
        in full, and recorded when whole. Only call while holding the lock.

        Returns:
            (ids whose file is whole, ids whose file is there but not whole).
        """
        index = self.done_index()
        try:
            files = {e.name: e for e in os.scandir(self.items_dir)}
        except FileNotFoundError:
            return set(), set()
        whole: set[str] = set()
        broken: set[str] = set()
        verified: list[tuple[str, int]] = []
        for item_id, rows in items:
            entry = files.get(f"{item_id}.parquet")
            if entry is None:
                continue
            try:
                st = entry.stat()
            except OSError:
                continue
            if index.get(item_id) == (st.st_size, st.st_mtime_ns, rows):
                whole.add(item_id)
            elif self.is_whole(item_id, rows, full=True):
                whole.add(item_id)
                verified.append((item_id, rows))
            else:
                broken.add(item_id)
        if verified:  # perhaps written by a driver stopped before its batch was made durable
            sync_filesystem(self.root)
            self._record_done(verified)
        return whole, broken

    # --- failures -----------------------------------------------------------------------------

    def record_failure(self, item_id: str, error: str, attempts: int) -> None:
        if self._batch is not None:
            self._batch.failed.add(item_id)
        self.failed_dir.mkdir(parents=True, exist_ok=True)
        record = {"item": item_id, "error": error, "attempts": attempts, "time": time.time()}
        atomic_write_bytes(self.failed_dir / f"{item_id}.json",
                           json.dumps(record, indent=1).encode())

    def clear_failure(self, item_id: str) -> None:
        if self._batch is not None:  # inside `batched`, only the records known to be there
            if item_id not in self._batch.failed:
                return
            self._batch.failed.discard(item_id)
        (self.failed_dir / f"{item_id}.json").unlink(missing_ok=True)

    def failures_listed(self) -> list[str]:
        """Item ids with a failure record (their names only: nothing is read)."""
        if not self.failed_dir.is_dir():
            return []
        return [p.stem for p in self.failed_dir.glob("*.json")]

    def failures(self) -> dict[str, dict[str, Any]]:
        out = {}
        if self.failed_dir.is_dir():
            for path in sorted(self.failed_dir.glob("*.json")):
                with contextlib.suppress(OSError, json.JSONDecodeError):
                    out[path.stem] = json.loads(path.read_text())
        return out


# --- manifest and status ------------------------------------------------------------------------


def build_manifest(plan: Plan, *, spec_name: str, spec_hash: str, spec_file: str,
                   base_dir: str, model: str, seed: int, provenance: dict[str, Any]
                   ) -> dict[str, Any]:
    """The manifest: enough to report status and build SQL views without loading a model."""
    return {
        "format": MANIFEST_FORMAT,
        "name": spec_name,
        "spec_hash": spec_hash,
        "spec_file": spec_file,
        "base_dir": base_dir,
        "model": model,
        "model_digest": plan.model_digest,
        "metric": plan.metric,
        "dtype": plan.dtype,
        # absent under resample, so manifests written before interventions read the same
        **({"intervention": plan.intervention} if plan.intervention != "resample" else {}),
        "seed": seed,
        "provenance": provenance,
        "hypotheses": [dict(_manifest_fields(h), group=g) for g, group in enumerate(plan.groups)
                       for h in group],
        "shards": [asdict(s) for s in plan.shards],
        "items": [item_record(item) for item in plan.items],
    }


def plan_digest(hypotheses: list[tuple[str, str]]) -> str:
    """sha256 (hex, 32 chars) of a plan's (name, canonical) pairs, in order."""
    text = json.dumps(hypotheses, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def _manifest_fields(h: HypothesisInfo) -> dict[str, Any]:
    """A hypothesis as the manifest lists it: all but its facts (`hypotheses.parquet`'s)."""
    return {f.name: getattr(h, f.name) for f in fields(h) if f.name != "facts"}


def item_record(item: WorkItem) -> dict[str, Any]:
    """A work item as the manifest lists it (what status and the views read)."""
    return {"id": item.id, "group": item.group, "shard": item.shard.index,
            "shard_id": item.shard.id, "n_examples": item.n_examples,
            "rows": item.expected_rows, "hypotheses": [h.name for h in item.hypotheses],
            "kind": item.kind}


def item_status(folder: SweepFolder, manifest: dict[str, Any], *, full: bool = False
                ) -> list[dict[str, Any]]:
    """One record per current item: id, group, shard, status (done/failed/pending), error."""
    failures = folder.failures()
    out = []
    for item in manifest["items"]:
        if folder.is_whole(item["id"], item["rows"], full=full):
            status, error, attempts = "done", None, None
        elif item["id"] in failures:
            status = "failed"
            error = failures[item["id"]].get("error")
            attempts = failures[item["id"]].get("attempts")
        else:
            status, error, attempts = "pending", None, None
        out.append({**item, "status": status, "error": error, "attempts": attempts,
                    "path": str(folder.item_path(item["id"]))})
    return out


def summarize_status(records: list[dict[str, Any]], by: str | None = None) -> dict[str, Any]:
    """Counts of done/failed/pending, overall and optionally per hypothesis or shard."""
    def count(rs: list[dict[str, Any]]) -> dict[str, int]:
        c = {"done": 0, "failed": 0, "pending": 0}
        for r in rs:
            c[r["status"]] += 1
        c["total"] = len(rs)
        return c

    out: dict[str, Any] = count(records)
    if by == "hypothesis":
        keys = sorted({h for r in records for h in r["hypotheses"]},
                      key=lambda h: min(i for i, r in enumerate(records) if h in r["hypotheses"]))
        out["by_hypothesis"] = {h: count([r for r in records if h in r["hypotheses"]])
                                for h in keys}
    elif by == "shard":
        shards = sorted({r["shard"] for r in records})
        out["by_shard"] = {str(s): count([r for r in records if r["shard"] == s])
                           for s in shards}
    out["failures"] = [{"item": r["id"], "error": r["error"], "attempts": r["attempts"]}
                       for r in records if r["status"] == "failed"]
    return out
