"""Shards: contiguous ranges of a dataset named by their content, as the planner cuts them."""

from __future__ import annotations

import pytest
import torch

from pathpatch.data.pairs import PairDataset
from pathpatch.errors import PathPatchError
from pipeline.plan import Shard, shard_dataset
from tests.pathpatch.test_dataset import assert_same, fields, tiny


def test_shards_cover_the_dataset_exactly_once():
    ds = tiny(batch=7)
    for size in (1, 2, 3, 7, 100):
        shards = shard_dataset(ds, size)
        assert [s.index for s in shards] == list(range(len(shards)))
        covered = torch.cat([s.take(ds).example_ids for s in shards])
        assert covered.tolist() == ds.example_ids.tolist()
        assert all(len(s) == size for s in shards[:-1]) and 1 <= len(shards[-1]) <= size
        assert len({s.id for s in shards}) == len(shards)


def test_shards_are_stable_literals():
    shards = shard_dataset(tiny(), 2)
    assert shards == shard_dataset(tiny(), 2)
    assert [(s.start, s.stop) for s in shards] == [(0, 2), (2, 4), (4, 5)]
    assert [s.id for s in shards] == [
        "shard-00000-db74ccf4f0da",
        "shard-00001-4cdc3a61446b",
        "shard-00002-fd5ec9abbbc8",
    ]
    for s in shards:
        part = s.take(tiny())
        assert part.digest() == s.digest
        assert s.id == f"shard-{s.index:05d}-{s.digest[:12]}"
        assert_same(part, tiny().select(slice(s.start, s.stop)))


def test_shard_errors():
    ds = tiny()
    for size in (0, -3, True, 2.0):
        with pytest.raises(PathPatchError, match="shard_size must be a positive number"):
            shard_dataset(ds, size)
    with pytest.raises(PathPatchError, match="is empty or invalid"):
        Shard(index=0, start=3, stop=3, digest="0" * 64)
    shard = shard_dataset(ds, 2)[1]
    changed = ds.reference.clone()
    changed[3, 0] += 1
    with pytest.raises(PathPatchError, match="the dataset changed since it was sharded"):
        shard.take(PairDataset(**fields(ds, reference=changed)))
    with pytest.raises(PathPatchError, match="but the dataset has 2"):
        shard.take(ds.select(slice(0, 2)))


def test_dataset_and_shards_pickle_for_workers():
    import pickle

    ds = tiny()
    shards = shard_dataset(ds, 2)
    back = pickle.loads(pickle.dumps(ds))
    assert_same(ds, back)
    assert pickle.loads(pickle.dumps(shards)) == shards
    assert shards[2].take(back).example_ids.tolist() == [104]
