"""Metrics on hand-made logits, user callables, and the bootstrap summary."""

from __future__ import annotations

import math
import pickle
import textwrap

import pytest
import torch

from pathpatch.data.pairs import PairDataset
from pathpatch.engine import metrics
from pathpatch.engine.metrics import (
    BUILTIN_METRICS,
    Metric,
    get_metric,
)
from pathpatch.errors import PathPatchError

LN = math.log


def pairs(scored: list[list[bool]], reference=None, answer=None, wrong_answer=None):
    scored_t = torch.tensor(scored)
    ref = torch.zeros(scored_t.shape, dtype=torch.long) if reference is None else reference
    return PairDataset(
        reference=torch.as_tensor(ref),
        counterfactual=torch.as_tensor(ref).clone(),
        scored=scored_t,
        answer=None if answer is None else torch.tensor(answer),
        wrong_answer=None if wrong_answer is None else torch.tensor(wrong_answer),
    )


def two_token(*rows: list[tuple[float, float]]) -> torch.Tensor:
    """Logits [batch, pos, 2] from per-position (logit0, logit1) pairs."""
    return torch.tensor([list(map(list, r)) for r in rows], dtype=torch.float64)


# --- KL ---------------------------------------------------------------------------------------


def test_kl_of_identical_logits_is_zero():
    torch.manual_seed(0)
    logits = torch.randn(3, 5, 17) * 10
    batch = pairs([[True] * 5] * 3)
    out = get_metric("kl").per_example(logits, logits.clone(), batch)
    assert out.dtype == torch.float64 and out.shape == (3,)
    assert torch.equal(out, torch.zeros(3, dtype=torch.float64))


def test_kl_matches_hand_computation_on_two_tokens():
    # clean [0, 0] -> p = (1/2, 1/2); other [ln 3, 0] -> q = (3/4, 1/4)
    # KL(p || q) = 1/2 ln((1/2)/(3/4)) + 1/2 ln((1/2)/(1/4)) = 1/2 ln(4/3)
    kl = 0.5 * LN(4 / 3)
    clean = two_token([(0, 0), (0, 0), (0, 0)], [(0, 0), (0, 0), (5, 1)])
    other = two_token([(LN(3), 0), (9, 9), (LN(3), 0)], [(0, 0), (LN(3), 0), (5, 1)])
    batch = pairs([[True, False, False], [False, True, True]])
    out = get_metric("kl").per_example(clean, other, batch)
    # example 0: one scored position; example 1: mean of kl and 0 (identical at position 2)
    torch.testing.assert_close(out, torch.tensor([kl, kl / 2], dtype=torch.float64))


def test_kl_is_not_symmetric_and_handles_impossible_tokens():
    # clean rules token 1 out entirely (-inf): 0 * log(0 / q) counts as 0, not NaN.
    clean = two_token([(0.0, -math.inf)])
    other = two_token([(0.0, 0.0)])
    batch = pairs([[True]])
    out = get_metric("kl").per_example(clean, other, batch)
    torch.testing.assert_close(out, torch.tensor([LN(2)], dtype=torch.float64))
    reverse_is_infinite = pytest.raises(PathPatchError, match="is not finite for example_ids")
    with reverse_is_infinite:
        get_metric("kl").per_example(other, clean, batch)


def test_unscored_positions_change_nothing():
    torch.manual_seed(1)
    clean, other = torch.randn(2, 4, 6), torch.randn(2, 4, 6)
    batch = pairs([[False, True, True, False], [True, False, False, False]])
    for name in ("kl", "loss"):
        metric = get_metric(name)
        base = metric.per_example(clean, other, batch)
        changed = other.clone()
        changed[0, 0], changed[0, 3], changed[1, 1:] = 100.0, float("nan"), -7.0
        assert torch.equal(metric.per_example(clean, changed, batch), base), name
        changed[0, 2] += torch.randn(6)  # a scored position: example 0 moves, example 1 not
        moved = metric.per_example(clean, changed, batch)
        assert moved[0] != base[0] and moved[1] == base[1], name


