"""Task generators: determinism, layouts, and masks checked against hand-derivable cases."""

from __future__ import annotations

import pytest
import torch

from pathpatch.data import tasks
from pathpatch.data.tasks import induction_pairs, make_dataset, modular_sum_pairs
from pathpatch.errors import PathPatchError


def _same(a, b) -> bool:
    return (
        torch.equal(a.reference, b.reference)
        and torch.equal(a.counterfactual, b.counterfactual)
        and torch.equal(a.scored, b.scored)
        and a.masks.keys() == b.masks.keys()
        and all(torch.equal(a.masks[k], b.masks[k]) for k in a.masks)
        and torch.equal(a.answer, b.answer)
        and torch.equal(a.wrong_answer, b.wrong_answer)
    )


@pytest.mark.parametrize("counterfactual", ["resample_first", "independent"])
def test_induction_same_seed_same_tensors(counterfactual: str) -> None:
    a = induction_pairs(32, seed=7, counterfactual=counterfactual)
    b = induction_pairs(32, seed=7, counterfactual=counterfactual)
    c = induction_pairs(32, seed=8, counterfactual=counterfactual)
    assert _same(a, b)
    assert not torch.equal(a.reference, c.reference)


def test_modular_sum_same_seed_same_tensors() -> None:
    assert _same(modular_sum_pairs(32, seed=3), modular_sum_pairs(32, seed=3))
    assert not torch.equal(modular_sum_pairs(32, seed=3).reference, modular_sum_pairs(32, seed=4).reference)


def test_induction_masks_on_a_fixed_layout() -> None:
    # Only one layout is allowed: segment of 3 at 2..4, repeated at 7..9 (distance 5).
    data = induction_pairs(
        4, seq_len=12, vocab_size=32, seed=0, min_len=3, max_len=3, distances={5}, starts={2}
    )
    ref, cf = data.reference, data.counterfactual
    assert ref.shape == cf.shape == (4, 12) and ref.dtype == torch.int64
    assert torch.equal(ref[:, 2:5], ref[:, 7:10])
    expect = lambda idx: torch.zeros(12, dtype=torch.bool).index_fill(0, torch.tensor(idx), True)  # noqa: E731
    for b in range(4):
        assert torch.equal(data.masks["first"][b], expect([2, 3, 4]))
        assert torch.equal(data.masks["repeat"][b], expect([7, 8, 9]))
        assert torch.equal(data.scored[b], expect([7, 8]))  # position 9's next token is fresh
        apo, po = data.masks["after_prev_occurrence"][b], data.masks["prev_occurrence"][b]
        assert apo.shape == po.shape == (12, 12)
        assert sorted(map(tuple, apo.nonzero().tolist())) == [(7, 3), (8, 4), (9, 5)]
        assert sorted(map(tuple, po.nonzero().tolist())) == [(7, 2), (8, 3), (9, 4)]
        # Distinct fillers: every token occurs once, except the segment's twice.
        counts = torch.bincount(ref[b], minlength=32)
        assert sorted(counts[counts > 0].tolist()) == [1] * 6 + [2] * 3
    assert torch.equal(data.answer, ref[:, 9])  # next token at the last scored position (8)
    # resample_first: only the first occurrence changes, to tokens found nowhere else.
    assert torch.equal(cf[:, :2], ref[:, :2]) and torch.equal(cf[:, 5:], ref[:, 5:])
    for b in range(4):
        assert not set(cf[b, 2:5].tolist()) & set(ref[b].tolist())
    assert torch.equal(data.wrong_answer, cf[:, 4])  # what induction would copy in the counterfactual
    assert (data.wrong_answer != data.answer).all()


def test_induction_masks_agree_with_tokens_on_random_layouts() -> None:
    data = induction_pairs(64, seed=1)
    ref, seq_len = data.reference, data.seq_len
    assert not data.scored[:, -1].any()  # scored t < seq_len - 1
    assert (data.scored & ~data.masks["repeat"]).sum() == 0
    assert (data.scored.sum(1) >= tasks.MIN_SEGMENT_LEN - 1).all()
    for b in range(len(data)):
        for dest, src in data.masks["prev_occurrence"][b].nonzero().tolist():
            assert src < dest and ref[b, src] == ref[b, dest]
        for dest, src in data.masks["after_prev_occurrence"][b].nonzero().tolist():
            if data.scored[b, dest]:  # induction's prediction is the truth there
                assert ref[b, src] == ref[b, dest + 1]
        last = data.scored[b].nonzero().max()
        assert data.answer[b] == ref[b, last + 1] and last + 1 < seq_len
    assert (data.wrong_answer != data.answer).all()


