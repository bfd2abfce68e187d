"""Text datasets: (clean prompt, corrupted prompt, answer, competing answer) rows tokenized into
a `PairDataset` with the model's own tokenizer.

A researcher's file is JSONL (``.jsonl``/``.json``, one object per line; a ``.json`` file may
also hold one array of objects), CSV (``.csv``, text
cells), Parquet with string columns (``.parquet`` without pathpatch's token columns) or a
Hugging Face `datasets` folder written by ``save_to_disk`` (a ``DatasetDict``'s split is
chosen with ``split``). Columns, by role:

===============  =========================  ============================================
role             default column             value
===============  =========================  ============================================
``clean``        ``clean``                  prompt text, or a list of token ids (as is)
``corrupted``    ``corrupted``              prompt text, or a list of token ids (as is)
``answer``       ``answer`` (optional)      the next token's text, or a token id
``wrong_answer`` ``wrong_answer``           the competing token's text, or a token id
===============  =========================  ============================================

``columns = {clean = "prompt", ...}`` maps roles to other columns; a dotted name reads into a
nested column (``"abc_counterfactual.prompt"``). A file with neither answer column has no
answers (metric ``logit_diff`` then refuses it); one without the other is an error.

**MIB's layout** (the ``mib-bench`` Hugging Face datasets, read by MIB's circuit track as in
its ``HFEAPDataset``) is recognised when a row has ``prompt`` and a ``*_counterfactual`` struct
and no ``clean`` column: clean = ``prompt``, corrupted = ``<counterfactual>.prompt``, where the
counterfactual is ``counterfactual = "..."`` or, by MIB's defaults, the first present of
``s2_io_flip_counterfactual`` (IOI), ``symbol_counterfactual`` (MCQA, ARC),
``random_counterfactual`` (arithmetic). Answers as MIB takes them: IOI ``" " +
metadata.indirect_object`` against ``" " + metadata.subject``; MCQA/ARC ``choices.label
[answerKey]`` against the counterfactual's; arithmetic ``str(label)`` against the
counterfactual's ``label``.

Tokenization: a prompt is encoded with the tokenizer's own special-token convention (Llama's
tokenizer prepends BOS, GPT-2's does not) unless ``prepend_bos`` is true (no special tokens,
then the tokenizer's BOS) or false (no special tokens). Answers are encoded without special
tokens and must be one token, unless ``answer_tokens = "first"`` takes the first.

Every problem is an error naming the file, the row (0-based) and the values: a missing column
or value, an empty prompt, clean and corrupted prompts of different token lengths, an answer
that is not one token, a prompt longer than the model's context. Nothing is dropped.

Prompts of different lengths are right-padded (the tokenizer's pad token, else its EOS, else
0) and scored at each example's last real token: the model is causal, so no scored position
reads a padded one and each example's result equals running it alone. The dataset's identity
is `PairDataset.digest` of the tokenized pairs.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import torch

from pathpatch.data.pairs import PairDataset
from pathpatch.errors import PathPatchError

ROLES = ("clean", "corrupted", "answer", "wrong_answer")
"""What a text row holds, by role; the default column of each is its role's name."""

ANSWER_TOKENS = ("one", "first")
"""How an answer of several tokens is taken: an error (``one``) or its first token."""

MIB_COUNTERFACTUALS = ("s2_io_flip_counterfactual", "symbol_counterfactual",
                       "random_counterfactual")
"""MIB's default counterfactual per task (IOI; MCQA and ARC; arithmetic), first present wins."""

TEXT_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")


@dataclass(frozen=True)
class TextOptions:
    """How rows become token pairs (the spec's ``[dataset]`` keys beside ``path``).

    Attributes:
        columns: role -> column name (dotted for nested columns), overriding the defaults.
        prepend_bos: None = the tokenizer's convention; True = its BOS then the prompt's tokens;
            False = the prompt's tokens only.
        answer_tokens: ``one`` (an answer must be one token) or ``first`` (take its first).
        counterfactual: MIB layout: which ``*_counterfactual`` column is the corrupted prompt.
        split: a `datasets` folder holding several splits: the one to read.
    """

    columns: tuple[tuple[str, str], ...] = ()
    prepend_bos: bool | None = None
    answer_tokens: str = "one"
    counterfactual: str | None = None
    split: str | None = None

    def __post_init__(self) -> None:
        unknown = [role for role, _ in self.columns if role not in ROLES]
        if unknown:
            raise PathPatchError(f"columns: unknown role(s) {unknown}; roles are {list(ROLES)}")
        if self.answer_tokens not in ANSWER_TOKENS:
            raise PathPatchError(f"answer_tokens = {self.answer_tokens!r}: allowed are "
                                 f"{list(ANSWER_TOKENS)}")


