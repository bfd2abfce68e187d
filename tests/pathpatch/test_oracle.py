"""The engine against the brute-force oracle on hundreds of random non-trivial hypotheses."""

import random

import pytest
import torch

from pathpatch.engine.group_evaluation import GroupEvaluator, evaluate_logits
from pathpatch.engine.positions import PositionContext
from pathpatch.engine.runs import Runs
from pathpatch.engine.stage_plan import GroupPlan, Residual
from pathpatch.language.hypotheses import Hypothesis
from pathpatch.model.graph import Graph
from tests.pathpatch import oracle
from tests.pathpatch.conftest import FAMILIES, tiny_model

T, B = 3, 2


def _data(seed: int, vocab: int):
    gen = torch.Generator().manual_seed(seed)
    xr = torch.randint(0, vocab, (B, T), generator=gen)
    xc = torch.randint(0, vocab, (B, T), generator=gen)
    tril = torch.ones(T, T, dtype=torch.bool).tril()
    masks = {
        "m1": torch.rand(B, T, generator=gen) < 0.5,
        "n1": torch.rand(B, T, generator=gen) < 0.5,
        "m2": (torch.rand(B, T, T, generator=gen) < 0.5) & tril,
        "n2": (torch.rand(B, T, T, generator=gen) < 0.5) & tril,
    }
    return xr, xc, masks


@pytest.mark.parametrize("family", list(FAMILIES))
def test_oracle_forward_matches_transformer_lens(family):
    model = tiny_model(family)
    xr, xc, masks = _data(0, model.cfg.d_vocab)
    om = oracle.Model(model)
    for b in range(B):
        got = oracle.Oracle(om, ("all",), xr[b], xc[b], {}).logits()
        torch.testing.assert_close(got, model(xr[b : b + 1])[0], atol=1e-10, rtol=1e-10)
        got = oracle.Oracle(om, ("none",), xr[b], xc[b], {}).logits()
        torch.testing.assert_close(got, model(xc[b : b + 1])[0], atol=1e-10, rtol=1e-10)


# The oracle is exponential: the families with gated MLPs and rotary cost ~2.5x a GPT-2-style one
# per case, so they run fewer cases (the suite stays well under 15 minutes)
CASES = {"llama": 40, "neox": 40, "window": 40, "gemma": 40}


@pytest.mark.slow
@pytest.mark.parametrize("family", list(FAMILIES))
def test_engine_matches_oracle_on_random_hypotheses(family):
    model = tiny_model(family, seed=1)
    graph = Graph.from_model(model)
    om = oracle.Model(model)
    rng = random.Random(f"oracle-{family}")
    stats = dict(cases=0, nontrivial=0, complement=0, restricted=0, edges=0)
    for case in range(CASES.get(family, 100)):
        xr, xc, masks = _data(case, model.cfg.d_vocab)
        h = oracle.random_hypothesis(rng, om, ["m1", "n1"], ["m2", "n2"])
        text = oracle.render(h)
        copy_graph = Hypothesis(f"h{case}", text).compile(graph)
        runs = Runs(model, xr, xc)
        positions = PositionContext(masks, B, T, torch.device("cpu"))
        (got,) = evaluate_logits(model, graph, [copy_graph], runs, positions)
        nontrivial = copy_graph.n_mixed >= 2
        for b in range(B):
            ex_masks = {k: v[b] for k, v in masks.items()}
            orc = oracle.Oracle(om, h, xr[b], xc[b], ex_masks)
            want = orc.logits()
            torch.testing.assert_close(
                got[b], want, atol=1e-9, rtol=1e-9, msg=lambda m, t=text: f"{t}: {m}"
            )
            inside, total = orc.count()
            nontrivial &= 0 < inside < total
        stats["cases"] += 1
        stats["nontrivial"] += nontrivial
        stats["complement"] += oracle.uses(h, "not") or (h[0] == "edges" and not h[1])
        stats["restricted"] += oracle.uses(h, "restriction")
        stats["edges"] += oracle.uses(h, "edges")
    print(family, stats)
    assert stats["nontrivial"] >= 0.5 * stats["cases"], stats
    assert stats["complement"] >= 0.2 * stats["cases"], stats
    assert stats["restricted"] >= 0.2 * stats["cases"], stats
    assert stats["edges"] >= 0.1 * stats["cases"], stats


