"""The mixing product: oneDNN on large float32 CPU products, equal to torch.mm; torch.mm elsewhere."""

import random

import pytest
import torch

from pathpatch import kernels
from pathpatch.benchmark import random_circuits
from pathpatch.graph import Graph
from pathpatch.positions import PositionContext
from pathpatch.runs import Runs
from pathpatch.stacking import GroupEvaluator, GroupPlan
from tests.pathpatch.conftest import tiny_model


@pytest.fixture
def counted(monkeypatch):
    """Counts the oneDNN calls the mixing makes; every product counts as large."""
    op = kernels._onednn()
    assert op is not None, "this torch build should have oneDNN (the CPU wheels do)"
    calls = []

    def counting(*args):
        calls.append(args[0].shape)
        return op(*args)

    monkeypatch.setattr(kernels, "_onednn", lambda: counting)
    monkeypatch.setattr(kernels, "ONEDNN_MIN_MACS", 0)
    return calls


def test_mix_equals_torch_mm_on_views(counted):
    gen = torch.Generator().manual_seed(0)
    storage = torch.randn(40, 3000, generator=gen)
    source = storage[5:25]  # a slice of a larger bank, as the engine reads it
    coef = (torch.rand(7, 20, generator=gen) < 0.5).float()
    want = coef.double() @ source.double()
    torch.testing.assert_close(kernels.mix(coef, source).double(), want, rtol=1e-6, atol=1e-5)
    out = torch.ones(10, 3000)[2:9]
    kernels.mix_add_(out, coef, source)
    torch.testing.assert_close(out.double(), want + 1, rtol=1e-6, atol=1e-5)
    assert len(counted) == 2


def test_other_dtypes_and_devices_take_torch_mm(counted):
    for dtype in (torch.float64, torch.bfloat16):
        coef, source = torch.rand(3, 4, dtype=dtype), torch.rand(4, 6, dtype=dtype)
        torch.testing.assert_close(kernels.mix(coef, source), coef @ source)
    assert counted == []


def test_small_products_take_torch_mm(counted, monkeypatch):
    monkeypatch.setattr(kernels, "ONEDNN_MIN_MACS", 7 * 20 * 3000)
    coef, source = torch.rand(7, 20), torch.rand(20, 3000)
    kernels.mix(coef[:6], source)
    kernels.mix_add_(torch.zeros(7, 2999), coef, source[:, 1:])
    assert counted == []
    kernels.mix(coef, source)
    kernels.mix_add_(torch.zeros(7, 3000), coef, source)
    assert len(counted) == 2


def test_the_environment_can_force_blas(monkeypatch):
    kernels._onednn.cache_clear()
    monkeypatch.setenv("PATHPATCH_MIXING_KERNEL", "blas")
    try:
        assert kernels.mixing_kernel() == "blas"
    finally:
        kernels._onednn.cache_clear()
    monkeypatch.delenv("PATHPATCH_MIXING_KERNEL")
    assert kernels.mixing_kernel() == "onednn"


def test_float32_engine_through_onednn_matches_float64(counted):
    """Dense circuits in float32 (every stage mixed through oneDNN) agree with float64."""
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
    assert len(counted) >= plan.n_passes  # float32 only: every mixed stage went through oneDNN
    for a, b in zip(got["exact"], got["single"]):
        torch.testing.assert_close(b.double(), a, rtol=1e-4, atol=1e-4)
        assert not torch.allclose(a, Runs(exact, xr, xc).logits["r"])  # a real patch