def test_low_precision_logits_are_read_in_float64():
    torch.manual_seed(2)
    clean, other = torch.randn(2, 3, 5), torch.randn(2, 3, 5)
    batch = pairs([[True] * 3] * 2)
    exact = get_metric("kl").per_example(clean.double(), other.double(), batch)
    half = get_metric("kl").per_example(clean.bfloat16(), other.bfloat16(), batch)
    assert half.dtype == torch.float64
    torch.testing.assert_close(half, exact, rtol=0.05, atol=0.01)


# --- |Δ loss| ---------------------------------------------------------------------------------


def test_loss_difference_by_hand():
    # reference tokens 0 1 0: position 0 predicts token 1, position 1 predicts token 0.
    ref = torch.tensor([[0, 1, 0]])
    clean = two_token([(0, 0), (0, 0), (0, 0)])  # p(target) = 1/2 everywhere
    other = two_token([(LN(3), 0), (LN(3), 0), (0, 0)])  # p = (3/4, 1/4)
    # position 0: target 1, loss ln 2 vs ln 4 -> |Δ| = ln 2
    # position 1: target 0, loss ln 2 vs ln(4/3) -> |Δ| = ln(3/2)
    both = pairs([[True, True, False]], reference=ref)
    out = get_metric("loss").per_example(clean, other, both)
    torch.testing.assert_close(out, torch.tensor([(LN(2) + LN(1.5)) / 2], dtype=torch.float64))
    # Absolute value per position: errors in opposite directions do not cancel.
    assert out.item() > abs(LN(2) - LN(1.5)) / 2


def test_loss_refuses_the_last_position():
    batch = pairs([[True, False, False], [False, False, True]])
    logits = torch.zeros(2, 3, 4)
    metric = get_metric("loss")
    with pytest.raises(PathPatchError) as err:
        metric.check_dataset(batch)
    assert "scores the last position (2), which has none, in 1 examples" in str(err.value)
    assert "example_ids [1]" in str(err.value) and "use metric 'kl'" in str(err.value)
    with pytest.raises(PathPatchError, match="scores the last position"):
        metric.per_example(logits, logits, batch)
    get_metric("kl").per_example(logits, logits, batch)  # KL may read the last position


# --- |Δ logit difference| ---------------------------------------------------------------------


def test_logit_difference_by_hand():
    # vocab 3; answer / wrong answer per example; read at the LAST scored position only.
    clean = torch.zeros(2, 3, 3, dtype=torch.float64)
    other = torch.zeros(2, 3, 3, dtype=torch.float64)
    clean[0, 2] = torch.tensor([0.0, 5.0, 1.0])  # ex 0 last scored = 2: diff(1 vs 2) = 4
    other[0, 2] = torch.tensor([9.0, 2.0, 1.0])  # diff = 1 -> |4 - 1| = 3
    other[0, 0] = torch.tensor([0.0, 100.0, 0.0])  # earlier scored position: ignored
    clean[1, 1] = torch.tensor([1.0, 0.0, 0.0])  # ex 1 last scored = 1: diff(0 vs 2) = 1
    other[1, 1] = torch.tensor([0.0, 0.0, 2.5])  # diff = -2.5 -> |1 - (-2.5)| = 3.5
    batch = pairs(
        [[True, False, True], [True, True, False]], answer=[1, 0], wrong_answer=[2, 2]
    )
    out = get_metric("logit_diff").per_example(clean, other, batch)
    torch.testing.assert_close(out, torch.tensor([3.0, 3.5], dtype=torch.float64))


def test_logit_difference_needs_answers():
    logits = torch.zeros(1, 2, 3)
    with pytest.raises(PathPatchError) as err:
        get_metric("logit_diff").per_example(logits, logits, pairs([[True, True]]))
    assert "has no answer or wrong_answer" in str(err.value)
    only_answer = pairs([[True, True]], answer=[1])
    with pytest.raises(PathPatchError, match="has no wrong_answer; add the columns"):
        get_metric("logit_diff").check_dataset(only_answer)
    too_big = pairs([[True, True]], answer=[7], wrong_answer=[0])
    with pytest.raises(PathPatchError, match="answer 7 of example_id 0 is outside the vocab"):
        get_metric("logit_diff").per_example(logits, logits, too_big)