@pytest.mark.parametrize("family", ["attn-only", "mlp"])
def test_path_counts_match_enumeration(family):
    """|P| by dynamic programming equals the oracle's naive enumeration, masks included."""
    from pathpatch.data.pairs import PairDataset
    from pathpatch.tools.explain import explain

    model = tiny_model(family, seed=2)
    graph = Graph.from_model(model)
    om = oracle.Model(model)
    rng = random.Random(f"count-{family}")
    for case in range(25):
        xr, xc, masks = _data(case, model.cfg.d_vocab)
        data = PairDataset(xr, xc, torch.ones(B, T, dtype=torch.bool), masks)
        h = oracle.random_hypothesis(rng, om, ["m1", "n1"], ["m2", "n2"])
        for b in range(B):
            got = explain(graph, Hypothesis("h", oracle.render(h)), dataset=data, example=b)
            inside, total = oracle.Oracle(om, h, xr[b], xc[b], {k: v[b] for k, v in masks.items()}).count()
            assert (got.n_paths, got.n_all) == (inside, total), oracle.render(h)
            orc = oracle.Oracle(om, h, xr[b], xc[b], {k: v[b] for k, v in masks.items()})
            for sample in got.samples:  # every sampled path is in P, by the oracle's matcher
                assert orc.contains(h, _parse_sample(sample)), (oracle.render(h), sample)


def _parse_sample(text: str) -> tuple:
    """'in@0 -v-> a0.1@2 -> out@2' as the oracle's positional path."""
    words = text.split()
    name, p = words[0].split("@")
    path, prev = [(name, None, int(p), int(p))], int(p)
    for arrow, node in zip(words[1::2], words[2::2]):
        name, i = node.split("@")
        channel = "resid" if arrow == "->" else arrow[1]
        path.append((name, channel, int(i), prev))
        prev = int(i)
    return tuple(path)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_rows_of_the_counterfactual_run_that_hypotheses_share_are_projected_once(family):
    """Induction-style hypotheses through a1.0: where one reads a1.0's q and k from x_c alone,
    those rows are the counterfactual residual, read from the cache; the two hypotheses that
    read it through the same heads and channels share their rows, projected once. Each
    hypothesis still equals the oracle."""
    model = tiny_model(family, seed=1)
    graph = Graph.from_model(model)
    om = oracle.Model(model)
    xr, xc, masks = _data(0, model.cfg.d_vocab)

    def direct(channel, *restrictions):
        return ("chain", [("in", None, []), ("a1.0", channel, list(restrictions)), ("out", None, [])])

    hyps = [direct("v"), ("or", direct("v"), direct("q")), ("or", direct("v"), direct("k", ("mask", "m2")))]
    plan = GroupPlan(graph, [Hypothesis(f"h{i}", oracle.render(h)).compile(graph)
                             for i, h in enumerate(hyps)])
    stage = next(s for s in plan.stages if s.kind.value == "head" and s.layer == 1)
    assert [m.cached for m in stage.mixing.values()] == [(Residual.COUNTERFACTUAL,)] * 3
    # of 10 rows (q, k, v of each copy, two k versions in the third), the first and third
    # hypotheses' q and k of x_c alone are two
    assert stage.n_rows == 8 and plan.summary().shared_rows == 2
    got = GroupEvaluator(model, plan, Runs(model, xr, xc),
                         PositionContext(masks, B, T, torch.device("cpu"))).logits()
    for h, logits in zip(hyps, got, strict=True):
        for b in range(B):
            want = oracle.Oracle(om, h, xr[b], xc[b], {k: v[b] for k, v in masks.items()}).logits()
            torch.testing.assert_close(logits[b], want, atol=1e-9, rtol=1e-9,
                                       msg=lambda m, h=h: f"{oracle.render(h)}: {m}")
