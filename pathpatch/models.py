"""Model loading: every way a model enters pathpatch goes through `load_model(spec)`.

A spec is one of
  (a) a bundled name (`bundled_models()`: `attn-only-2l`, `mlp-2l`), read from package data;
  (b) a TransformerLens pretrained name such as `gpt2` (only where the weights are cached or the
      Hugging Face hub is reachable; otherwise a fast error, never a hang);
  (c) a directory holding a Hugging Face model (`config.json` plus weights) of a family
      `pathpatch/hf.py` maps: GPT-2, Llama, Mistral, Qwen2, Qwen3, GPT-NeoX (Pythia);
  (d) a checkpoint file (`.safetensors`, or `.pt`/`.pth` read with `weights_only=True`) next to
      a JSON config of the same stem (`model.safetensors` + `model.json`).

Nothing is ever unpickled. All models are `HookedTransformer`s with unfolded LayerNorm and
uncentred weights: the weights are exactly those stored, so `model_digest` identifies them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.resources
import json
import os
import socket
import urllib.parse
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from transformer_lens import HookedTransformer, HookedTransformerConfig

from pathpatch.errors import PathPatchError

CHECKPOINT_FORMAT = "pathpatch-checkpoint/1"

# Architectures of the bundled models (HookedTransformerConfig keyword arguments). The training
# scripts in jobs/ build from these, and each shipped JSON repeats the one it was trained with.
INDUCTION_ARCH: dict[str, Any] = {
    "n_layers": 2,
    "d_model": 64,
    "n_heads": 4,
    "d_head": 16,
    "n_ctx": 64,
    "d_vocab": 128,
    "attn_only": True,
    "normalization_type": "LN",
    "positional_embedding_type": "standard",
    "act_fn": None,
}
MLP_ARCH: dict[str, Any] = {
    "n_layers": 2,
    "d_model": 64,
    "n_heads": 4,
    "d_head": 16,
    "d_mlp": 256,
    "n_ctx": 16,
    "d_vocab": 64,
    "attn_only": False,
    "normalization_type": "LN",
    "positional_embedding_type": "standard",
    "act_fn": "gelu",
}
BUNDLED_ARCHS: dict[str, dict[str, Any]] = {"attn-only-2l": INDUCTION_ARCH, "mlp-2l": MLP_ARCH}

_CONFIG_FIELDS = frozenset(f.name for f in dataclasses.fields(HookedTransformerConfig))
# Set by load_model's arguments, or (seed) a side effect we refuse: HookedTransformerConfig
# reseeds torch/numpy/random globally when given a seed.
_IGNORED_FIELDS = frozenset({"device", "dtype", "seed", "init_weights"})
_CHECKPOINT_SUFFIXES = (".safetensors", ".pt", ".pth")
_HUB_PROBE_TIMEOUT_S = 3.0


def bundled_models() -> list[str]:
    """Names of the models shipped as package data, loadable with `load_model(name)`."""
    return sorted(BUNDLED_ARCHS)


def build_model(
    arch: Mapping[str, Any],
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    init_weights: bool = True,
) -> HookedTransformer:
    """A fresh HookedTransformer from HookedTransformerConfig keyword arguments.

    Weights are initialised from torch's global RNG (seed it first for reproducible training);
    pass init_weights=False when a state dict is loaded right after, to skip the work.
    """
    unknown = sorted(set(arch) - _CONFIG_FIELDS)
    if unknown:
        raise PathPatchError(
            f"unknown model config field(s) {', '.join(unknown)}: expected HookedTransformerConfig "
            "fields such as n_layers, d_model, n_heads, d_head, d_mlp, n_ctx, d_vocab, attn_only"
        )
    kwargs = {k: v for k, v in arch.items() if k not in _IGNORED_FIELDS}
    try:
        cfg = HookedTransformerConfig(**kwargs, device=str(device), dtype=dtype, init_weights=init_weights)
    except (TypeError, ValueError, AssertionError) as err:
        raise PathPatchError(f"invalid model config {kwargs}: {err}") from err
    model = HookedTransformer(cfg, move_to_device=True)
    model.eval()
    return model


def _load_weights(model: HookedTransformer, state_dict: Mapping[str, torch.Tensor], src: str) -> None:
    """Load parameters strictly: every parameter present with its shape; buffers may be absent."""
    params = dict(model.named_parameters())
    missing = sorted(set(params) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(model.state_dict()))
    if missing or unexpected:
        raise PathPatchError(
            f"weights in {src} do not match the config: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}; check that the JSON config belongs to these weights"
        )
    for name, tensor in state_dict.items():
        if name in params and tuple(tensor.shape) != tuple(params[name].shape):
            raise PathPatchError(
                f"weights in {src}: {name} has shape {tuple(tensor.shape)}, the config expects "
                f"{tuple(params[name].shape)}; check that the JSON config belongs to these weights"
            )
    dtype = model.cfg.dtype
    with torch.no_grad():
        for name, tensor in state_dict.items():
            if name in params:
                params[name].copy_(tensor.to(dtype))


def _arch_from_json(config: Mapping[str, Any], src: str) -> dict[str, Any]:
    """The architecture part of a checkpoint JSON (ours, or a bare HookedTransformerConfig dict)."""
    if config.get("format") == CHECKPOINT_FORMAT:
        return dict(config["architecture"])
    if "format" in config:
        raise PathPatchError(
            f"{src}: unknown checkpoint format {config['format']!r}, expected {CHECKPOINT_FORMAT!r}"
        )
    return dict(config)


def save_checkpoint(
    model: HookedTransformer,
    arch: Mapping[str, Any],
    path: str | Path,
    metadata: Mapping[str, Any] | None = None,
) -> tuple[Path, Path]:
    """Write `path` (.safetensors weights) and its `.json` config (architecture + metadata).

    Returns:
        The two paths written; `load_model(str(path))` reads them back.
    """
    path = Path(path)
    if path.suffix != ".safetensors":
        raise PathPatchError(f"checkpoint path must end in .safetensors, got {path}")
    weights = {k: v.detach().cpu().contiguous() for k, v in model.named_parameters()}
    # Written as bytes: safetensors' save_file creates 0600 files, and package data must be readable.
    path.write_bytes(safetensors.torch.save(weights))
    config = {
        "format": CHECKPOINT_FORMAT,
        "architecture": dict(arch),
        "digest": model_digest(model),
        **({"training": dict(metadata)} if metadata else {}),
    }
    json_path = path.with_suffix(".json")
    json_path.write_text(json.dumps(config, indent=2, sort_keys=False) + "\n")
    return path, json_path


def model_digest(model: torch.nn.Module) -> str:
    """sha256 over the parameters (name, dtype, shape, bytes) in sorted-name order.

    Buffers are left out: TransformerLens fills its causal-mask buffer lazily, so they change
    with use while the model does not.
    """
    return _digest(dict(model.named_parameters()))


def _digest(parameters: Mapping[str, torch.Tensor]) -> str:
    """`model_digest` of a model whose parameters are `parameters` (a saved state dict's)."""
    h = hashlib.sha256()
    for name, param in sorted(parameters.items(), key=lambda item: item[0]):
        t = param.detach().cpu().contiguous().reshape(-1)
        h.update(f"{name}|{t.dtype}|{tuple(param.shape)}\n".encode())
        h.update(t.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _check_digest(config: Mapping[str, Any], state_dict: Mapping[str, torch.Tensor], src: str) -> None:
    """A checkpoint JSON's digest must be that of the weights beside it (same pair, unchanged)."""
    want = config.get("digest") if config.get("format") == CHECKPOINT_FORMAT else None
    if want is not None and _digest(state_dict) != want:
        raise PathPatchError(
            f"{src}: the weights do not match the digest in their JSON ({str(want)[:12]}...): "
            "the .json belongs to other weights or the weights file changed; save the "
            "checkpoint again (pathpatch.models.save_checkpoint)")


def bundled_config(name: str) -> dict[str, Any]:
    """The shipped JSON of a bundled model (architecture, digest, training metadata)."""
    if name not in BUNDLED_ARCHS:
        raise PathPatchError(f"unknown bundled model {name!r}: bundled are {bundled_models()}")
    res = importlib.resources.files("pathpatch") / "bundled" / f"{name}.json"
    if not res.is_file():
        raise PathPatchError(
            f"bundled model {name!r} has no weights in this install ({name}.json missing); "
            f"train it with `python jobs/train.py {name}`"
        )
    return json.loads(res.read_text())


def _load_bundled(name: str, device: str | torch.device, dtype: torch.dtype) -> HookedTransformer:
    config = bundled_config(name)
    res = importlib.resources.files("pathpatch") / "bundled" / f"{name}.safetensors"
    state_dict = safetensors.torch.load(res.read_bytes())
    _check_digest(config, state_dict, f"bundled model {name!r}")
    model = build_model(_arch_from_json(config, name), device=device, dtype=dtype, init_weights=False)
    _load_weights(model, state_dict, f"bundled model {name!r}")
    return model


def _load_checkpoint(path: Path, device: str | torch.device, dtype: torch.dtype) -> HookedTransformer:
    json_path = path.with_suffix(".json")
    if not json_path.is_file():
        raise PathPatchError(
            f"checkpoint {path} has no config: expected {json_path} holding the "
            "HookedTransformerConfig fields (or a pathpatch checkpoint JSON)"
        )
    try:
        config = json.loads(json_path.read_text())
    except json.JSONDecodeError as err:
        raise PathPatchError(f"{json_path} is not valid JSON: {err}") from err
    if path.suffix == ".safetensors":
        try:
            state_dict = safetensors.torch.load_file(str(path))
        except Exception as err:  # safetensors' own error type: truncated, corrupt, not one
            raise PathPatchError(
                f"{path} is not a readable safetensors file ({err}): it may be truncated or "
                "corrupt; save the checkpoint again") from None
    else:
        try:
            state_dict = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # pickled objects beyond tensors are refused here
            raise PathPatchError(
                f"{path} could not be read with torch.load(weights_only=True): {err}; "
                "save a plain state dict (or use safetensors)"
            ) from err
        if not isinstance(state_dict, Mapping):
            raise PathPatchError(f"{path} holds a {type(state_dict).__name__}, not a state dict")
    _check_digest(config, state_dict, str(path))
    arch = _arch_from_json(config, str(json_path))
    model = build_model(arch, device=device, dtype=dtype, init_weights=False)
    _load_weights(model, state_dict, str(path))
    return model


def _hub_reachable() -> bool:
    """A TCP connect to the hub (or the proxy in front of it), bounded by a short timeout."""
    from huggingface_hub import constants

    proxy = os.environ.get("HTTPS_PROXY") or os.environ.get("https_proxy")
    url = urllib.parse.urlparse(proxy or constants.ENDPOINT)
    host, port = url.hostname, url.port or (443 if url.scheme == "https" else 80)
    if host is None:
        return False
    try:
        with socket.create_connection((host, port), timeout=_HUB_PROBE_TIMEOUT_S):
            return True
    except OSError:
        return False


@contextmanager
def _hub_offline() -> Iterator[None]:
    """Run Hugging Face loading from the local cache only.

    Warning:
        Sets huggingface_hub's process-wide offline flag for the duration (transformers and
        the hub read it at call time), restored in `finally`. Without it an unreachable hub
        costs ~23 s of retries per file before the cache is used.
    """
    from huggingface_hub import constants

    saved = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = saved


def _load_pretrained(name: str, device: str | torch.device, dtype: torch.dtype) -> HookedTransformer:
    """A TransformerLens pretrained model: from the cache when the hub is off or unreachable,
    a fast error when it is in neither. Families `pathpatch/hf.py` maps load through it.

    Loaded without processing (LayerNorm unfolded, weights uncentred), like every other path.
    """
    from huggingface_hub import constants, try_to_load_from_cache
    from transformer_lens.loading_from_pretrained import get_official_model_name

    official = get_official_model_name(name)
    cache = constants.HF_HUB_CACHE
    cached = isinstance(try_to_load_from_cache(official, "config.json", cache_dir=cache), str)
    online = not constants.is_offline_mode() and _hub_reachable()
    if not cached and not online:
        why = (
            "the hub is off (HF_HUB_OFFLINE)" if constants.is_offline_mode() else "the hub cannot be reached"
        )
        raise PathPatchError(
            f"pretrained model {name!r} ({official}) is not in the Hugging Face cache ({cache}) and "
            f"{why}: download it where there is network (`huggingface-cli download {official}`) "
            f"and copy the cache, or pass a local model directory; bundled models are {bundled_models()}"
        )
    try:
        with nullcontext() if online else _hub_offline():
            folder = _snapshot_of_mapped_family(official)
            if folder is not None:  # our own field-by-field mapping (pathpatch/hf.py)
                from pathpatch.hf import load_hf_directory

                return load_hf_directory(folder, device, dtype)
            model = HookedTransformer.from_pretrained_no_processing(official, device=str(device), dtype=dtype)
    except (OSError, ValueError, KeyError, AttributeError) as err:  # missing files, odd configs
        raise PathPatchError(
            f"could not load pretrained model {name!r} ({official}"
            f"{'' if online else ', from the cache only'}): {err}"
        ) from err
    model.eval()
    return model


def _snapshot_of_mapped_family(official: str) -> Path | None:
    """The local snapshot of a pretrained model whose family `pathpatch/hf.py` maps (Llama,
    Mistral, Qwen, Pythia, Gemma-2: TransformerLens's own mapping drops options they use), else
    None."""
    from huggingface_hub import hf_hub_download, snapshot_download

    from pathpatch.hf import FAMILIES

    config = json.loads(Path(hf_hub_download(official, "config.json")).read_text())
    if config.get("model_type") not in FAMILIES or config.get("model_type") == "gpt2":
        return None  # GPT-2 and the rest: TransformerLens's loader, as before
    return Path(snapshot_download(official, allow_patterns=["*.json", "*.safetensors"]))


def _is_pretrained_name(spec: str) -> bool:
    from transformer_lens.loading_from_pretrained import get_official_model_name

    try:
        get_official_model_name(spec)
    except ValueError:
        return False
    return True


def load_model(
    spec: str, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> HookedTransformer:
    """Load a model by bundled name, TransformerLens name, HF model directory or checkpoint.

    Bundled names win over TransformerLens aliases (TransformerLens also calls
    `NeelNanda/Attn_Only_2L512W_C4_Code` "attn-only-2l"; use that full name to get it).

    Args:
        spec: see the module docstring for the four accepted forms.
        device, dtype: where and in what precision the weights live.

    Returns:
        A HookedTransformer in eval mode (LayerNorm unfolded, weights as stored).
    """
    if spec in BUNDLED_ARCHS:
        return _load_bundled(spec, device, dtype)
    path = Path(spec).expanduser()
    if path.is_dir():
        from pathpatch.hf import load_hf_directory

        return load_hf_directory(path, device, dtype)
    if path.suffix in _CHECKPOINT_SUFFIXES:
        if not path.is_file():
            raise PathPatchError(f"checkpoint file {path} does not exist")
        return _load_checkpoint(path, device, dtype)
    if _is_pretrained_name(spec):
        return _load_pretrained(spec, device, dtype)
    raise PathPatchError(
        f"unknown model {spec!r}: give a bundled name ({', '.join(bundled_models())}), a "
        "TransformerLens pretrained name (e.g. gpt2), a Hugging Face model directory, or a "
        "checkpoint file (.safetensors/.pt next to a .json config of the same stem)"
    )
