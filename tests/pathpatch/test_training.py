"""The training script: same seed, same weights; and what it writes loads back."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from pathpatch.model.loading import load_model, model_digest

ROOT = Path(__file__).resolve().parents[2]

TINY_INDUCTION = {
    "n_layers": 2,
    "d_model": 16,
    "n_heads": 2,
    "d_head": 8,
    "n_ctx": 16,
    "d_vocab": 32,
    "attn_only": True,
    "normalization_type": "LN",
    "positional_embedding_type": "standard",
}
TINY_MLP = {**TINY_INDUCTION, "attn_only": False, "d_mlp": 32, "act_fn": "gelu", "n_ctx": 8}


@pytest.fixture(scope="module")
def train():
    """jobs/train.py as a module (jobs/ is scripts, not a package)."""
    spec = importlib.util.spec_from_file_location("pathpatch_jobs_train", ROOT / "jobs" / "train.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


def _induction(train, seed: int):
    cfg = train.TrainConfig(seed=seed, steps=3, batch=4, log_every=2, task={"min_len": 2, "max_len": 4})
    return train.train_induction(cfg, TINY_INDUCTION, log=lambda _: None)


def test_induction_training_is_reproducible(train) -> None:
    a, meta_a = _induction(train, seed=5)
    b, meta_b = _induction(train, seed=5)
    c, _ = _induction(train, seed=6)
    assert model_digest(a) == model_digest(b)
    assert model_digest(a) != model_digest(c)
    assert meta_a["seed"] == 5 and meta_a["steps"] == 3
    assert meta_a["final_train_loss"] == meta_b["final_train_loss"]
    assert "train_layouts_repeat_loss" in meta_a  # the held-out set needs longer sequences


def test_modular_sum_training_is_reproducible(train) -> None:
    cfg = train.TrainConfig(seed=1, steps=3, batch=8, task={"seq_len": 4, "modulus": 7})
    a, meta = train.train_modular_sum(cfg, TINY_MLP, log=lambda _: None)
    b, _ = train.train_modular_sum(cfg, TINY_MLP, log=lambda _: None)
    assert model_digest(a) == model_digest(b)
    assert {"eval_loss", "eval_accuracy", "final_train_acc"} <= meta.keys()


def test_saved_run_loads_back(train, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setitem(
        train.TRAINERS,
        "attn-only-2l",
        (train.train_induction, TINY_INDUCTION, train.TrainConfig(steps=2, batch=4, task={"max_len": 4})),
    )
    assert train.main(["attn-only-2l", "--seed", "3", "--out", str(tmp_path)]) == 0
    config = json.loads((tmp_path / "attn-only-2l.json").read_text())
    assert config["training"]["seed"] == 3 and config["training"]["steps"] == 2
    model = load_model(str(tmp_path / "attn-only-2l.safetensors"))
    assert model_digest(model) == config["digest"]