def test_independent_counterfactual() -> None:
    data = induction_pairs(64, seed=2, counterfactual="independent")
    assert (data.reference != data.counterfactual).float().mean() > 0.9
    assert (data.wrong_answer != data.answer).all()


def test_layouts_respect_allowed_and_excluded_sets() -> None:
    gen = torch.Generator().manual_seed(0)
    train = tasks.sample_repeat_layout(
        2000,
        64,
        gen,
        exclude_distances=tasks.HELD_OUT_DISTANCES,
        exclude_starts=tasks.HELD_OUT_STARTS,
    )
    assert not set(train.distance.tolist()) & tasks.HELD_OUT_DISTANCES
    assert not set(train.start.tolist()) & tasks.HELD_OUT_STARTS
    assert len(set(train.distance.tolist())) > 20 and len(set(train.length.tolist())) > 20  # varied
    held = tasks.sample_repeat_layout(
        500, 64, gen, distances=tasks.HELD_OUT_DISTANCES, starts=tasks.HELD_OUT_STARTS
    )
    assert set(held.distance.tolist()) <= tasks.HELD_OUT_DISTANCES
    assert set(held.start.tolist()) <= tasks.HELD_OUT_STARTS
    assert (held.distance >= held.length).all()
    assert (held.second_start + held.length <= 64).all()


def test_training_batch_shares_the_pair_logic() -> None:
    tokens, scored = tasks.induction_batch(16, torch.Generator().manual_seed(0))
    assert tokens.shape == scored.shape == (16, tasks.INDUCTION_SEQ_LEN)
    assert not scored[:, -1].any()


def test_uniform_fillers() -> None:
    data = induction_pairs(16, seq_len=64, vocab_size=40, seed=0, max_len=16, fillers="uniform")
    assert data.reference.max() < 40 and (data.wrong_answer != data.answer).all()


def test_modular_sum_pairs() -> None:
    p = tasks.MODSUM_MODULUS
    data = modular_sum_pairs(64, seed=0)
    ref, cf = data.reference, data.counterfactual
    assert torch.equal(data.answer, (ref[:, 0] + ref[:, -1]) % p)
    assert (ref[:, 1:-1] >= p).all()  # fillers are never numbers
    assert (cf[:, 0] != ref[:, 0]).all() and torch.equal(cf[:, 1:], ref[:, 1:])
    assert torch.equal(data.wrong_answer, (cf[:, 0] + cf[:, -1]) % p)
    assert (data.wrong_answer != data.answer).all()
    assert data.scored[:, -1].all() and data.scored.sum() == 64
    assert data.masks["attend_a"][:, -1, 0].all() and data.masks["attend_a"].sum() == 64
    indep = modular_sum_pairs(64, seed=0, counterfactual="independent")
    assert (indep.wrong_answer != indep.answer).all()


def test_make_dataset_registry() -> None:
    assert _same(make_dataset("induction", n=8, seed=1), induction_pairs(8, seed=1))
    assert _same(make_dataset("modular_sum", n=8, seed=1), modular_sum_pairs(8, seed=1))
    # The sweep spec hands lists over as tuples.
    make_dataset("induction", n=4, distances=(24, 25), starts=(5,))
    with pytest.raises(PathPatchError, match="allowed are gpt2_numbers, induction, ioi, modular_sum"):
        make_dataset("greater_than", n=8)
    with pytest.raises(PathPatchError, match="unknown parameter.*seq_length.*allowed are n, seq_len"):
        make_dataset("induction", n=8, seq_length=10)
    with pytest.raises(PathPatchError, match="needs n"):
        make_dataset("induction")


def test_bad_parameters_are_clear_errors() -> None:
    with pytest.raises(PathPatchError, match="counterfactual.*resample_first, independent"):
        induction_pairs(4, counterfactual="shuffle")
    with pytest.raises(PathPatchError, match="vocab_size=32 is too small.*uniform"):
        induction_pairs(4, seq_len=64, vocab_size=32)
    with pytest.raises(PathPatchError, match="no repeat layout fits"):
        induction_pairs(4, seq_len=16, distances={30})
    with pytest.raises(PathPatchError, match="modulus"):
        modular_sum_pairs(4, vocab_size=10, modulus=23)
