"""A sweep spec: one TOML file parsed into a frozen, validated `SweepSpec` (no model loaded).

This module checks only what can be checked from the text itself: known keys, types, ranges,
and files that must exist. Everything that needs the model (node names, patterns, vocabulary,
mixed-copy bounds) is checked by `pipeline.resolve` before any cluster work. Every error names
the key (``resources.workers``), the bad value, what is allowed and the likely fix.

The format (every key) is documented in docs/PIPELINE.md; `jobs/default.toml` is an example.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import tomllib
from dataclasses import MISSING, asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from pathpatch.discovery.attribution import Attribution
from pathpatch.engine.ablation import Intervention
from pathpatch.engine.evaluation import DEFAULT_MAX_MIXED_COPIES
from pathpatch.engine.metrics import DEFAULT_METRIC
from pathpatch.errors import PathPatchError

DTYPES = ("float32", "float64", "bfloat16", "float16")
"""Precisions a sweep may evaluate in (torch dtype names)."""

DATASET_KEYS_PATH = ("path", "columns", "prepend_bos", "answer_tokens", "counterfactual", "split",
                     "tokenizer")
"""Keys of a file dataset: the path, then how a text dataset is read (`pathpatch.data.text`)."""

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*$", re.IGNORECASE)
_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


@dataclass(frozen=True)
class Resources:
    """How much of the cluster a sweep uses; none of it changes a result row.

    Attributes:
        workers: number of actors (each holds one model); None = as many as the cluster fits.
        gpus_per_worker: GPUs each actor asks Ray for; None = 1 where the cluster has GPUs,
            else 0.
        threads_per_worker: torch threads (and Ray CPUs) per actor.
        memory_budget: bytes the engine may use per call (shrinks batches; never approximates);
            None = the engine's default.
        batch_size: examples per engine pass; None = the engine decides.
    """

    workers: int | None = None
    gpus_per_worker: float | None = None
    threads_per_worker: int = 1
    memory_budget: int | None = None
    batch_size: int | None = None


@dataclass(frozen=True)
class Execution:
    """Fault-handling policy of the driver.

    Attributes:
        max_attempts: tries per work item before it is recorded as failed.
        item_timeout_s: seconds one item may run on an actor before the actor is replaced.
        start_timeout_s: seconds an actor may take to start (load its model).
        in_flight_per_worker: calls queued on one actor at once (2 keeps it busy).
        shard_cache: shards an actor keeps in memory.
    """

    max_attempts: int = 3
    item_timeout_s: float = 900.0
    start_timeout_s: float = 300.0
    in_flight_per_worker: int = 2
    shard_cache: int = 8


@dataclass(frozen=True)
class DatasetSpec:
    """Where the pairs come from: a generator with parameters, or a Parquet file.

    Attributes:
        kind: generator name for `pathpatch.data.tasks.make_dataset` (None for a file).
        params: generator parameters as sorted (key, value) pairs (lists become tuples).
        path: absolute path of a dataset file or `datasets` folder (None for a generator).
        text: a text dataset's keys (`columns`, `prepend_bos`, `answer_tokens`,
            `counterfactual`, `split`, `tokenizer`) as sorted (key, value) pairs; `columns` a
            sorted tuple of (role, column) pairs, `tokenizer` an absolute path or a model name.
    """

    kind: str | None = None
    params: tuple[tuple[str, Any], ...] = ()
    path: str | None = None
    text: tuple[tuple[str, Any], ...] = ()

    def table(self) -> dict[str, Any]:
        """The `[dataset]` table this spec reads back to (provenance, written specs)."""
        if self.path is None:
            return {"kind": self.kind, **{k: _thaw(v) for k, v in self.params}}
        return {"path": self.path, **{k: dict(v) if k == "columns" else v for k, v in self.text}}


@dataclass(frozen=True)
class SearchSpec:
    """An exact greedy circuit search (`pathpatch.discovery.greedy`): the spec's [search] table.

    Attributes:
        tau: remove an edge when the mean metric rises by less than this (ACDC's threshold).
        window: candidates evaluated together as one hypothesis group; never changes the
            result, only how many evaluations run at once (and how many are discarded).
    """

    tau: float
    window: int = 8


@dataclass(frozen=True)
class SweepSpec:
    """A validated sweep spec (see docs/PIPELINE.md for every key).

    Attributes:
        name: label of the sweep (default: the file's stem).
        model: model spec for `pathpatch.model.loading.load_model` (paths made absolute).
        dataset: the pairs.
        shard_size: examples per shard.
        group_size: hypotheses evaluated together in one work item.
        metric: metric spec ("kl", "loss", "logit_diff" or "module:function").
        hypotheses: the [[hypotheses]] entries, each as sorted (key, value) pairs.
        attributions: the [[attributions]] entries (method, steps, name, points), each as sorted
            (key, value) pairs: approximate edge scores per example (`pathpatch.discovery.attribution`).
        search: the [search] table: an exact greedy circuit search instead of hypotheses.
        seed: seed of the dataset generator (unless it sets its own) and of the bootstrap.
        dtype: evaluation precision.
        max_mixed_copies: reject a hypothesis needing more mixed node copies than this.
        intervention: what paths outside a hypothesis carry: "resample" (each example's
            counterfactual prompt, the default), "zero", "mean" or "mean_positional" (means over
            the whole dataset's reference prompts; `pathpatch.engine.ablation`).
        intervention_dataset: for "mean" and "mean_positional", another dataset whose reference
            prompts the means are taken over (EAP-IG's `intervention_dataloader`); None: the
            sweep's own.
        resources, execution: cluster use and fault policy (not part of any identity).
        source: the TOML text as given; base_dir: the folder relative paths were read from.
    """

    name: str
    model: str
    dataset: DatasetSpec
    hypotheses: tuple[tuple[tuple[str, Any], ...], ...]
    attributions: tuple[tuple[tuple[str, Any], ...], ...] = ()
    search: SearchSpec | None = None
    shard_size: int = 64
    group_size: int = 8
    metric: str = DEFAULT_METRIC
    seed: int = 0
    dtype: str = "float32"
    max_mixed_copies: int = DEFAULT_MAX_MIXED_COPIES
    intervention: str = Intervention.RESAMPLE.value
    intervention_dataset: DatasetSpec | None = None
    resources: Resources = field(default_factory=Resources)
    execution: Execution = field(default_factory=Execution)
    source: str = field(default="", compare=False, repr=False)
    base_dir: str = field(default=".", compare=False, repr=False)

    def hypothesis_entries(self) -> list[dict[str, Any]]:
        """The [[hypotheses]] entries as plain dicts (lists back as lists)."""
        return [{k: _thaw(v) for k, v in entry} for entry in self.hypotheses]

    def attribution_entries(self) -> list[dict[str, Any]]:
        """The [[attributions]] entries as plain dicts."""
        return [dict(entry) for entry in self.attributions]

    def dataset_params(self) -> dict[str, Any]:
        """Generator parameters as plain dicts/lists, with the sweep seed unless set."""
        params = {k: _thaw(v) for k, v in self.dataset.params}
        params.setdefault("seed", self.seed)
        return params

    def digest(self) -> str:
        """sha256 over every resolved field (the provenance 'spec hash')."""
        fields = asdict(self)
        fields.pop("source")
        fields.pop("base_dir")
        if fields["intervention"] == Intervention.RESAMPLE.value:
            fields.pop("intervention")  # the default leaves earlier specs' hashes as they were
        if fields["intervention_dataset"] is None:
            fields.pop("intervention_dataset")
        if not fields["dataset"]["text"]:
            fields["dataset"].pop("text")  # likewise a dataset without text keys
        text = json.dumps(fields, sort_keys=True, default=repr)
        return hashlib.sha256(text.encode()).hexdigest()

    def with_resources(self, **changes: Any) -> SweepSpec:
        """A copy with some `Resources` fields replaced (e.g. `workers=2` from the CLI)."""
        return replace(self, resources=replace(self.resources, **changes))


def _keys(cls) -> tuple[str, ...]:
    """A section's TOML keys: its dataclass's fields (the spec's own bookkeeping excluded)."""
    return tuple(f.name for f in fields(cls) if f.name not in ("source", "base_dir"))


def _default(cls, key: str) -> Any:
    """The default of field `key` of dataclass `cls`: the one place each default is written."""
    f = next(f for f in fields(cls) if f.name == key)
    return f.default if f.default_factory is MISSING else f.default_factory()


TOP_KEYS = _keys(SweepSpec)
RESOURCE_KEYS = _keys(Resources)
EXECUTION_KEYS = _keys(Execution)


def load_spec(path: str | Path) -> SweepSpec:
    """Read and validate the sweep spec at `path`.

    Raises:
        PathPatchError: the file is missing or not TOML, or a key is unknown or invalid.
    """
    path = Path(path)
    if path.is_dir():
        raise PathPatchError(f"sweep spec {str(path)!r} is a folder: give the path of a .toml file "
                             "in it (jobs/default.toml is an example)")
    if not path.is_file():
        raise PathPatchError(f"sweep spec {str(path)!r} does not exist: give the path of a .toml "
                             "file (jobs/default.toml is an example)")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise PathPatchError(f"sweep spec {str(path)!r} cannot be read as UTF-8 text ({err})") from None
    return parse_spec(text, base_dir=path.resolve().parent, default_name=path.stem,
                      where=str(path))


def parse_spec(text: str, *, base_dir: str | Path = ".", default_name: str = "sweep",
               where: str = "spec") -> SweepSpec:
    """Validate TOML `text`; relative paths in it are read from `base_dir`.

    Raises:
        PathPatchError: naming the key, the value, what is allowed and the likely fix.
    """
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise PathPatchError(f"{where}: not valid TOML ({err}); fix the syntax there") from None
    base = Path(base_dir)
    _no_unknown(raw, TOP_KEYS, "", where)
    for key in ("model", "dataset", "hypotheses"):
        if key == "hypotheses" and ("attributions" in raw or "search" in raw):
            continue  # a sweep of attribution scores, or a search
        if key not in raw:
            raise PathPatchError(f"{where}: missing required key '{key}'; see docs/PIPELINE.md "
                                 "or jobs/default.toml for an example")

    def get(key: str) -> Any:
        return raw.get(key, _default(SweepSpec, key))

    name = _sweep_name(raw.get("name", default_name), where)
    model = _model(raw["model"], base, where)
    dataset = _dataset(raw["dataset"], base, where)
    shard_size = _int(get("shard_size"), "shard_size", where, low=1)
    group_size = _int(get("group_size"), "group_size", where, low=1)
    metric = _string(get("metric"), "metric", where)
    seed = _int(get("seed"), "seed", where, low=0)
    dtype = _string(get("dtype"), "dtype", where)
    if dtype not in DTYPES:
        raise PathPatchError(f"{where}: dtype = {dtype!r} is not supported: allowed are "
                             f"{', '.join(DTYPES)}")
    max_copies = _int(get("max_mixed_copies"), "max_mixed_copies", where, low=1)
    try:
        intervention = Intervention.parse(_string(get("intervention"), "intervention", where))
    except PathPatchError as err:
        raise PathPatchError(f"{where}: {err}") from None
    means_over = None
    if "intervention_dataset" in raw:
        if intervention not in (Intervention.MEAN, Intervention.MEAN_POSITIONAL):
            raise PathPatchError(
                f"{where}: [intervention_dataset] names the prompts that means are taken over, "
                f"but intervention = {intervention.value!r} takes no mean: set intervention = "
                "\"mean\" or \"mean_positional\", or remove [intervention_dataset]")
        means_over = _dataset(raw["intervention_dataset"], base, where, "intervention_dataset")
    hypotheses = _hypotheses(raw["hypotheses"], base, where) if "hypotheses" in raw else ()
    attributions = _attributions(raw.get("attributions", []), where)
    search = _search(raw["search"], where) if "search" in raw else None
    if search is not None and (hypotheses or attributions):
        raise PathPatchError(f"{where}: a [search] finds its own circuits: remove the "
                             "[[hypotheses]] and [[attributions]] entries (run them as another "
                             "sweep)")
    return SweepSpec(
        name=name, model=model, dataset=dataset, shard_size=shard_size, group_size=group_size,
        metric=metric, hypotheses=hypotheses, attributions=attributions, search=search,
        seed=seed, dtype=dtype, intervention=intervention.value, intervention_dataset=means_over,
        max_mixed_copies=max_copies, resources=_resources(raw.get("resources", {}), where),
        execution=_execution(raw.get("execution", {}), where), source=text,
        base_dir=str(base.resolve()),
    )


# --- sections --------------------------------------------------------------------------------


def _model(value: Any, base: Path, where: str) -> str:
    model = _string(value, "model", where)
    # A path relative to the spec's folder wins where it exists; otherwise the name is passed
    # on as given (bundled name, TransformerLens name, or a path relative to the cwd).
    local = (base / model).expanduser()
    if not Path(model).is_absolute() and local.exists():
        return str(local.resolve())
    if model.startswith(("/", "./", "../", "~")) and not Path(model).expanduser().exists():
        if Path(model).expanduser().is_absolute():
            raise PathPatchError(f"{where}: model = {model!r}: no such file or directory; check "
                                 "the path (a model directory or checkpoint file)")
        raise PathPatchError(
            f"{where}: model = {model!r}: no such file or directory (looked for "
            f"{local.resolve()} beside the spec and {(Path.cwd() / model).resolve()} in the "
            "working directory); check the path")
    return model


def _dataset(value: Any, base: Path, where: str, key: str = "dataset") -> DatasetSpec:
    if not isinstance(value, dict):
        raise PathPatchError(f"{where}: {key} must be a table ([{key}] with kind = ... or "
                             f"path = ...), got {value!r}")
    if "path" in value:
        _no_unknown(value, DATASET_KEYS_PATH, f"{key}.", where,
                    hint="a file dataset takes 'path' and a text dataset's keys (docs/PIPELINE.md)")
        raw_path = _string(value["path"], f"{key}.path", where)
        path = (base / raw_path).expanduser().resolve()
        if not path.exists():
            raise PathPatchError(f"{where}: {key}.path = {raw_path!r}: no such file or folder "
                                 f"({path}); the path is read relative to the spec's folder")
        return DatasetSpec(path=str(path), text=_text_keys(value, base, where, key))
    if "kind" not in value:
        raise PathPatchError(f"{where}: [{key}] needs kind = \"induction\" (a generator) or "
                             "path = \"pairs.parquet\" (a file)")
    kind = _string(value["kind"], f"{key}.kind", where)
    params = tuple(sorted((k, _freeze(v)) for k, v in value.items() if k != "kind"))
    return DatasetSpec(kind=kind, params=params)


def _text_keys(value: dict, base: Path, where: str,
               key: str = "dataset") -> tuple[tuple[str, Any], ...]:
    """A text dataset's keys, checked for type (`pathpatch.data.text.TextOptions` checks the
    values against the file)."""
    from pathpatch.data.text import ANSWER_TOKENS, ROLES

    out: dict[str, Any] = {}
    if "columns" in value:
        columns = value["columns"]
        if not isinstance(columns, dict) or not all(isinstance(v, str) for v in columns.values()):
            raise PathPatchError(f"{where}: {key}.columns = {columns!r}: give a table of role = "
                                 f"\"column\" (roles {list(ROLES)})")
        unknown = sorted(set(columns) - set(ROLES))
        if unknown:
            raise PathPatchError(f"{where}: {key}.columns: unknown role(s) {unknown}; roles "
                                 f"are {list(ROLES)}")
        out["columns"] = tuple(sorted(columns.items()))
    if "prepend_bos" in value:
        if not isinstance(value["prepend_bos"], bool):
            raise PathPatchError(f"{where}: {key}.prepend_bos = {value['prepend_bos']!r}: give "
                                 "true or false (leave it out for the tokenizer's convention)")
        out["prepend_bos"] = value["prepend_bos"]
    if "answer_tokens" in value and value["answer_tokens"] not in ANSWER_TOKENS:
        raise PathPatchError(f"{where}: {key}.answer_tokens = {value['answer_tokens']!r}: "
                             f"allowed are {list(ANSWER_TOKENS)}")
    for name in ("answer_tokens", "counterfactual", "split"):
        if name in value:
            out[name] = _string(value[name], f"{key}.{name}", where)
    if "tokenizer" in value:
        raw = _string(value["tokenizer"], f"{key}.tokenizer", where)
        local = (base / raw).expanduser()
        out["tokenizer"] = str(local.resolve()) if local.exists() else raw
    return tuple(sorted(out.items()))


FILE_PARAMETERS = ("ranking",)
"""Family parameters that name a file: read relative to the spec's folder, checked to exist."""


def _hypotheses(value: Any, base: Path, where: str) -> tuple[tuple[tuple[str, Any], ...], ...]:
    if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
        raise PathPatchError(f"{where}: hypotheses must be an array of tables ([[hypotheses]] "
                             "with name/pattern or family = ...)")
    if not value:
        raise PathPatchError(f"{where}: hypotheses is empty: add at least one [[hypotheses]] "
                             "entry")
    entries = []
    for i, entry in enumerate(value):
        entry = dict(entry)
        for key in FILE_PARAMETERS:
            if "family" in entry and key in entry:
                raw = _string(entry[key], f"hypotheses[{i}].{key}", where)
                path = (base / raw).expanduser().resolve()
                if not path.is_file():
                    raise PathPatchError(f"{where}: hypotheses[{i}].{key} = {raw!r}: no such file "
                                         f"({path}); the path is read relative to the spec's folder")
                entry[key] = str(path)
        entries.append(tuple(sorted((k, _freeze(v)) for k, v in entry.items())))
    return tuple(entries)


ATTRIBUTION_KEYS = ("method", "steps", "name", "points")
SEARCH_KEYS = ("tau", "window")


def _search(value: Any, where: str) -> SearchSpec:
    _table(value, "search", where)
    _no_unknown(value, SEARCH_KEYS, "search.", where)
    if "tau" not in value:
        raise PathPatchError(f"{where}: [search] needs tau = <threshold> (remove an edge when the "
                             "mean metric rises by less than tau; ACDC's KL runs use 0.001-0.1)")
    tau = value["tau"]
    if isinstance(tau, bool) or not isinstance(tau, int | float) or not math.isfinite(tau) \
            or tau < 0:
        raise PathPatchError(f"{where}: search.tau = {tau!r}: give a number >= 0")
    window = _int(value.get("window", _default(SearchSpec, "window")), "search.window", where,
                  low=1)
    return SearchSpec(tau=float(tau), window=window)


def _attributions(value: Any, where: str) -> tuple[tuple[tuple[str, Any], ...], ...]:
    if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
        raise PathPatchError(f"{where}: attributions must be an array of tables "
                             "([[attributions]] with method = \"eap\" or \"eap-ig\")")
    entries, names = [], set()
    for i, entry in enumerate(value):
        key = f"attributions[{i}]"
        _no_unknown(entry, ATTRIBUTION_KEYS, key + ".", where)
        if "method" not in entry:
            raise PathPatchError(f"{where}: {key} needs method = \"eap\" or \"eap-ig\"")
        if "name" in entry:
            _string(entry["name"], f"{key}.name", where)
        try:
            made = Attribution(**entry)
        except (PathPatchError, TypeError) as err:
            raise PathPatchError(f"{where}: {key}: {err}") from None
        if made.name in names:
            raise PathPatchError(f"{where}: {key}: a second attribution named {made.name!r}; "
                                 "give each a distinct name")
        names.add(made.name)
        entry = {"method": made.method, "steps": made.steps, "name": made.name}
        if made.points:  # eap-ig's only: an eap entry (and its spec's hash) stays as it was
            entry["points"] = made.points
        entries.append(tuple(sorted(entry.items())))
    return tuple(entries)


def _resources(value: Any, where: str) -> Resources:
    _table(value, "resources", where)
    _no_unknown(value, RESOURCE_KEYS, "resources.", where)
    workers = value.get("workers", "auto")
    if workers != "auto":
        workers = _int(workers, "resources.workers", where, low=1, extra="or \"auto\"")
    gpus = value.get("gpus_per_worker", "auto")
    if gpus != "auto":
        if isinstance(gpus, bool) or not isinstance(gpus, int | float) or gpus < 0:
            raise PathPatchError(f"{where}: resources.gpus_per_worker = {gpus!r}: give a number "
                                 ">= 0 or \"auto\"")
        gpus = float(gpus)
    budget = value.get("memory_budget")
    batch = value.get("batch_size")
    return Resources(
        workers=None if workers == "auto" else workers,
        gpus_per_worker=None if gpus == "auto" else gpus,
        threads_per_worker=_int(value.get("threads_per_worker", _default(Resources, "threads_per_worker")),
                                "resources.threads_per_worker", where, low=1),
        memory_budget=None if budget is None else _bytes(budget, "resources.memory_budget",
                                                         where),
        batch_size=None if batch is None else _int(batch, "resources.batch_size", where, low=1),
    )


def _execution(value: Any, where: str) -> Execution:
    _table(value, "execution", where)
    _no_unknown(value, EXECUTION_KEYS, "execution.", where)
    d = Execution()
    return Execution(
        max_attempts=_int(value.get("max_attempts", d.max_attempts), "execution.max_attempts",
                          where, low=1),
        item_timeout_s=_seconds(value.get("item_timeout_s", d.item_timeout_s),
                                "execution.item_timeout_s", where),
        start_timeout_s=_seconds(value.get("start_timeout_s", d.start_timeout_s),
                                 "execution.start_timeout_s", where),
        in_flight_per_worker=_int(value.get("in_flight_per_worker", d.in_flight_per_worker),
                                  "execution.in_flight_per_worker", where, low=1),
        shard_cache=_int(value.get("shard_cache", d.shard_cache), "execution.shard_cache",
                         where, low=1),
    )


# --- small checks ----------------------------------------------------------------------------


def _no_unknown(table: dict, allowed: tuple[str, ...], prefix: str, where: str,
                hint: str = "") -> None:
    for key in table:
        if key not in allowed:
            close = [a for a in allowed if a.lower() == key.lower() or a.startswith(key[:3])]
            guess = f" (did you mean '{prefix}{close[0]}'?)" if close else ""
            raise PathPatchError(
                f"{where}: unknown key '{prefix}{key}'{guess}; allowed are "
                f"{', '.join(prefix + a for a in allowed)}" + (f"; {hint}" if hint else "")
            )


def _table(value: Any, key: str, where: str) -> None:
    if not isinstance(value, dict):
        raise PathPatchError(f"{where}: {key} must be a table ([{key}]), got {value!r}")


def _string(value: Any, key: str, where: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise PathPatchError(f"{where}: {key} = {value!r} must be a non-empty string")
    return value


def _sweep_name(value: Any, where: str) -> str:
    """The sweep's folder name under sweeps/: one plain path component, so it cannot escape."""
    name = _string(value, "name", where)
    if (len(name) > 128 or name.startswith((".", "~")) or "/" in name or "\\" in name
            or any(ord(c) < 32 or ord(c) == 127 for c in name)):
        raise PathPatchError(
            f"{where}: name = {name!r} must be a plain folder name (letters, digits, spaces, "
            "'-', '_', '.'; no '/', no leading '.' or '~', at most 128 characters): it names "
            "the sweep's folder under sweeps/; give --out for a folder elsewhere")
    return name


def _int(value: Any, key: str, where: str, *, low: int, extra: str = "") -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise PathPatchError(f"{where}: {key} = {value!r} must be an integer >= {low}"
                             + (f" {extra}" if extra else ""))
    return value


def _seconds(value: Any, key: str, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0 \
            or not math.isfinite(value):
        raise PathPatchError(f"{where}: {key} = {value!r} must be a positive number of seconds")
    return float(value)


def _bytes(value: Any, key: str, where: str) -> int:
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    match = _SIZE.match(value) if isinstance(value, str) else None
    if not match:
        raise PathPatchError(f"{where}: {key} = {value!r}: give bytes as a positive integer or "
                             "a size such as \"512MiB\" or \"2GB\"")
    size = int(float(match.group(1)) * _UNITS[(match.group(2) or "B").lower()])
    if size <= 0:
        raise PathPatchError(f"{where}: {key} = {value!r} must be positive")
    return size


class _Table(tuple):
    """A TOML table frozen as sorted (key, value) pairs (hashable; thaws back to a dict)."""


def _freeze(value: Any) -> Any:
    if isinstance(value, list):
        return tuple(_freeze(v) for v in value)
    if isinstance(value, dict):
        return _Table(sorted((k, _freeze(v)) for k, v in value.items()))
    return value


def _thaw(value: Any) -> Any:
    if isinstance(value, _Table):
        return {k: _thaw(v) for k, v in value}
    if isinstance(value, tuple):
        return [_thaw(v) for v in value]
    return value