def is_text_dataset(path: str | os.PathLike[str]) -> bool:
    """Whether `path` is read by `load_text` (any dataset file but a pathpatch pairs Parquet)."""
    path = Path(path)
    if path.is_dir():
        return True
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            names = pq.read_schema(path).names
        except (OSError, pa.ArrowException) as err:
            raise PathPatchError(f"dataset {str(path)!r} cannot be read as Parquet: {err}") from None
        return "reference" not in names and "counterfactual" not in names
    return path.suffix in TEXT_SUFFIXES


def read_rows(path: str | os.PathLike[str], split: str | None = None) -> list[dict[str, Any]]:
    """The rows of a JSONL, CSV, Parquet file or `datasets` folder, as dicts (file order)."""
    path = Path(path)
    where = f"file '{path}'"
    if path.is_dir():
        return _read_hf_folder(path, split)
    if split is not None:
        raise PathPatchError(f"{where}: split = {split!r} applies to a `datasets` folder only")
    if path.suffix == ".json" and path.read_text(encoding="utf-8").lstrip().startswith("["):
        try:
            rows = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise PathPatchError(f"{where}: not JSON ({err})") from None
        bad = next((i for i, row in enumerate(rows) if not isinstance(row, dict)), None)
        if bad is not None:
            raise PathPatchError(f"{where} row {bad}: {rows[bad]!r} is not an object")
        return rows
    if path.suffix in (".jsonl", ".json"):
        rows = []
        with open(path, encoding="utf-8") as f:
            for number, line in enumerate(f):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as err:
                    raise PathPatchError(f"{where} line {number + 1}: not JSON ({err}); a JSONL "
                                         "file holds one object per line") from None
                if not isinstance(row, dict):
                    raise PathPatchError(f"{where} line {number + 1}: {row!r} is not an object")
                rows.append(row)
        return rows
    if path.suffix == ".csv":
        import csv

        with open(path, encoding="utf-8", newline="") as f:
            return [dict(row) for row in csv.DictReader(f)]
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    raise PathPatchError(f"{where}: unknown format {path.suffix!r}; give .jsonl, .csv, .parquet "
                         "or a Hugging Face `datasets` folder (save_to_disk)")


def _read_hf_folder(path: Path, split: str | None) -> list[dict[str, Any]]:
    import datasets

    where = f"folder '{path}'"
    try:
        data = datasets.load_from_disk(str(path))
    except (FileNotFoundError, ValueError, OSError) as err:
        raise PathPatchError(f"{where}: not a Hugging Face `datasets` folder ({err}); write one "
                             "with `save_to_disk`") from None
    if isinstance(data, datasets.DatasetDict):
        if split is None:
            if len(data) != 1:
                raise PathPatchError(f"{where}: holds splits {sorted(data)}; choose one with "
                                     "[dataset] split = \"...\"")
            split = next(iter(data))
        if split not in data:
            raise PathPatchError(f"{where}: no split {split!r}; it holds {sorted(data)}")
        data = data[split]
    elif split is not None:
        raise PathPatchError(f"{where}: holds one dataset, no splits; drop split = {split!r}")
    return data.to_list()


def _lookup(row: Mapping[str, Any], column: str) -> tuple[bool, Any]:
    """(found, value) of a dotted column name in a row of nested dicts."""
    value: Any = row
    for part in column.split("."):
        if not isinstance(value, Mapping) or part not in value:
            return False, None
        value = value[part]
    return True, value


def _mib_readers(row: Mapping[str, Any], counterfactual: str | None, where: str
                 ) -> dict[str, Callable[[Mapping[str, Any]], Any]] | None:
    """Role -> reader of a row in MIB's layout (and "counterfactual" -> the column chosen), or
    None where the row is not MIB's."""
    cfs = [k for k, v in row.items() if k.endswith("_counterfactual") and isinstance(v, Mapping)]
    if "prompt" not in row or not cfs or "clean" in row:
        return None
    if counterfactual is None:
        counterfactual = next((c for c in MIB_COUNTERFACTUALS if c in cfs), None)
        if counterfactual is None:
            raise PathPatchError(f"{where}: MIB layout with counterfactuals {sorted(cfs)}; "
                                 "choose one with [dataset] counterfactual = \"...\"")
    elif counterfactual not in cfs:
        raise PathPatchError(f"{where}: no counterfactual column {counterfactual!r}; the rows "
                             f"have {sorted(cfs)}")

    def answer_of(part: Mapping[str, Any]) -> Any:
        choices = part.get("choices")
        if isinstance(choices, Mapping) and "label" in choices:  # MCQA, ARC
            return choices["label"][part["answerKey"]]
        if "label" in part:  # arithmetic
            return str(part["label"])
        return None

    metadata = row.get("metadata")
    if isinstance(metadata, Mapping) and "indirect_object" in metadata:  # IOI
        answer = lambda r: " " + str(r["metadata"]["indirect_object"])  # noqa: E731
        wrong = lambda r: " " + str(r["metadata"]["subject"])  # noqa: E731
    else:
        answer = answer_of
        wrong = lambda r: answer_of(r[counterfactual])  # noqa: E731
    return {"clean": lambda r: r["prompt"], "corrupted": lambda r: r[counterfactual]["prompt"],
            "answer": answer, "wrong_answer": wrong, "counterfactual": lambda r: counterfactual}