# --- the Metric API ---------------------------------------------------------------------------


def test_get_metric_names_and_default():
    assert get_metric().name == "kl"
    assert set(BUILTIN_METRICS) == {"kl", "loss", "logit_diff"}
    metric = get_metric("loss")
    assert get_metric(metric) is metric
    assert pickle.loads(pickle.dumps(metric)) == metric  # travels to workers
    with pytest.raises(PathPatchError) as err:
        get_metric("kl_div")
    assert "unknown metric 'kl_div'; allowed: 'kl', 'loss', 'logit_diff'" in str(err.value)
    with pytest.raises(PathPatchError, match="must be a name or a Metric"):
        get_metric(3)


def _naive_kl(clean, other, batch):
    """Textbook KL in float64, one scored position at a time (0 log 0 = 0)."""
    out = []
    for b in range(len(batch)):
        terms = []
        for t in batch.scored[b].nonzero()[:, 0].tolist():
            log_p = torch.log_softmax(clean[b, t].double(), -1)
            log_q = torch.log_softmax(other[b, t].double(), -1)
            p = log_p.exp()
            terms.append(sum(float(p[v] * (log_p[v] - log_q[v])) for v in range(len(p)) if p[v] > 0))
        out.append(sum(terms) / len(terms))
    return torch.tensor(out, dtype=torch.float64)


def _naive_loss(clean, other, batch):
    out = []
    for b in range(len(batch)):
        terms = []
        for t in batch.scored[b].nonzero()[:, 0].tolist():
            y = int(batch.reference[b, t + 1])
            lp = torch.log_softmax(clean[b, t].double(), -1)[y]
            lq = torch.log_softmax(other[b, t].double(), -1)[y]
            terms.append(abs(float(lp - lq)))
        out.append(sum(terms) / len(terms))
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("chunk", [2**23, 40])  # one chunk, and many (40 logits = 3 positions)
def test_clean_side_computed_once_matches_textbook(monkeypatch, chunk):
    """`against` keeps the clean side for the batch; every other output gets the textbook value,
    also with tokens the clean run rules out (-inf) and across position chunks."""
    monkeypatch.setattr(metrics, "_CHUNK_ELEMENTS", chunk)
    gen = torch.Generator().manual_seed(5)
    clean = torch.randn(3, 6, 13, generator=gen) * 4
    clean[0, 1, 3] = clean[2, 4, 0] = -math.inf  # ruled out by the clean run
    others = [torch.randn(3, 6, 13, generator=gen) * 4 for _ in range(3)]
    others[1][0, 1, 3] = -math.inf  # ruled out by both: adds nothing
    scored = torch.rand(3, 6, generator=gen) < 0.6
    scored[:, 0], scored[:, -1] = True, False  # every example scored; loss needs a next token
    batch = PairDataset(torch.randint(4, 13, (3, 6), generator=gen),  # targets never ruled out
                        torch.randint(0, 13, (3, 6), generator=gen), scored)
    for name, naive in (("kl", _naive_kl), ("loss", _naive_loss)):
        delta = get_metric(name).against(clean, batch)
        for other in others:
            want = naive(clean, other, batch)
            torch.testing.assert_close(delta(other), want, rtol=1e-12, atol=1e-13)
            torch.testing.assert_close(get_metric(name).per_example(clean, other, batch), want,
                                       rtol=1e-12, atol=1e-13)
        assert torch.equal(delta(clean.clone()), torch.zeros(3, dtype=torch.float64)), name


