"""Model loading through every accepted spec, digests, and the bundled models' evidence."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from pathpatch.errors import PathPatchError
from pathpatch.model import loading as models
from pathpatch.model import sources
from pathpatch.model.loading import load_model, model_digest
from pathpatch.model.sources import bundled_models
from pathpatch.model.transformer import Transformer
from pathpatch.tools import evidence

ROOT = Path(__file__).resolve().parents[2]
TINY_ARCH = {
    "n_layers": 2,
    "d_model": 16,
    "n_heads": 2,
    "d_head": 8,
    "d_mlp": 32,
    "n_ctx": 8,
    "d_vocab": 20,
    "act_fn": "gelu",
    "normalization_type": "LN",
}


def _tiny(seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    return models.build_model(TINY_ARCH)


def _tiny_gpt2(seed: int = 0, **overrides):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=50, n_positions=16, **overrides)
    return GPT2LMHeadModel(config).eval()


@pytest.mark.parametrize("name", ["attn-only-2l", "mlp-2l"])
def test_bundled_models_load_and_match_their_digest(name: str) -> None:
    assert name in bundled_models()
    model = load_model(name)
    config = sources.bundled_config(name)
    assert isinstance(model, Transformer) and not model.training
    assert model_digest(model) == config["digest"]
    for key, value in config["architecture"].items():
        assert getattr(model.cfg, key) == value
    assert model.cfg.normalization_type == "LN"  # LayerNorm kept unfolded
    training = config["training"]
    assert {"seed", "steps", "wall_seconds", "task"} <= training.keys()
    assert any(k.startswith("final_train_") for k in training)


def test_bundled_files_are_package_data() -> None:
    import importlib.resources

    bundled = importlib.resources.files("pathpatch") / "bundled"
    for name in bundled_models():
        assert (bundled / f"{name}.safetensors").is_file() and (bundled / f"{name}.json").is_file()
        assert (bundled / f"{name}.safetensors").stat().st_size < 5_000_000  # a few MB at most
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert 'pathpatch = ["bundled/*"]' in pyproject  # shipped in wheels, not just the checkout


def test_dtype_and_digest() -> None:
    m32 = load_model("attn-only-2l")
    m64 = load_model("attn-only-2l", dtype=torch.float64)
    assert all(p.dtype == torch.float64 for p in m64.parameters())
    assert model_digest(m32) == model_digest(load_model("attn-only-2l"))
    assert model_digest(m64) != model_digest(m32)  # dtype-aware
    tokens = torch.randint(0, 128, (2, 64))
    with torch.no_grad():
        assert torch.allclose(m32(tokens).double(), m64(tokens), atol=1e-4)
        m32.blocks[0].attn.W_Q[0, 0, 0] += 1e-3
    assert model_digest(m32) != model_digest(m64.float())


def test_digest_ignores_lazily_filled_buffers() -> None:
    model = _tiny()
    before = model_digest(model)
    with torch.no_grad():
        model(torch.zeros(1, 8, dtype=torch.long))  # fills the causal-mask buffer
    assert model_digest(model) == before


def test_safetensors_checkpoint_round_trip(tmp_path: Path) -> None:
    model = _tiny()
    weights, config = models.save_checkpoint(model, TINY_ARCH, tmp_path / "tiny.safetensors", {"seed": 0})
    assert json.loads(config.read_text())["training"] == {"seed": 0}
    loaded = load_model(str(weights))
    assert model_digest(loaded) == model_digest(model)
    tokens = torch.randint(0, 20, (3, 8))
    with torch.no_grad():
        assert torch.equal(loaded(tokens), model(tokens))


def test_torch_checkpoint_with_bare_config(tmp_path: Path) -> None:
    model = _tiny(1)
    torch.save(dict(model.named_parameters()), tmp_path / "m.pt")
    (tmp_path / "m.json").write_text(json.dumps(TINY_ARCH))  # a bare dict of config fields
    assert model_digest(load_model(str(tmp_path / "m.pt"))) == model_digest(model)


def test_pickled_objects_are_refused(tmp_path: Path) -> None:
    torch.save({"weights": object()}, tmp_path / "evil.pt")
    (tmp_path / "evil.json").write_text(json.dumps(TINY_ARCH))
    with pytest.raises(PathPatchError, match="weights_only=True"):
        load_model(str(tmp_path / "evil.pt"))


def test_checkpoint_errors(tmp_path: Path) -> None:
    weights, config = models.save_checkpoint(_tiny(), TINY_ARCH, tmp_path / "a.safetensors")
    config.unlink()
    with pytest.raises(PathPatchError, match="no config"):
        load_model(str(weights))
    config.write_text(json.dumps({**TINY_ARCH, "d_model": 32, "d_head": 16}))
    with pytest.raises(PathPatchError, match="shape"):
        load_model(str(weights))
    config.write_text(json.dumps({**TINY_ARCH, "n_layer": 2}))
    with pytest.raises(PathPatchError, match="unknown model config field.*n_layer"):
        load_model(str(weights))
    with pytest.raises(PathPatchError, match="does not exist"):
        load_model(str(tmp_path / "missing.safetensors"))


def test_hf_gpt2_directory_matches_transformers(tmp_path: Path) -> None:
    hf = _tiny_gpt2()
    hf.save_pretrained(tmp_path)
    model = load_model(str(tmp_path))
    assert model.cfg.act_fn == "gelu_new" and model.cfg.n_ctx == 16
    tokens = torch.randint(0, 50, (3, 16))
    with torch.no_grad():
        diff = (model(tokens) - hf(tokens).logits).abs().max().item()
    assert diff < 1e-4


def test_hf_gpt2_directory_with_inner_dim_and_layer_scaling(tmp_path: Path) -> None:
    hf = _tiny_gpt2(1, n_inner=48, activation_function="gelu", scale_attn_by_inverse_layer_idx=True)
    hf.save_pretrained(tmp_path)
    model = load_model(str(tmp_path))
    assert model.cfg.d_mlp == 48
    tokens = torch.randint(0, 50, (2, 16))
    with torch.no_grad():
        assert (model(tokens) - hf(tokens).logits).abs().max().item() < 1e-4


def test_unsupported_or_incomplete_directories_are_refused(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(PathPatchError, match="BertLMHeadModel is not supported: an encoder.*"
                                             "gemma2, gemma3_text, gpt2, gpt_neox, llama"):
        load_model(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(PathPatchError, match="the weights could not be loaded"):
        load_model(str(tmp_path))
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(PathPatchError, match="config.json is not valid JSON"):
        load_model(str(tmp_path))
    with pytest.raises(PathPatchError, match="without config.json"):
        load_model(str(tmp_path / ".."))


def test_unknown_spec_names_what_is_accepted() -> None:
    with pytest.raises(PathPatchError, match="attn-only-2l, mlp-2l.*gpt2.*directory.*safetensors"):
        load_model("no-such-model")


def test_pretrained_unreachable_fails_fast(monkeypatch, tmp_path: Path) -> None:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))  # an empty cache
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(sources, "_hub_reachable", lambda: False)  # never touch the network

    def never(*args, **kwargs):  # failing fast: refused before any loader or download starts
        raise AssertionError("a loader was started for a model that is not cached")

    monkeypatch.setattr(models, "load_hf_directory", never)
    with pytest.raises(PathPatchError, match="not in the Hugging Face cache.*cannot be reached"):
        load_model("gpt2")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(PathPatchError, match="hub is off"):
        load_model("gpt2-small")  # an alias


_CACHED_GPT2 = textwrap.dedent(
    """
    import json, sys, torch
    from pathlib import Path
    from transformers import GPT2Config, GPT2LMHeadModel
    root = Path(sys.argv[1])
    snap = root / "models--gpt2" / "snapshots" / ("0" * 40)
    snap.mkdir(parents=True)
    (root / "models--gpt2" / "refs").mkdir()
    (root / "models--gpt2" / "refs" / "main").write_text("0" * 40)
    torch.manual_seed(0)
    # The hub's gpt2 config carries n_ctx, which TransformerLens reads.
    cfg = GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=50, n_positions=16, n_ctx=16,
                     bos_token_id=0, eos_token_id=0)
    hf = GPT2LMHeadModel(cfg).eval()
    hf.save_pretrained(snap)
    (snap / "vocab.json").write_text(json.dumps({f"t{i}": i for i in range(50)}))
    (snap / "merges.txt").write_text("#version: 0.2\\n")
    from pathpatch.model.loading import load_model
    model = load_model("gpt2")
    tokens = torch.randint(0, 50, (2, 16))
    with torch.no_grad():
        print((model(tokens) - hf(tokens).logits).abs().max().item())
    """
)


def test_pretrained_name_loads_from_cache_without_network(tmp_path: Path) -> None:
    # A subprocess, because huggingface_hub reads HF_HUB_CACHE/HF_HUB_OFFLINE at import.
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path), "HF_HUB_OFFLINE": "1"}
    out = subprocess.run(
        [sys.executable, "-c", _CACHED_GPT2, str(tmp_path)],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert float(out.stdout.strip().splitlines()[-1]) < 1e-4


def test_induction_evidence_on_the_bundled_model() -> None:
    ev = evidence.induction_evidence(load_model("attn-only-2l"), n=128)
    trained, held = ev.losses
    assert trained.repeat < 0.25 * trained.fresh and held.repeat < 0.25 * held.fresh
    assert held.layouts == "held-out" and held.repeat_accuracy > 0.8  # content, not position
    names = {s.head for s in ev.heads}
    assert ev.prev_token_heads and set(ev.prev_token_heads) <= names
    assert ev.induction_heads and set(ev.induction_heads) <= names
    assert all(h.startswith("a0.") for h in ev.prev_token_heads)
    assert all(h.startswith("a1.") for h in ev.induction_heads)
    # The induction heads need the previous-token head: without it repeats are as hard as fresh.
    assert ev.repeat_loss_without_prev_token_heads > 0.8 * trained.fresh


def test_mlps_matter_in_mlp_2l() -> None:
    ev = evidence.modular_sum_evidence(load_model("mlp-2l"), n=512)
    assert ev.accuracy > 0.95
    assert dict(ev.accuracy_mlps_zeroed)["all"] < 0.3


def test_evidence_cli(capsys) -> None:
    from pipeline.cli import main

    assert main(["evidence"]) == 0
    out = capsys.readouterr().out
    assert "previous-token head(s)" in out and "induction head(s)" in out and "held-out" in out


@pytest.mark.slow
def test_bundled_models_load_from_a_built_wheel(tmp_path: Path) -> None:
    """A non-editable install: build the wheel from a copy of the sources and import from the zip."""
    import shutil
    import zipfile

    src = tmp_path / "src"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("pathpatch", "pipeline"):
        shutil.copytree(ROOT / name, src / name, ignore=ignore)
    for name in ("pyproject.toml", "README.md"):
        if (ROOT / name).exists():
            shutil.copy(ROOT / name, src / name)
    (src / "README.md").touch()
    build = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(tmp_path),
            str(src),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert build.returncode == 0, build.stderr[-2000:]
    (wheel,) = tmp_path.glob("pathpatch-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    for model in bundled_models():
        assert (
            f"pathpatch/bundled/{model}.safetensors" in names and f"pathpatch/bundled/{model}.json" in names
        )
    check = (
        "import pathpatch, sys\n"
        "from pathpatch.model.loading import load_model, model_digest\n"
        "from pathpatch.model.sources import bundled_config\n"
        "assert pathpatch.__file__.startswith(sys.argv[1]), pathpatch.__file__\n"
        "m = load_model('attn-only-2l'); assert model_digest(m) == bundled_config('attn-only-2l')['digest']"
    )
    run = subprocess.run(
        [sys.executable, "-c", check, str(wheel)],
        env={**os.environ, "PYTHONPATH": str(wheel)},
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr[-2000:]
