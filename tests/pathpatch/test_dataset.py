"""PairDataset: structural checks, vocabulary checks, digest, Parquet format, sharding."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from pathpatch.data.pairs import (
    PairDataset,
    load_parquet,
    save_parquet,
)
from pathpatch.errors import PathPatchError


def tiny(batch: int = 5, pos: int = 4) -> PairDataset:
    """A fixed dataset built by arithmetic (no RNG), so its digests are literal constants."""
    ref = (torch.arange(batch * pos).reshape(batch, pos) * 7) % 11
    cf = (torch.arange(batch * pos).reshape(batch, pos) * 3 + 1) % 11
    scored = torch.zeros(batch, pos, dtype=torch.bool)
    scored[:, 1:] = True
    prev = torch.zeros(batch, pos, pos, dtype=torch.bool)
    prev[:, torch.arange(1, pos), torch.arange(pos - 1)] = True  # src = dest - 1
    first = torch.zeros(batch, pos, dtype=torch.bool)
    first[:, 0] = True
    return PairDataset(
        reference=ref,
        counterfactual=cf,
        scored=scored,
        masks={"prev": prev, "first": first},
        answer=torch.arange(batch) % 11,
        wrong_answer=(torch.arange(batch) + 5) % 11,
        example_ids=torch.arange(100, 100 + batch),
    )


def fields(ds: PairDataset, **changes: object) -> dict[str, object]:
    out = dict(
        reference=ds.reference,
        counterfactual=ds.counterfactual,
        scored=ds.scored,
        masks=dict(ds.masks),
        answer=ds.answer,
        wrong_answer=ds.wrong_answer,
        example_ids=ds.example_ids,
    )
    out.update(changes)
    return out


def assert_same(a: PairDataset, b: PairDataset) -> None:
    for name in ("reference", "counterfactual", "scored", "answer", "wrong_answer"):
        x, y = getattr(a, name), getattr(b, name)
        assert (x is None) == (y is None), name
        if x is not None:
            assert x.dtype == y.dtype and torch.equal(x, y), name
    assert torch.equal(a.example_ids, b.example_ids)
    assert sorted(a.masks) == sorted(b.masks)
    for k in a.masks:
        assert a.masks[k].dtype == b.masks[k].dtype and torch.equal(a.masks[k], b.masks[k]), k
    assert a.digest() == b.digest()


# --- construction -----------------------------------------------------------------------------


def test_construction_normalizes_and_defaults():
    ref = torch.tensor([[1, 2, 3]], dtype=torch.int32)
    ds = PairDataset(ref, ref.clone(), torch.tensor([[False, True, True]]))
    assert ds.reference.dtype == torch.int64 and ds.counterfactual.dtype == torch.int64
    assert ds.example_ids.tolist() == [0]
    assert len(ds) == 1 and ds.seq_len == 3
    # int32 and int64 tokens give the same content, hence the same digest.
    same = PairDataset(ref.long(), ref.long(), torch.tensor([[False, True, True]]))
    assert ds.digest() == same.digest()


def test_select_keeps_ids_masks_answers():
    ds = tiny()
    part = ds.select(slice(1, 3))
    assert part.example_ids.tolist() == [101, 102]
    assert torch.equal(part.masks["prev"], ds.masks["prev"][1:3])
    assert part.answer.tolist() == ds.answer[1:3].tolist()
    picked = ds.select(torch.tensor([4, 0]))
    assert picked.example_ids.tolist() == [104, 100]


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        (
            dict(reference=torch.zeros(0, 4, dtype=torch.long),
                 counterfactual=torch.zeros(0, 4, dtype=torch.long),
                 scored=torch.zeros(0, 4, dtype=torch.bool), masks={}, answer=None,
                 wrong_answer=None, example_ids=None),
            "dataset: has no examples",
        ),
        (dict(counterfactual=torch.zeros(5, 3, dtype=torch.long)),
         "counterfactual has shape [5, 3] but reference has [5, 4]"),
        (dict(reference=torch.full((5, 4), float("nan"))),
         "reference must hold integer ids, got dtype torch.float32 (it contains NaN)"),
        (dict(reference=torch.zeros(5, 4, 1, dtype=torch.long)),
         "reference has shape [5, 4, 1], expected 2-D [batch, pos]"),
        (dict(scored=torch.ones(5, 4)), "scored must have dtype torch.bool, got torch.float32"),
        (dict(scored=torch.ones(5, 3, dtype=torch.bool)),
         "scored has shape [5, 3], expected [batch, pos] = [5, 4]"),
        (dict(masks={"m": torch.ones(5, 4)}),
         "mask 'm' must have dtype torch.bool, got torch.float32"),
        (dict(masks={"m": torch.tensor(float("nan")).expand(5, 4)}),
         "mask 'm' must have dtype torch.bool, got torch.float32 (it contains NaN)"),
        (dict(masks={"m": torch.ones(5, 4, 3, dtype=torch.bool)}),
         "mask 'm' has shape [5, 4, 3]; a mask is [batch, pos] = [5, 4] (1-D"),
        (dict(masks={"m": torch.ones(5, 3, dtype=torch.bool)}), "mask 'm' has shape [5, 3]"),
        (dict(masks={"bad name": torch.ones(5, 4, dtype=torch.bool)}),
         "mask name 'bad name' is not allowed"),
        (dict(answer=torch.zeros(4, dtype=torch.long)),
         "answer has 4 entries, expected one per example (5)"),
        (dict(example_ids=torch.tensor([1, 2, 3, 2, 5])),
         "example_id 2 appears in rows [1, 3]; example ids must be unique"),
        (dict(counterfactual=torch.full((5, 4), -1)),
         "counterfactual row 0 (example_id 100), position 0 has negative token -1"),
    ],
)
def test_structural_errors(changes, message):
    with pytest.raises(PathPatchError) as err:
        PairDataset(**fields(tiny(), **changes))
    assert message in str(err.value)


def test_example_without_scored_position_is_named():
    ds = tiny()
    scored = ds.scored.clone()
    scored[3] = False
    with pytest.raises(PathPatchError) as err:
        PairDataset(**fields(ds, scored=scored))
    assert "row 3 (example_id 103) has no scored position" in str(err.value)


def test_last_position_may_be_scored(tmp_path):
    """Only the last position scored is a valid dataset (KL may read it; metric 'loss' refuses
    it, tests/pathpatch/test_metrics.py): kept as given, through Parquet too."""
    ds = tiny()
    scored = torch.zeros_like(ds.scored)
    scored[:, -1] = True
    last = PairDataset(**fields(ds, scored=scored))
    last.validate(vocab_size=11)  # raises if refused
    assert last.scored.tolist() == [[False, False, False, True]] * 5
    assert last.digest() != ds.digest()  # the scored positions are part of the content
    save_parquet(last, tmp_path / "last.parquet")
    back = load_parquet(tmp_path / "last.parquet", vocab_size=11)
    assert_same(back, last)
    assert back.scored.tolist() == [[False, False, False, True]] * 5


@pytest.mark.parametrize(
    ("field", "index", "message"),
    [
        ("reference", (2, 3), "dataset: reference row 2 (example_id 102), position 3 has token 11"),
        ("counterfactual", (0, 1), "counterfactual row 0 (example_id 100), position 1 has token"),
        ("answer", (4,), "answer row 4 (example_id 104) has token 11"),
        ("wrong_answer", (1,), "wrong_answer row 1 (example_id 101) has token 11"),
    ],
)
def test_vocabulary_errors(field, index, message):
    ds = tiny()
    ds.validate(vocab_size=11)
    tokens = getattr(ds, field).clone()
    tokens[index] = 11
    bad = PairDataset(**fields(ds, **{field: tokens}))
    bad.validate()  # structure alone is fine
    with pytest.raises(PathPatchError) as err:
        bad.validate(vocab_size=11)
    assert message in str(err.value)
    assert "outside the model's vocabulary [0, 11)" in str(err.value)


def test_validate_where_and_bad_vocab_size():
    ds = tiny()
    with pytest.raises(PathPatchError, match="^sweep 'x': reference row 0"):
        ds.validate(vocab_size=3, where="sweep 'x'")
    with pytest.raises(PathPatchError, match="vocab_size must be a positive int"):
        ds.validate(vocab_size=0)


# --- digest -----------------------------------------------------------------------------------

# The golden digest of `tiny()` under one digest format: a change of what or how the digest hashes
# must bump `_DIGEST_VERSION` (every stored shard digest and item identity changes with it), and
# then this pair of lines together.
DIGEST_FORMAT = b"pathpatch.PairDataset/1\0"
TINY_DIGEST = "424cb19f6718432b7271aad2b916443206e35cb747c64929d14456652a600673"


def test_digest_is_a_literal_constant_of_its_format_version():
    from pathpatch.data.pairs import _DIGEST_VERSION

    assert _DIGEST_VERSION == DIGEST_FORMAT
    assert tiny().digest() == TINY_DIGEST


def test_digest_is_stable_across_processes():
    code = (
        "import sys; sys.path.insert(0, 'tests/pathpatch'); "
        "from test_dataset import tiny; print(tiny().digest())"
    )
    root = Path(__file__).resolve().parents[2]
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == TINY_DIGEST


def test_digest_covers_every_field_and_ignores_mask_order():
    ds = tiny()
    reordered = PairDataset(**fields(ds, masks={"first": ds.masks["first"],
                                                "prev": ds.masks["prev"]}))
    assert reordered.digest() == ds.digest()
    variants = []
    for name in ("reference", "counterfactual", "answer", "wrong_answer", "example_ids"):
        t = getattr(ds, name).clone()
        t.view(-1)[-1] += 1
        variants.append(fields(ds, **{name: t}))
    scored = ds.scored.clone()
    scored[0, 0] = True
    variants.append(fields(ds, scored=scored))
    prev = ds.masks["prev"].clone()
    prev[0, 0, 0] = True
    variants.append(fields(ds, masks={**ds.masks, "prev": prev}))
    variants.append(fields(ds, masks={"first": ds.masks["first"]}))
    variants.append(fields(ds, masks={"other": ds.masks["first"], "prev": ds.masks["prev"]}))
    variants.append(fields(ds, answer=None))
    digests = {PairDataset(**v).digest() for v in variants}
    assert len(digests) == len(variants) and ds.digest() not in digests


# --- Parquet ----------------------------------------------------------------------------------


def test_parquet_round_trip_is_bit_exact(tmp_path):
    ds = tiny()
    path = tmp_path / "pairs.parquet"
    save_parquet(ds, path)
    schema = pq.read_schema(path)
    assert schema.field("reference").type == pa.list_(pa.int32())
    assert schema.field("scored").type == pa.list_(pa.bool_())
    assert schema.field("mask.first").type == pa.list_(pa.bool_())
    assert schema.field("mask.prev").type == pa.list_(pa.list_(pa.bool_()))
    assert schema.field("answer").type == pa.int64()
    assert schema.field("example_id").type == pa.int64()
    back = load_parquet(path, vocab_size=11)
    assert_same(ds, back)
    assert back.digest() == TINY_DIGEST
    assert [p.name for p in tmp_path.iterdir()] == ["pairs.parquet"]  # no temp file left


def test_parquet_minimal_columns_and_other_integer_types(tmp_path):
    path = tmp_path / "mine.parquet"
    table = pa.table(
        {
            "counterfactual": pa.array([[4, 5, 6], [7, 8, 9]], pa.large_list(pa.int16())),
            "reference": pa.array([[1, 2, 3], [1, 2, 3]], pa.list_(pa.int64(), 3)),
            "scored": [[False, True, True], [True, False, False]],
        }
    )
    pq.write_table(table, path)
    ds = load_parquet(path)
    assert ds.example_ids.tolist() == [0, 1]  # row numbers by default
    assert ds.counterfactual.tolist() == [[4, 5, 6], [7, 8, 9]]
    assert ds.answer is None and ds.masks == {}
    # A dataset without optional fields round-trips too.
    save_parquet(ds, tmp_path / "again.parquet")
    assert_same(ds, load_parquet(tmp_path / "again.parquet"))


def write(tmp_path: Path, **changes: object) -> Path:
    """tiny() as a Parquet file with columns replaced (value None drops the column)."""
    path = tmp_path / "in.parquet"
    save_parquet(tiny(), path)
    table = pq.read_table(path)
    for name, column in changes.items():
        if name in table.column_names:
            table = table.drop_columns([name])
        if column is not None:
            table = table.append_column(name, column if isinstance(column, pa.Array)
                                        else pa.array(column))
    pq.write_table(table, path)
    return path


def rows(value: list, n: int = 5) -> list:
    return [list(value) for _ in range(n)]


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        (dict(reference=[[1, 2, 3, 4]] * 3 + [[1, 2, 3]] + [[1, 2, 3, 4]]),
         "column 'reference' row 3 has 3 tokens but row 0 has 4 (1 rows differ); all sequences "
         "must have the same length"),
        (dict(counterfactual=rows([1, 2, 3, 4], 4) + [[1, 2, 3, 4, 5]]),
         "column 'counterfactual' row 4 has 5 entries but 'reference' has 4"),
        (dict(scored=rows([True, True, True], 5)),
         "column 'scored' row 0 has 3 entries but 'reference' has 4"),
        (dict(reference=None), "missing required column(s) ['reference']"),
        (dict(scored=None, counterfactual=None),
         "missing required column(s) ['counterfactual', 'scored']"),
        (dict(notes=["a"] * 5), "unknown column(s) ['notes']; allowed:"),
        (dict(**{"mask.first": rows([1, 0, 0, 0])}),
         "column 'mask.first' has type list<int64>, expected list<bool>"),
        (dict(**{"mask.first": rows([0.5, 0, 0, float("nan")])}),
         "column 'mask.first' has type list<double>, expected list<bool>"),
        (dict(**{"mask.first": rows([True, False, False])}),
         "column 'mask.first' row 0 has 3 entries but 'reference' has 4"),
        (dict(**{"mask.prev": rows([[True] * 4] * 3)}),
         "column 'mask.prev' row 0 has 3 destination rows, expected 4"),
        (dict(**{"mask.prev": rows([[True] * 4] * 3 + [[True] * 5])}),
         "column 'mask.prev' row 0, dest 3 has 5 source entries, expected 4"),
        (dict(**{"mask.prev": rows([[1] * 4] * 4)}),
         "column 'mask.prev' has type list<list<int64>>, expected list<bool> (1-D) "
         "or list<list<bool>> (2-D [dest][src])"),
        (dict(**{"mask.bad-name": rows([True] * 4)}), "mask name 'bad-name' is not an identifier"),
        (dict(reference=rows([1.0, 2.0, 3.0, 4.0])),
         "column 'reference' has type list<double>, expected list<int32>"),
        (dict(reference=[[1, 2, 3, 4], None, [1, 2, 3, 4], [1, 2, 3, 4], [1, 2, 3, 4]]),
         "column 'reference' row 1 is null"),
        (dict(counterfactual=rows([1, 2, 3, 4], 2) + [[1, None, 3, 4]] + rows([1, 2, 3, 4], 2)),
         "column 'counterfactual' row 2 contains a null"),
        (dict(answer=[1, 2, None, 4, 5]), "column 'answer' row 2 is null"),
        (dict(example_id=[7, 8, 9, 8, 10]), "example_id 8 appears in rows [1, 3]"),
        (dict(scored=rows([True] * 4, 2) + [[False] * 4] + rows([True] * 4, 2)),
         "row 2 (example_id 102) has no scored position"),
        (dict(reference=rows([1, 2, 3, -4])),
         "reference row 0 (example_id 100), position 3 has negative token -4"),
    ],
)
def test_parquet_load_errors(tmp_path, changes, message):
    path = write(tmp_path, **changes)
    with pytest.raises(PathPatchError) as err:
        load_parquet(path)
    text = str(err.value)
    assert text.startswith(f"file '{path}': ")
    assert message in text


def test_parquet_token_out_of_vocabulary(tmp_path):
    path = write(tmp_path, counterfactual=rows([1, 2, 3, 4], 3) + [[1, 2, 3, 50]] + [[0] * 4])
    load_parquet(path)  # no vocabulary given: fine
    with pytest.raises(PathPatchError) as err:
        load_parquet(path, vocab_size=11)
    assert str(err.value).startswith(
        f"file '{path}': counterfactual row 3 (example_id 103), position 3 has token 50, "
        "outside the model's vocabulary [0, 11)"
    )


def test_parquet_empty_missing_and_garbage_files(tmp_path):
    empty = tmp_path / "empty.parquet"
    schema = pq.read_schema(write(tmp_path))
    pq.write_table(schema.empty_table(), empty)
    with pytest.raises(PathPatchError, match="has no rows"):
        load_parquet(empty)
    with pytest.raises(PathPatchError, match="not found"):
        load_parquet(tmp_path / "nope.parquet")
    garbage = tmp_path / "garbage.parquet"
    garbage.write_text("not parquet")
    with pytest.raises(PathPatchError, match="cannot be read as Parquet"):
        load_parquet(garbage)


def test_a_shard_pickles_its_own_rows_not_the_whole_dataset():
    """A row slice is a view of the parent's storage; pickled, a view carries all of it, so
    every shard sent to a worker would ship the whole dataset."""
    import pickle

    big = tiny(batch=2000)
    part = big.select(slice(30, 40))
    own = sum(t.nbytes for t in (part.reference, part.counterfactual, part.scored,
                                 part.answer, part.wrong_answer, part.example_ids,
                                 *part.masks.values()))
    assert len(pickle.dumps(part)) < 2 * own + 4096
    assert_same(pickle.loads(pickle.dumps(part)), part)


def test_every_field_has_its_parquet_column():
    """The Parquet format is driven by one table of the dataclass's fields: a new field without
    a column would be dropped by save_parquet silently."""
    import dataclasses

    from pathpatch.data.pairs import _COLUMNS

    assert list(_COLUMNS) != [] and set(_COLUMNS) == {f.name for f in dataclasses.fields(PairDataset)}