def test_per_example_checks_shapes():
    batch = pairs([[True, True]] * 2)
    metric = get_metric("kl")
    with pytest.raises(PathPatchError, match=r"other_logits has shape \[2, 3, 5\] but the batch"):
        metric.per_example(torch.zeros(2, 2, 5), torch.zeros(2, 3, 5), batch)
    with pytest.raises(PathPatchError, match=r"clean_logits must be \[batch, pos, vocab\]"):
        metric.per_example(torch.zeros(2, 2), torch.zeros(2, 2, 5), batch)
    with pytest.raises(PathPatchError, match="differ in shape"):
        metric.per_example(torch.zeros(2, 2, 5), torch.zeros(2, 2, 6), batch)


USER_MODULE = """
import torch

def max_abs(clean_logits, other_logits, batch):
    diff = (clean_logits - other_logits).abs().amax(dim=-1)  # (batch, pos)
    return torch.where(batch.scored, diff, 0.0).amax(dim=1)

def wrong_shape(clean_logits, other_logits, batch):
    return torch.zeros(len(batch), 2)

def signed(clean_logits, other_logits, batch):
    return (clean_logits - other_logits).sum(dim=(1, 2))

def nan(clean_logits, other_logits, batch):
    return torch.full((len(batch),), float("nan"))

class Holder:
    fn = staticmethod(max_abs)

NOT_CALLABLE = 3
"""


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    (tmp_path / "pp_user_metrics.py").write_text(textwrap.dedent(USER_MODULE))
    (tmp_path / "pp_broken_metrics.py").write_text("raise RuntimeError('boom')\n")
    (tmp_path / "pp_needs_dep.py").write_text("import pp_not_installed_anywhere\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    return "pp_user_metrics"


def test_user_callable_metric(user_module):
    batch = pairs([[False, True], [True, False]])
    clean = torch.zeros(2, 2, 3)
    other = torch.zeros(2, 2, 3)
    other[0, 1, 2] = -4.0
    other[1, 1, 0] = 9.0  # unscored
    for spec in (f"{user_module}:max_abs", f"{user_module}:Holder.fn"):
        metric = get_metric(spec)
        assert metric.name == spec
        out = metric.per_example(clean, other, batch)
        torch.testing.assert_close(out, torch.tensor([4.0, 0.0], dtype=torch.float64))


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("pp_no_such_module:fn", "no module named 'pp_no_such_module'; it must be importable"),
        ("pp_user_metrics:missing", "module 'pp_user_metrics' has no attribute 'missing'"),
        ("pp_user_metrics:NOT_CALLABLE", "'NOT_CALLABLE' is a int, not a function"),
        ("pp_broken_metrics:fn", "importing 'pp_broken_metrics' raised RuntimeError: boom"),
        ("pp_needs_dep:fn", "importing 'pp_needs_dep' failed: No module named "
                            "'pp_not_installed_anywhere'"),
        (":fn", "a callable metric is written 'module:function'"),
        ("pp_user_metrics:", "a callable metric is written 'module:function'"),
    ],
)
def test_user_callable_import_errors(user_module, spec, message):
    with pytest.raises(PathPatchError) as err:
        get_metric(spec)
    assert message in str(err.value)


@pytest.mark.parametrize(
    ("fn", "message"),
    [
        ("wrong_shape", "returned [2, 2]; a metric returns one value per example, a tensor of "
                        "shape [2]"),
        ("signed", "is negative (-1.0) for example_id 0; a dissimilarity must be >= 0"),
        ("nan", "is not finite for example_ids [0, 1]"),
    ],
)
def test_user_callable_bad_results(user_module, fn, message):
    clean, other = torch.zeros(2, 2, 3), torch.zeros(2, 2, 3)
    other[0, 0, 0] = 1.0
    with pytest.raises(PathPatchError) as err:
        get_metric(f"{user_module}:{fn}").per_example(clean, other, pairs([[True, True]] * 2))
    assert message in str(err.value)


def test_a_metric_can_be_built_directly():
    metric = Metric.from_fn("zero", lambda c, o, b: torch.zeros(len(b)))
    out = metric.per_example(torch.zeros(1, 1, 2), torch.ones(1, 1, 2), pairs([[True]]))
    assert out.dtype == torch.float64 and out.tolist() == [0.0]
