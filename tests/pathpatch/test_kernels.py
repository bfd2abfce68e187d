"""The mixing product: one coefficient matrix at every position of position-major sources."""

import random

import torch

from pathpatch.engine import kernels
from pathpatch.engine.group_evaluation import GroupEvaluator
from pathpatch.engine.positions import PositionContext
from pathpatch.engine.runs import Runs
from pathpatch.engine.stage_plan import GroupPlan
from pathpatch.model.graph import Graph
from pathpatch.tools.engine_benchmarks import random_circuits
from tests.pathpatch.conftest import tiny_model


def test_mix_equals_the_product_at_every_position_on_bank_views():
    gen = torch.Generator().manual_seed(0)
    storage = torch.randn(30, 40, 16, generator=gen)  # [position, slot, d_model]
    source = storage[:, 5:25]  # a slice of a bank's slots, as the engine reads it
    coef = (torch.rand(7, 20, generator=gen) < 0.5).float()
    want = torch.einsum("mk,pkd->pmd", coef.double(), source.double())
    torch.testing.assert_close(kernels.mix(coef, source).double(), want, rtol=1e-6, atol=1e-5)
    out = torch.ones(30, 10, 16)[:, 2:9]
    kernels.mix_add_(out, coef, source)
    torch.testing.assert_close(out.double(), want + 1, rtol=1e-6, atol=1e-5)
    for dtype in (torch.float64, torch.bfloat16):
        c, s = coef.to(dtype), source.to(dtype)
        torch.testing.assert_close(kernels.mix(c, s), torch.einsum("mk,pkd->pmd", c, s))


def test_float32_engine_matches_float64():
    """Dense circuits in float32 agree with float64 (the position-major banks, end to end)."""
    exact = tiny_model("mlp", n_layers=3, n_heads=4)
    single = tiny_model("mlp", n_layers=3, n_heads=4, dtype=torch.float32)
    single.load_state_dict({k: v.float() for k, v in exact.state_dict().items()})
    graph = Graph.from_model(exact)
    gen = torch.Generator().manual_seed(3)
    xr, xc = (torch.randint(0, 7, (3, 5), generator=gen) for _ in range(2))
    cgs = [h.compile(graph) for h in random_circuits(graph, 4, random.Random(2))]
    got = {}
    for name, model in (("exact", exact), ("single", single)):
        plan = GroupPlan(graph, cgs)
        positions = PositionContext({}, 3, 5, xr.device)
        got[name] = GroupEvaluator(model, plan, Runs(model, xr, xc), positions).logits()
    for a, b in zip(got["exact"], got["single"]):
        torch.testing.assert_close(b.double(), a, rtol=1e-4, atol=1e-4)
        assert not torch.allclose(a, Runs(exact, xr, xc).logits["r"])  # a real patch