def load_text(
    path: str | os.PathLike[str],
    tokenizer: Any,
    options: TextOptions = TextOptions(),
    *,
    n_ctx: int | None = None,
    rows: Sequence[Mapping[str, Any]] | None = None,
) -> PairDataset:
    """Read a text dataset (see the module docstring) and tokenize it into pairs.

    Args:
        path: the file or `datasets` folder (named in every message).
        tokenizer: a transformers tokenizer (`pathpatch.model.loading.load_tokenizer`).
        options: columns, BOS, answers, MIB counterfactual, split.
        n_ctx: the model's context; a longer prompt is an error.
        rows: the rows, when already read (tests); else `read_rows(path, options.split)`.

    Returns:
        A `PairDataset`: [batch, pos] tokens right-padded to the longest prompt, `scored` true
        at each example's last real token only, answers where the rows have them.

    Raises:
        PathPatchError: naming the file, the row and the values (see the module docstring).
    """
    where = f"{'folder' if Path(path).is_dir() else 'file'} '{path}'"
    rows = read_rows(path, options.split) if rows is None else rows
    if not rows:
        raise PathPatchError(f"{where}: has no rows; a dataset needs at least one pair")
    columns = {role: role for role in ROLES} | dict(options.columns)
    mib = None if options.columns else _mib_readers(rows[0], options.counterfactual, where)
    if mib is None and options.counterfactual is not None:
        raise PathPatchError(f"{where}: counterfactual = {options.counterfactual!r} applies to "
                             "MIB's layout (a 'prompt' column and '*_counterfactual' columns)")
    first = rows[0]
    for role in ("clean", "corrupted"):
        if mib is None and not _lookup(first, columns[role])[0]:
            raise PathPatchError(
                f"{where}: missing column {columns[role]!r} ({role} prompt); row 0 has columns "
                f"{sorted(first)}: map it with [dataset] columns = {{{role} = \"...\"}}")
    has = {r: mib is not None or _lookup(first, columns[r])[0] for r in ("answer", "wrong_answer")}
    if has["answer"] != has["wrong_answer"]:
        there, missing = ("answer", "wrong_answer") if has["answer"] else ("wrong_answer", "answer")
        raise PathPatchError(
            f"{where}: has column {columns[there]!r} ({there}) but no {columns[missing]!r} "
            f"({missing}); give both (map them with [dataset] columns) or neither")
    roles = ROLES if has["answer"] else ROLES[:2]
    bos = _bos(tokenizer, options.prepend_bos, where)
    special = options.prepend_bos is None  # the tokenizer's own convention

    def value(row: Mapping[str, Any], index: int, role: str) -> Any:
        if mib is not None:
            try:
                got = mib[role](row)
            except (KeyError, IndexError, TypeError) as err:
                cf = mib["counterfactual"](row)
                raise PathPatchError(
                    f"{where} row {index}: MIB layout: {role} cannot be read (counterfactual "
                    f"{cf!r}: {row.get(cf)!r}; {type(err).__name__}: {err}); every row needs it: "
                    "choose another counterfactual, or take the row out") from None
            found = got is not None
        else:
            found, got = _lookup(row, columns[role])
        if not found or got is None or (isinstance(got, float) and got != got):
            raise PathPatchError(f"{where} row {index}: no value in column {columns[role]!r} "
                                 f"({role}); every row needs one")
        return got

    refs, cfs, answers, wrongs = [], [], [], []
    for index, row in enumerate(rows):
        got = {role: value(row, index, role) for role in roles}
        clean = _prompt(tokenizer, got["clean"], special, bos, where, index, "clean")
        corrupted = _prompt(tokenizer, got["corrupted"], special, bos, where, index, "corrupted")
        if len(clean) != len(corrupted):
            raise PathPatchError(
                f"{where} row {index}: clean {got['clean']!r} ({len(clean)} tokens) and corrupted "
                f"{got['corrupted']!r} ({len(corrupted)} tokens) tokenize to different lengths; "
                "path patching swaps inputs position by position: reword one, or drop the row")
        if n_ctx is not None and len(clean) > n_ctx:
            raise PathPatchError(
                f"{where} row {index}: clean {got['clean']!r} and corrupted {got['corrupted']!r} "
                f"are {len(clean)} tokens, more than the model's context ({n_ctx})")
        refs.append(clean)
        cfs.append(corrupted)
        if has["answer"]:
            answers.append(_answer(tokenizer, got["answer"], options.answer_tokens, where, index,
                                   "answer", got["wrong_answer"]))
            wrongs.append(_answer(tokenizer, got["wrong_answer"], options.answer_tokens, where,
                                  index, "wrong_answer", got["answer"]))
    return _padded(refs, cfs, answers or None, wrongs or None, _pad_id(tokenizer))


