"""A dataset of (reference, counterfactual) token pairs, with the positions where delta is read.

Everything a hypothesis or metric may refer to travels in one frozen object, so a shard of it
is a self-contained unit of work (hashable by content, picklable to workers). This module also
holds the dataset's on-disk format (Parquet) and its deterministic split into shards.

Parquet format (one row per example)
------------------------------------
Users bring their own pairs as a Parquet file with these columns (any order, no others):

=================  ======================  ========  =============================================
column             Arrow type              required  meaning
=================  ======================  ========  =============================================
``reference``      ``list<int32>``         yes       tokens x_r, length ``pos`` (same every row)
``counterfactual`` ``list<int32>``         yes       tokens x_c, same length as ``reference``
``scored``         ``list<bool>``          yes       positions where delta is read (>= 1 true)
``example_id``     ``int64``               no        stable global example id, unique
                                                     (default: the row number)
``answer``         ``int64``               no        correct next token at the last scored
                                                     position (metric ``logit_diff``)
``wrong_answer``   ``int64``               no        the competing token (metric ``logit_diff``)
``mask.<name>``    ``list<bool>``          no        1-D mask ``[pos]`` for input/q/MLP/output
                                                     steps
``mask.<name>``    ``list<list<bool>>``    no        2-D mask ``[dest][src]`` (``pos`` x ``pos``)
                                                     for k/v steps
=================  ======================  ========  =============================================

- All sequences have the same length ``pos``: pad at the end and leave the padding unscored.
- A scored position ``t`` means "the prediction made at ``t``" (of token ``t + 1``); the last
  position may be scored for KL but not for ``loss``, which needs the next reference token.
- Token columns may use any integer list type (``list<int64>``, ``large_list<int16>``, ...);
  boolean columns must be boolean. Nulls are not allowed anywhere. Mask names are
  identifiers (``[A-Za-z_][A-Za-z0-9_]*``).
- Loading checks every row and reports the file, the column and the row of the first problem.
  ``load_parquet(path, vocab_size=V)`` also checks that every token and answer is in
  ``[0, V)``.

Digests
-------
`PairDataset.digest` is a sha256 over the content (tokens, scored positions, masks by name,
answers, example ids) in a fixed little-endian encoding, so it is the same across runs,
processes and machines, and unchanged by a Parquet round trip. The planner cuts datasets into
shards named by the digests of their slices (`pipeline.plan.shard_dataset`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from pathpatch.data.atomic import atomic_write
from pathpatch.errors import PathPatchError

MASK_PREFIX = "mask."
"""Parquet columns starting with this prefix are named masks (``mask.induction``)."""

@dataclass(frozen=True)
class _Column:
    """How one field of `PairDataset` is stored in the Parquet format."""

    name: str  # the column's name (for masks: the prefix of one column per mask)
    kind: str  # "tokens" [batch, pos] int, "flags" [batch, pos] bool, "ids" [batch] int, "masks"
    required: bool = False


_COLUMNS = {  # in the file's column order
    "example_ids": _Column("example_id", "ids"),
    "reference": _Column("reference", "tokens", True),
    "counterfactual": _Column("counterfactual", "tokens", True),
    "scored": _Column("scored", "flags", True),
    "answer": _Column("answer", "ids"),
    "wrong_answer": _Column("wrong_answer", "ids"),
    "masks": _Column(MASK_PREFIX, "masks"),
}
REQUIRED_COLUMNS = tuple(c.name for c in _COLUMNS.values() if c.required)
OPTIONAL_COLUMNS = tuple(c.name for c in _COLUMNS.values() if c.kind == "ids")
FORMAT_KEY = b"pathpatch.format"
FORMAT_VERSION = b"pairs/1"

_MASK_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_DIGEST_VERSION = b"pathpatch.PairDataset/1\0"
_TOKEN_FIELDS = ("reference", "counterfactual", "answer", "wrong_answer")


@dataclass(frozen=True, eq=False)
class PairDataset:
    """Pairs of equal-length token sequences plus per-example position masks.

    Construction checks the structure (shapes, dtypes, at least one example, at least one
    scored position per example, unique example ids, non-negative tokens) and raises
    `PathPatchError` naming the field and the example; integer tensors are stored as int64.
    The vocabulary range is checked by `validate(vocab_size)`, which needs the model.

    Attributes:
        reference: [batch, pos] int64 tokens x_r.
        counterfactual: [batch, pos] int64 tokens x_c (same shape as reference).
        scored: [batch, pos] bool, where delta is read (predictions made *at* these positions).
        masks: named per-example masks a hypothesis can refer to: [batch, pos] bool (1-D, for
            input/q/MLP/output steps) or [batch, pos, pos] bool ([dest, src], for k/v steps).
        answer: optional [batch] int64, the correct next token at the last scored position
            (for the logit-difference metric).
        wrong_answer: optional [batch] int64, the competing token.
        example_ids: [batch] int64 global example index (stable across sharding).
    """

    reference: torch.Tensor
    counterfactual: torch.Tensor
    scored: torch.Tensor
    masks: dict[str, torch.Tensor] = field(default_factory=dict)
    answer: torch.Tensor | None = None
    wrong_answer: torch.Tensor | None = None
    example_ids: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if isinstance(self.reference, torch.Tensor) and self.example_ids is None:
            ids = torch.arange(self.reference.shape[0], device=self.reference.device)
            object.__setattr__(self, "example_ids", ids)
        normalized = _check_structure(**self._fields(), where="dataset")
        for name, value in normalized.items():
            object.__setattr__(self, name, value)

    def _fields(self) -> dict:
        """Every field, by name, in declaration order: what structure checks, copies and the
        digest read (the dataclass's fields are the one list of them)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    @classmethod
    def _from_checked(cls, normalized: dict) -> PairDataset:
        """A dataset of fields `_check_structure` has just normalized, without checking twice."""
        self = object.__new__(cls)
        for name, value in normalized.items():
            object.__setattr__(self, name, value)
        return self

    def __len__(self) -> int:
        return int(self.reference.shape[0])

    @property
    def seq_len(self) -> int:
        return int(self.reference.shape[1])

    def nbytes(self) -> int:
        """Bytes its tensors hold (what a dataset of n such pairs costs is n times one's)."""
        tensors = [t for t in self._fields().values() if isinstance(t, torch.Tensor)]
        return sum(t.numel() * t.element_size() for t in [*tensors, *self.masks.values()])

    def select(self, index: slice | torch.Tensor) -> PairDataset:
        """Rows `index` as a new dataset (masks and answers follow; example ids are kept).

        The rows are copied, never views: a shard is pickled to workers, and a pickled view
        carries its parent's whole storage (every shard would ship the whole dataset).
        """

        def pick(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t[index].clone()

        return PairDataset(**{
            name: {k: pick(v) for k, v in value.items()} if name == "masks" else pick(value)
            for name, value in self._fields().items()})

    def without_counterfactual(self, why: str) -> PairDataset:
        """This dataset as a metric sees it where x_c is not part of the method (an x_c-free
        intervention): its `counterfactual` raises `PathPatchError` with `why` on any use, so a
        user metric that reads it fails by name instead of mixing in prompts the run ignored."""
        fields = self._fields()
        fields["counterfactual"] = torch.empty(0, dtype=torch.int64).as_subclass(_Unread)
        fields["counterfactual"].why = why
        return PairDataset._from_checked(fields)

    def validate(self, vocab_size: int | None = None, where: str = "dataset") -> None:
        """Check that every token fits the model (the structure was checked, once, when the
        dataset was made: it is frozen).

        Args:
            vocab_size: the model's vocabulary size; tokens and answers must lie in
                [0, vocab_size). None checks nothing more.
            where: how messages name this dataset ("dataset", "file 'pairs.parquet'", ...).

        Raises:
            PathPatchError: naming the field, the example (row) and the offending value.
        """
        if vocab_size is None:
            return
        if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 1:
            raise PathPatchError(f"vocab_size must be a positive int, got {vocab_size!r}")
        for name in _TOKEN_FIELDS:
            tokens = getattr(self, name)
            if tokens is None:
                continue
            bad = (tokens < 0) | (tokens >= vocab_size)
            if not bool(bad.any()):
                continue
            first = [int(i) for i in bad.nonzero()[0]]
            row = first[0]
            spot = f"row {row} ({self._example(row)})"
            if len(first) == 2:
                spot += f", position {first[1]}"
            value = int(tokens[tuple(first)])
            raise PathPatchError(
                f"{where}: {name} {spot} has token {value}, outside the model's vocabulary "
                f"[0, {vocab_size}) ({int(bad.sum())} such tokens in '{name}'); the data was "
                "made for another tokenizer or model: regenerate it for this model, or check "
                "that the sweep names the right model"
            )

    def digest(self) -> str:
        """sha256 (hex) of the content: tokens, scored, masks by name, answers, example ids.

        Stable across runs, processes and machines (fixed little-endian encoding, masks sorted
        by name); independent of the tensors' device and of the original integer dtype.
        """
        h = hashlib.sha256(_DIGEST_VERSION)
        for name, value in self._fields().items():  # declaration order: part of the format
            if name == "masks":
                for mask in sorted(value):
                    _hash_tensor(h, MASK_PREFIX + mask, value[mask])
            else:
                _hash_tensor(h, name, value)
        return h.hexdigest()

    def _example(self, row: int) -> str:
        return f"example_id {int(self.example_ids[row])}"


# --- structural checks ----------------------------------------------------------------------


def _check_structure(
    *,
    reference: object,
    counterfactual: object,
    scored: object,
    masks: object,
    answer: object,
    wrong_answer: object,
    example_ids: object,
    where: str,
) -> dict[str, object]:
    """Check shapes and dtypes; return the fields to store (integer tensors as int64).

    Cheap: a few reductions over each tensor, no Python loop over examples.
    """
    reference = _integer_tensor(reference, "reference", 2, where)
    batch, pos = reference.shape
    if batch == 0:
        raise PathPatchError(
            f"{where}: has no examples (reference has shape {tuple(reference.shape)}); a "
            "dataset needs at least one (reference, counterfactual) pair"
        )
    if pos == 0:
        raise PathPatchError(f"{where}: sequences are empty (reference has shape [{batch}, 0])")
    counterfactual = _integer_tensor(counterfactual, "counterfactual", 2, where)
    if counterfactual.shape != reference.shape:
        raise PathPatchError(
            f"{where}: counterfactual has shape {list(counterfactual.shape)} but reference has "
            f"{list(reference.shape)}; every pair needs equal-length sequences (path patching "
            "swaps inputs position by position): pad both to the same length"
        )
    _nonnegative(reference, "reference", example_ids, where)
    _nonnegative(counterfactual, "counterfactual", example_ids, where)

    scored = _bool_tensor(scored, "scored", where)
    if tuple(scored.shape) != (batch, pos):
        raise PathPatchError(
            f"{where}: scored has shape {list(scored.shape)}, expected [batch, pos] = "
            f"[{batch}, {pos}] like reference"
        )
    empty = ~scored.any(dim=1)
    if bool(empty.any()):
        row = int(empty.nonzero()[0, 0])
        raise PathPatchError(
            f"{where}: row {row} ({_id_label(example_ids, row)}) has no scored position "
            f"({int(empty.sum())} such rows); every example needs at least one position where "
            "delta is read: set scored[row, t] = True for some t, or drop the example"
        )

    if not isinstance(masks, Mapping):
        raise PathPatchError(
            f"{where}: masks must be a dict of name -> bool tensor, got {type(masks).__name__}"
        )
    checked_masks: dict[str, torch.Tensor] = {}
    for name, mask in masks.items():
        if not isinstance(name, str) or not _MASK_NAME.fullmatch(name):
            raise PathPatchError(
                f"{where}: mask name {name!r} is not allowed; use an identifier such as "
                "'induction' or 'prev_token' (letters, digits, underscores)"
            )
        label = f"mask '{name}'"
        mask = _bool_tensor(mask, label, where)
        if tuple(mask.shape) not in ((batch, pos), (batch, pos, pos)):
            raise PathPatchError(
                f"{where}: {label} has shape {list(mask.shape)}; a mask is [batch, pos] = "
                f"[{batch}, {pos}] (1-D, for input/q/MLP/output steps) or [batch, pos, pos] = "
                f"[{batch}, {pos}, {pos}] ([dest, src], for k/v steps)"
            )
        checked_masks[name] = mask

    out: dict[str, object] = {
        "reference": reference,
        "counterfactual": counterfactual,
        "scored": scored,
        "masks": checked_masks,
    }
    for name, value in (("answer", answer), ("wrong_answer", wrong_answer)):
        if value is None:
            out[name] = None
            continue
        value = _integer_tensor(value, name, 1, where)
        if value.shape[0] != batch:
            raise PathPatchError(
                f"{where}: {name} has {value.shape[0]} entries, expected one per example "
                f"({batch})"
            )
        _nonnegative(value, name, example_ids, where)
        out[name] = value

    example_ids = _integer_tensor(example_ids, "example_ids", 1, where)
    if example_ids.shape[0] != batch:
        raise PathPatchError(
            f"{where}: example_ids has {example_ids.shape[0]} entries, expected one per "
            f"example ({batch})"
        )
    unique, counts = torch.unique(example_ids, return_counts=True)
    if bool((counts > 1).any()):
        dup = int(unique[counts > 1][0])
        rows = (example_ids == dup).nonzero()[:, 0].tolist()
        raise PathPatchError(
            f"{where}: example_id {dup} appears in rows {rows}; example ids must be unique "
            "(they key the result rows): renumber the examples"
        )
    out["example_ids"] = example_ids

    device = reference.device
    for name, value in out.items():
        tensors = value.values() if isinstance(value, dict) else [value]
        for t in tensors:
            if t is not None and t.device != device:
                raise PathPatchError(
                    f"{where}: {name} is on {t.device} but reference is on {device}; keep a "
                    "dataset's tensors on one device"
                )
    return out


def _integer_tensor(value: object, name: str, ndim: int, where: str) -> torch.Tensor:
    shape = "[batch, pos]" if ndim == 2 else "[batch]"
    if not isinstance(value, torch.Tensor):
        raise PathPatchError(
            f"{where}: {name} must be a torch.Tensor {shape} of token ids, got "
            f"{type(value).__name__}"
        )
    if value.dtype == torch.bool or value.is_floating_point() or value.is_complex():
        hint = ""
        if value.is_floating_point() and bool(torch.isnan(value).any()):
            hint = " (it contains NaN)"
        raise PathPatchError(
            f"{where}: {name} must hold integer ids, got dtype {value.dtype}{hint}; convert "
            f"with .long() after checking the values are whole token ids"
        )
    if value.ndim != ndim:
        raise PathPatchError(
            f"{where}: {name} has shape {list(value.shape)}, expected {ndim}-D {shape}"
        )
    return value.long()


def _bool_tensor(value: object, name: str, where: str) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise PathPatchError(
            f"{where}: {name} must be a bool torch.Tensor, got {type(value).__name__}"
        )
    if value.dtype != torch.bool:
        hint = ""
        if value.is_floating_point() and bool(torch.isnan(value).any()):
            hint = " (it contains NaN)"
        raise PathPatchError(
            f"{where}: {name} must have dtype torch.bool, got {value.dtype}{hint}; build it "
            "with a comparison (x > 0) or .bool() so no weights or NaNs slip in"
        )
    return value


def _nonnegative(tokens: torch.Tensor, name: str, example_ids: object, where: str) -> None:
    bad = tokens < 0
    if not bool(bad.any()):
        return
    first = [int(i) for i in bad.nonzero()[0]]
    spot = f"row {first[0]} ({_id_label(example_ids, first[0])})"
    if len(first) == 2:
        spot += f", position {first[1]}"
    raise PathPatchError(
        f"{where}: {name} {spot} has negative token {int(tokens[tuple(first)])}; token ids "
        "are >= 0 (padding too: pad with a real token and leave it unscored)"
    )


def _id_label(example_ids: object, row: int) -> str:
    if isinstance(example_ids, torch.Tensor) and example_ids.ndim == 1 and row < len(example_ids):
        return f"example_id {int(example_ids[row])}"
    return f"example {row}"


def _hash_tensor(h: hashlib._Hash, name: str, tensor: torch.Tensor | None) -> None:
    if tensor is None:
        h.update(f"{name}:none\0".encode())
        return
    array = tensor.detach().cpu().contiguous().numpy()
    if array.dtype == np.bool_:
        kind, array = "bool", array.astype(np.uint8)
    else:
        kind, array = "<i8", array.astype("<i8")
    shape = ",".join(str(d) for d in array.shape)
    h.update(f"{name}:{kind}:{shape}\0".encode())
    h.update(np.ascontiguousarray(array).tobytes())


# --- Parquet --------------------------------------------------------------------------------


def save_parquet(dataset: PairDataset, path: str | os.PathLike[str]) -> None:
    """Write `dataset` in the Parquet format described in this module's docstring.

    The file appears whole or not at all (`pathpatch.data.atomic`). `load_parquet` reads it back
    bit-exactly (same `digest`).
    """
    path = Path(path)
    pos = dataset.seq_len
    columns: dict[str, pa.Array] = {}
    for field_name, column in _COLUMNS.items():
        value = getattr(dataset, field_name)
        if column.kind == "masks":
            for name in sorted(value):
                mask = _numpy(value[name])
                columns[MASK_PREFIX + name] = _list_array(mask, list(mask.shape[1:]))
        elif value is None:
            continue
        elif column.kind == "tokens":
            if int(value.max()) > np.iinfo(np.int32).max:
                raise PathPatchError("save_parquet: token ids above 2**31 - 1 do not fit list<int32>")
            columns[column.name] = _list_array(_numpy(value).astype(np.int32), [pos])
        elif column.kind == "flags":
            columns[column.name] = _list_array(_numpy(value), [pos])
        else:
            columns[column.name] = pa.array(_numpy(value), pa.int64())
    table = pa.table(columns).replace_schema_metadata({FORMAT_KEY: FORMAT_VERSION})
    atomic_write(path, lambda f: pq.write_table(table, f))


def load_parquet(path: str | os.PathLike[str], vocab_size: int | None = None) -> PairDataset:
    """Read a dataset in the Parquet format described in this module's docstring.

    Args:
        path: the Parquet file.
        vocab_size: if given, every token and answer must lie in [0, vocab_size).

    Raises:
        PathPatchError: naming the file, the column and the row of the first problem
            (missing or unknown column, wrong type, null, ragged rows, reference and
            counterfactual of unequal length, wrong mask size, token out of range, ...).
    """
    path = Path(path)
    where = f"file '{path}'"
    if not path.is_file():
        raise PathPatchError(f"{where}: not found (or not a file); check the dataset path")
    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as e:
        raise PathPatchError(f"{where}: cannot be read as Parquet ({e})") from e

    names = table.column_names
    duplicated = sorted({n for n in names if names.count(n) > 1})
    if duplicated:
        raise PathPatchError(f"{where}: column(s) {duplicated} appear more than once")
    missing = [n for n in REQUIRED_COLUMNS if n not in names]
    if missing:
        raise PathPatchError(
            f"{where}: missing required column(s) {missing}; a pairs file has columns "
            f"{list(REQUIRED_COLUMNS)}, optionally {list(OPTIONAL_COLUMNS)} and "
            f"'{MASK_PREFIX}<name>' masks"
        )
    known = set(REQUIRED_COLUMNS) | set(OPTIONAL_COLUMNS)
    unknown = [n for n in names if n not in known and not n.startswith(MASK_PREFIX)]
    if unknown:
        raise PathPatchError(
            f"{where}: unknown column(s) {unknown}; allowed: {list(REQUIRED_COLUMNS)} + "
            f"{list(OPTIONAL_COLUMNS)} + '{MASK_PREFIX}<name>' masks (rename or drop them; "
            "a misspelt mask name would otherwise be silently ignored)"
        )
    batch = table.num_rows
    if batch == 0:
        raise PathPatchError(
            f"{where}: has no rows; a dataset needs at least one (reference, counterfactual) "
            "pair"
        )

    fields: dict[str, object] = {}
    pos, first = None, None  # the first per-position column sets the length the others match
    for field_name, column in _COLUMNS.items():
        if column.kind in ("tokens", "flags"):
            values, lengths = _read_rows(table, column.name, where, boolean=column.kind == "flags")
            if first is None:
                pos, first = int(lengths[0]), (column.name, lengths)
                ragged = np.flatnonzero(lengths != pos)
                if ragged.size:
                    row = int(ragged[0])
                    raise PathPatchError(
                        f"{where}: column '{column.name}' row {row} has {int(lengths[row])} "
                        f"tokens but row 0 has {pos} ({ragged.size} rows differ); all sequences "
                        "must have the same length: pad at the end and leave the padding unscored"
                    )
            else:
                _same_lengths(lengths, first[1], column.name, first[0], where)
            values = values.reshape(batch, pos)
            fields[field_name] = torch.from_numpy(values.astype(np.int64) if column.kind == "tokens"
                                                  else values)
    for field_name, column in _COLUMNS.items():
        if column.kind == "ids":
            present = column.name in names
            ids = _read_scalars(table, column.name, where) if present else None
            if ids is None and field_name == "example_ids":
                ids = np.arange(batch)  # a file without ids numbers its rows
            fields[field_name] = _tensor_or_none(ids)
        elif column.kind == "masks":
            masks: dict[str, torch.Tensor] = {}
            for name in names:
                if not name.startswith(MASK_PREFIX):
                    continue
                mask = name[len(MASK_PREFIX):]
                if not _MASK_NAME.fullmatch(mask):
                    raise PathPatchError(
                        f"{where}: column '{name}': mask name {mask!r} is not an identifier "
                        "(letters, digits, underscores; e.g. 'mask.induction')"
                    )
                masks[mask] = torch.from_numpy(_read_mask(table, name, batch, pos, where))
            fields[field_name] = masks
    # Checked once, here, so that messages name the file rather than "dataset".
    dataset = PairDataset._from_checked(_check_structure(**fields, where=where))
    if vocab_size is not None:
        dataset.validate(vocab_size, where=where)
    return dataset


def _numpy(tensor: torch.Tensor) -> np.ndarray:
    return tensor.detach().cpu().contiguous().numpy()


def _tensor_or_none(array: np.ndarray | None) -> torch.Tensor | None:
    return None if array is None else torch.from_numpy(array.astype(np.int64))


def _list_array(values: np.ndarray, inner: list[int]) -> pa.Array:
    """Nested list array over rows of `values` ([rows, *inner]), innermost list first."""
    array: pa.Array = pa.array(values.reshape(-1))
    count = values.size
    for size in reversed(inner):
        count //= size
        large = count * size >= 2**31
        offsets = np.arange(0, (count + 1) * size, size, dtype=np.int64 if large else np.int32)
        cls = pa.LargeListArray if large else pa.ListArray
        array = cls.from_arrays(pa.array(offsets), array)
    return array


def _is_list(t: pa.DataType) -> bool:
    return pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t)


def _type_name(t: pa.DataType) -> str:
    """Arrow type without child field names: list<list<bool>>, not list<element: list<...>>."""
    if pa.types.is_large_list(t):
        return f"large_list<{_type_name(t.value_type)}>"
    if _is_list(t):
        return f"list<{_type_name(t.value_type)}>"
    return str(t)


def _first_null(array: pa.Array) -> int:
    return int(np.flatnonzero(pc.is_null(array).to_numpy(zero_copy_only=False))[0])


def _read_rows(
    table: pa.Table, name: str, where: str, *, boolean: bool
) -> tuple[np.ndarray, np.ndarray]:
    """A list column as (flat values, per-row lengths), with its type and nulls checked."""
    column = table.column(name).combine_chunks()
    want = "list<bool>" if boolean else "list<int32> (any integer list)"
    t = column.type
    value_ok = _is_list(t) and (
        pa.types.is_boolean(t.value_type) if boolean else pa.types.is_integer(t.value_type)
    )
    if not value_ok:
        hint = " (booleans only: no weights, no NaN)" if boolean else ""
        raise PathPatchError(
            f"{where}: column '{name}' has type {_type_name(t)}, expected {want}{hint}"
        )
    if column.null_count:
        raise PathPatchError(
            f"{where}: column '{name}' row {_first_null(column)} is null; nulls are not allowed"
        )
    lengths = pc.list_value_length(column).to_numpy(zero_copy_only=False).astype(np.int64)
    values = pc.list_flatten(column)
    if values.null_count:
        index = _first_null(values)
        row = int(np.searchsorted(np.cumsum(lengths), index, side="right"))
        raise PathPatchError(
            f"{where}: column '{name}' row {row} contains a null; nulls are not allowed"
        )
    return values.to_numpy(zero_copy_only=False), lengths


def _same_lengths(
    lengths: np.ndarray, expected: np.ndarray, name: str, other: str, where: str
) -> None:
    bad = np.flatnonzero(lengths != expected)
    if bad.size:
        row = int(bad[0])
        raise PathPatchError(
            f"{where}: column '{name}' row {row} has {int(lengths[row])} entries but '{other}' "
            f"has {int(expected[row])} ({bad.size} rows differ); each row's '{name}' must match "
            f"its '{other}' position by position"
        )


def _read_mask(table: pa.Table, column: str, batch: int, pos: int, where: str) -> np.ndarray:
    """A 1-D ([batch, pos]) or 2-D ([batch, pos, pos], [dest][src]) boolean mask column."""
    t = table.schema.field(column).type
    nested = _is_list(t) and _is_list(t.value_type)
    if not nested:
        values, lengths = _read_rows(table, column, where, boolean=True)
        _same_lengths(lengths, np.full(batch, pos), column, "reference", where)
        return values.reshape(batch, pos)
    inner_type = t.value_type
    if not pa.types.is_boolean(inner_type.value_type):
        raise PathPatchError(
            f"{where}: column '{column}' has type {_type_name(t)}, expected list<bool> (1-D) or "
            "list<list<bool>> (2-D [dest][src]); booleans only: no weights, no NaN"
        )
    outer = table.column(column).combine_chunks()
    if outer.null_count:
        raise PathPatchError(
            f"{where}: column '{column}' row {_first_null(outer)} is null; nulls are not allowed"
        )
    lengths = pc.list_value_length(outer).to_numpy(zero_copy_only=False)
    bad = np.flatnonzero(lengths != pos)
    if bad.size:
        row = int(bad[0])
        raise PathPatchError(
            f"{where}: column '{column}' row {row} has {int(lengths[row])} destination rows, "
            f"expected {pos} (a 2-D mask is pos x pos = {pos} x {pos}, [dest][src])"
        )
    inner = pc.list_flatten(outer)  # [batch * pos] lists of src flags
    if inner.null_count:
        index = _first_null(inner)
        raise PathPatchError(
            f"{where}: column '{column}' row {index // pos}, dest {index % pos} is null; nulls "
            "are not allowed"
        )
    inner_lengths = pc.list_value_length(inner).to_numpy(zero_copy_only=False)
    bad = np.flatnonzero(inner_lengths != pos)
    if bad.size:
        index = int(bad[0])
        raise PathPatchError(
            f"{where}: column '{column}' row {index // pos}, dest {index % pos} has "
            f"{int(inner_lengths[index])} source entries, expected {pos} (a 2-D mask is "
            f"pos x pos = {pos} x {pos}, [dest][src])"
        )
    values = pc.list_flatten(inner)
    if values.null_count:
        index = _first_null(values)
        raise PathPatchError(
            f"{where}: column '{column}' row {index // (pos * pos)} contains a null; nulls are "
            "not allowed"
        )
    return values.to_numpy(zero_copy_only=False).reshape(batch, pos, pos)


def _read_scalars(table: pa.Table, name: str, where: str) -> np.ndarray:
    column = table.column(name).combine_chunks()
    if not pa.types.is_integer(column.type):
        raise PathPatchError(
            f"{where}: column '{name}' has type {_type_name(column.type)}, expected int64"
        )
    if column.null_count:
        raise PathPatchError(
            f"{where}: column '{name}' row {_first_null(column)} is null; nulls are not allowed "
            "(drop the column if no row has a value)"
        )
    return column.to_numpy(zero_copy_only=False)


class _Unread(torch.Tensor):
    """A tensor that must not be read: every torch operation on it, attribute reads included,
    raises its `why` (`PairDataset.without_counterfactual`)."""

    why = "this tensor is not part of the computation"

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        raise PathPatchError(cls._message(args))

    @staticmethod
    def _message(args) -> str:
        flat = [x for a in args for x in (a if isinstance(a, (list, tuple)) else [a])]
        owner = next((a for a in flat if isinstance(a, _Unread)), None)
        return owner.__dict__.get("why", _Unread.why) if owner is not None else _Unread.why