def _bos(tokenizer: Any, prepend_bos: bool | None, where: str) -> int | None:
    if not prepend_bos:
        return None
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        raise PathPatchError(f"{where}: prepend_bos = true but the tokenizer has no BOS token; "
                             "set prepend_bos = false")
    return int(bos)


def _encode(tokenizer: Any, text: str, special: bool, where: str, index: int, role: str
            ) -> list[int]:
    try:
        return list(tokenizer(text, add_special_tokens=special)["input_ids"])
    except Exception as err:  # tokenizers' own error type (e.g. a word outside a word-level vocab)
        raise PathPatchError(f"{where} row {index}: {role} {text!r} cannot be tokenized ({err})"
                             ) from None


def _prompt(tokenizer: Any, text: Any, special: bool, bos: int | None, where: str, index: int,
            role: str) -> list[int]:
    """A prompt's tokens: text encoded (with the tokenizer's special tokens where `special`,
    then `bos` in front where given), or a list of token ids as they are."""
    if isinstance(text, list | tuple):
        if not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in text):
            raise PathPatchError(f"{where} row {index}: {role} {list(text)!r} is a list but not "
                                 "of token ids (integers >= 0)")
        tokens = [int(t) for t in text]
    elif isinstance(text, str):
        tokens = [] if not text.strip() else _encode(tokenizer, text, special, where, index, role)
        tokens = tokens if bos is None or not tokens else [bos, *tokens]
    else:
        raise PathPatchError(f"{where} row {index}: {role} {text!r} is neither text nor a list "
                             "of token ids")
    if not tokens:
        raise PathPatchError(f"{where} row {index}: {role} prompt {text!r} is empty; every "
                             "prompt needs at least one token")
    return tokens


def _answer(tokenizer: Any, text: Any, take: str, where: str, index: int, role: str,
            other: Any) -> int:
    if isinstance(text, int) and not isinstance(text, bool):
        if text < 0:
            raise PathPatchError(f"{where} row {index}: {role} {text} is a negative token id")
        return text
    if not isinstance(text, str) or not text:
        raise PathPatchError(f"{where} row {index}: {role} {text!r} is neither text nor a token id")
    tokens = _encode(tokenizer, text, False, where, index, role)
    if len(tokens) == 1 or (take == "first" and tokens):
        return int(tokens[0])
    label = "answer" if role == "answer" else "competing answer"
    raise PathPatchError(
        f"{where} row {index}: {label} {text!r} is {len(tokens)} tokens {tokens} (the other "
        f"answer is {other!r}); an answer must be one token: give [dataset] answer_tokens = "
        "\"first\" to score its first token, or reword it")


def _pad_id(tokenizer: Any) -> int:
    for name in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, name, None)
        if isinstance(value, int):
            return value
    return 0


def _padded(refs: list[list[int]], cfs: list[list[int]], answers: list[int] | None,
            wrongs: list[int] | None, pad: int) -> PairDataset:
    """Right-pad to the longest prompt; score each example's last real token."""
    lengths = torch.tensor([len(r) for r in refs])
    pos = int(lengths.max())
    reference = torch.full((len(refs), pos), pad, dtype=torch.long)  # (batch, pos)
    counterfactual = reference.clone()
    for i, (r, c) in enumerate(zip(refs, cfs)):
        reference[i, : len(r)] = torch.tensor(r)
        counterfactual[i, : len(c)] = torch.tensor(c)
    scored = torch.arange(pos)[None, :] == (lengths - 1)[:, None]  # (batch, pos)
    answer = None if answers is None else torch.tensor(answers, dtype=torch.long)
    wrong = None if wrongs is None else torch.tensor(wrongs, dtype=torch.long)
    return PairDataset(reference, counterfactual, scored, answer=answer, wrong_answer=wrong)
