"""Model loading: every way a model enters pathpatch goes through `load_model(spec)`.

The spec's form (a bundled name, a TransformerLens pretrained name, a Hugging Face directory of a
family `families.py` maps, or a checkpoint file next to its JSON config) is decided once, in
`sources.locate`; see `sources.py` for the four forms. Pretrained names load only where the
weights are cached or the hub is reachable, otherwise a fast error, never a hang.

Nothing is ever unpickled. Every model is a `Transformer` (`transformer.py`) with unfolded norms
and uncentred weights: the weights are those stored, in the dtype asked for, so `model_digest`
identifies them.
"""

from __future__ import annotations

import hashlib
import importlib.resources
import json
import weakref
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from torch.multiprocessing.reductions import StorageWeakRef

from pathpatch.errors import PathPatchError
from pathpatch.model.config import ModelConfig
from pathpatch.model.families import read_hf_directory
from pathpatch.model.sources import (
    CHECKPOINT_FORMAT,
    ModelSource,
    SourceKind,
    arch_from_json,
    bundled_config,
    checkpoint_json,
    get_official_model_name,
    hub_offline,
    locate,
    pretrained_folder,
    read_config,
)
from pathpatch.model.transformer import Transformer


def build_model(
    arch: Mapping[str, Any] | ModelConfig,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    init_weights: bool = True,
    generator: torch.Generator | None = None,
) -> Transformer:
    """A fresh `Transformer` from ModelConfig fields (TransformerLens's names) or a ModelConfig.

    Weights are drawn from `generator`, or torch's global RNG (seed it first for reproducible
    training); pass init_weights=False when a state dict is loaded right after, to skip the work.
    """
    if isinstance(arch, ModelConfig):
        cfg = arch.replace(device=str(device), dtype=dtype)
    else:
        cfg = ModelConfig.from_dict(dict(arch), device=str(device), dtype=dtype)
    return Transformer(cfg, init=init_weights, generator=generator).eval()


def _load_weights(model: Transformer, state_dict: dict[str, torch.Tensor], src: str,
                  tied: frozenset[str] = frozenset()) -> None:
    """Load parameters strictly: every parameter present with its shape; buffers may be absent.

    Warning:
        Consumes `state_dict`: each tensor is dropped once copied, so a checkpoint's storage is
        freed as the model's fills and loading holds about one copy of the weights, not two."""
    params = dict(model.named_parameters())
    missing = sorted(set(params) - set(state_dict) - tied)  # tied: views of another parameter
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
    with torch.no_grad():  # a copy in the model's dtype, straight from the stored one
        for name in list(state_dict):
            tensor = state_dict.pop(name)
            if name in params:
                params[name].copy_(tensor)
            del tensor


def save_checkpoint(
    model: Transformer,
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

    Buffers are left out (the model keeps none that a checkpoint defines). Computed once per
    model and kept with it (`load_model` keeps the one it checked the file with), so the driver
    and a worker of the same process, or a worker's start after its load, never hash the
    weights twice. The kept digest is read again only while every parameter still lives in the
    storage it was computed on (a weak reference to it has not expired, so a round trip through
    another dtype, whose new storage may reuse the old address, is seen), with the same dtype,
    shape and device and an unchanged version counter (bumped by every in-place change:
    `copy_`, `load_state_dict`, an optimizer step); `model.to(dtype)`, a new state, training or
    any parameter replaced hashes the weights anew. Not seen: in-place writes through
    `param.data`, which has a version counter of its own.
    """
    stamp = _stamp(model)
    kept = _DIGESTS.get(model)
    if stamp is not None and kept is not None and kept[0] == stamp \
            and not any(storage.expired() for storage in kept[2]):
        return kept[1]
    digest = _digest(dict(model.named_parameters()))
    _keep_digest(model, digest, stamp)
    return digest


_DIGESTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
"""model -> (its parameters' stamp, its digest, weak references to their storages): a weak
table, so it never keeps a model alive (the entry refers to no tensor)."""


def _stamp(model: torch.nn.Module) -> tuple | None:
    """What identifies the parameters' current values without reading them; None where it
    cannot be read (parameters made under `torch.inference_mode` have no version counter)."""
    try:
        return tuple((name, p.data_ptr(), p._version, p.dtype, tuple(p.shape), str(p.device))
                     for name, p in model.named_parameters())
    except RuntimeError:
        return None


def _keep_digest(model: torch.nn.Module, digest: str, stamp: tuple | None = None) -> None:
    stamp = _stamp(model) if stamp is None else stamp
    if stamp is not None:
        storages = tuple(StorageWeakRef(p.untyped_storage()) for p in model.parameters())
        _DIGESTS[model] = (stamp, digest, storages)


def _digest(parameters: Mapping[str, torch.Tensor]) -> str:
    """`model_digest` of a model whose parameters are `parameters` (a saved state dict's)."""
    h = hashlib.sha256()
    for name, param in sorted(parameters.items(), key=lambda item: item[0]):
        t = param.detach().cpu().contiguous().reshape(-1)
        h.update(f"{name}|{t.dtype}|{tuple(param.shape)}\n".encode())
        h.update(t.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _check_digest(config: Mapping[str, Any], state_dict: Mapping[str, torch.Tensor],
                  src: str) -> str | None:
    """A checkpoint JSON's digest must be that of the weights beside it (same pair, unchanged).
    Returns that digest (None where the JSON has none)."""
    want = config.get("digest") if config.get("format") == CHECKPOINT_FORMAT else None
    if want is not None and _digest(state_dict) != want:
        raise PathPatchError(
            f"{src}: the weights do not match the digest in their JSON ({str(want)[:12]}...): "
            "the .json belongs to other weights or the weights file changed; save the "
            "checkpoint again (pathpatch.model.loading.save_checkpoint)")
    return want


def _load_checked(model: Transformer, state_dict: dict[str, torch.Tensor], src: str,
                  digest: str | None) -> None:
    """`_load_weights`, keeping the file's checked digest as the model's where the two are the
    same bytes (every parameter stored, nothing else, each in the model's dtype): the weights
    are then hashed once per load, not again by `model_digest`."""
    params = dict(model.named_parameters())
    same = digest is not None and set(state_dict) == set(params) and all(
        t.dtype == params[name].dtype for name, t in state_dict.items())
    _load_weights(model, state_dict, src)
    if same:
        _keep_digest(model, digest)


def _load_bundled(name: str, device: str | torch.device, dtype: torch.dtype) -> Transformer:
    config = bundled_config(name)
    res = importlib.resources.files("pathpatch") / "bundled" / f"{name}.safetensors"
    state_dict = safetensors.torch.load(res.read_bytes())
    digest = _check_digest(config, state_dict, f"bundled model {name!r}")
    model = build_model(arch_from_json(config, name), device=device, dtype=dtype, init_weights=False)
    _load_checked(model, state_dict, f"bundled model {name!r}", digest)
    return model


def _load_checkpoint(source: ModelSource, device: str | torch.device,
                     dtype: torch.dtype) -> Transformer:
    path = source.path
    if not path.is_file():
        raise PathPatchError(f"checkpoint file {path} does not exist")
    config = checkpoint_json(source)
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
    digest = _check_digest(config, state_dict, str(path))
    arch = arch_from_json(config, str(source.config_path))
    model = build_model(arch, device=device, dtype=dtype, init_weights=False)
    _load_checked(model, dict(state_dict), str(path), digest)
    return model


def load_hf_directory(path: Path, device: str | torch.device, dtype: torch.dtype) -> Transformer:
    """A `Transformer` with the weights of the Hugging Face model saved in directory `path`,
    converted from the checkpoint's dtype straight to `dtype` (`families.py`)."""
    cfg, state_dict = read_hf_directory(path, dtype)
    model = build_model(cfg, device=device, dtype=dtype, init_weights=False)
    W_U, W_E = state_dict["unembed.W_U"], state_dict["embed.W_E"]
    if W_U.data_ptr() == W_E.data_ptr() and W_U.shape == W_E.t().shape:  # the checkpoint ties them
        del state_dict["unembed.W_U"], W_U, W_E
        model.tie_unembedding()
        _load_weights(model, state_dict, str(path), tied=frozenset({"unembed.W_U"}))
    else:
        del W_U, W_E
        _load_weights(model, state_dict, str(path))
    return model


def load_model(
    spec: str, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> Transformer:
    """Load a model by bundled name, TransformerLens name, HF model directory or checkpoint.

    Args:
        spec: the four forms of `sources.py` (`sources.locate` decides which).
        device, dtype: where and in what precision the weights live.

    Returns:
        A `Transformer` in eval mode (norms unfolded, weights as stored, in `dtype`).
    """
    source = locate(spec)
    if source.kind is SourceKind.BUNDLED:
        return _load_bundled(spec, device, dtype)
    if source.kind is SourceKind.HF_DIRECTORY:
        return load_hf_directory(source.path, device, dtype)
    if source.kind is SourceKind.CHECKPOINT:
        return _load_checkpoint(source, device, dtype)
    # a TransformerLens name: its Hugging Face repository's snapshot loads as a local directory
    return load_hf_directory(pretrained_folder(spec, ["*.json", "*.safetensors"]), device, dtype)


def load_architecture(spec: str, *, dtype: torch.dtype = torch.float32) -> Transformer:
    """The model `spec` names (the forms of `load_model`) with its architecture and no weights:
    parameters on torch's meta device, so that its graph, shapes and costs are known and
    nothing of the size of its weights is read or allocated. What plans a sweep needs (a
    dry-run plans Llama-3.1-8B's scan on a machine that cannot hold its weights); whatever runs
    the model loads it with `load_model`. Where the config alone is enough (the graph, the
    costs), `sources.read_config` reads it without torch.

    A Hugging Face directory needs only its config.json, a checkpoint only its JSON config (a
    safetensors file beside it is checked by its header).
    """
    source = locate(spec)
    model = build_model(read_config(source), device="meta", dtype=dtype, init_weights=False)
    if source.kind is SourceKind.CHECKPOINT and source.path.suffix == ".safetensors" \
            and source.path.is_file():
        _check_safetensors_header(source.path, model)
    return model


def _check_safetensors_header(path: Path, model: Transformer) -> None:
    """A safetensors file checked by its header alone (no tensor read): whole (the header
    covers the file: a truncated copy fails), holding every parameter of `model` in its shape.
    Whether the values are the JSON's (its digest) is known only by reading them."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            shapes = {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}  # noqa: SIM118
    except Exception as err:  # safetensors' own error type: truncated, corrupt, not one
        raise PathPatchError(f"{path} is not a readable safetensors file ({err}): it may be "
                             "truncated or corrupt; save the checkpoint again") from None
    params = {name: tuple(p.shape) for name, p in model.named_parameters()}
    missing = sorted(set(params) - set(shapes))
    wrong = sorted(n for n in set(params) & set(shapes) if params[n] != shapes[n])
    if missing or wrong:
        raise PathPatchError(f"{path} does not fit its JSON config: missing {missing[:5]}, "
                             f"other shapes {wrong[:5]}; save the checkpoint again")


def load_tokenizer(spec: str):
    """The tokenizer of the model `spec` names (the forms of `load_model`), offline.

    - a bundled name: its word-level tokenizer shipped beside the weights
      (`pathpatch/bundled/<name>.tokenizer.json`: one word per token id, `t0` ... `t{V-1}`);
    - a Hugging Face directory: the directory's own tokenizer;
    - a TransformerLens name: its repository's tokenizer from the local Hugging Face cache;
    - a checkpoint `x.safetensors`: `x.tokenizer.json` beside it (a `tokenizers` file), if any;
    - a `tokenizer.json` file, or a directory holding only a tokenizer.

    Returns:
        A transformers `PreTrainedTokenizerBase` (`tok(text, add_special_tokens=...)`).

    Raises:
        PathPatchError: the model has no tokenizer to be found offline, with the fix.
    """
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    def from_file(path: Path):
        try:
            return PreTrainedTokenizerFast(tokenizer_file=str(path))
        except Exception as err:  # tokenizers' own error type for a malformed file
            raise PathPatchError(f"tokenizer file {path} cannot be read ({err})") from None

    path = Path(spec).expanduser()
    if path.is_file() and path.suffix == ".json":
        return from_file(path)
    try:
        source = locate(spec)
    except PathPatchError:
        raise PathPatchError(
            f"no tokenizer for {spec!r}: give a bundled name, a Hugging Face directory, a "
            "TransformerLens name, a checkpoint, or a tokenizer.json file") from None
    if source.kind is SourceKind.BUNDLED:
        res = importlib.resources.files("pathpatch") / "bundled" / f"{spec}.tokenizer.json"
        with importlib.resources.as_file(res) as path:
            return from_file(path)
    if source.kind is SourceKind.HF_DIRECTORY:
        try:
            with hub_offline():
                return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        except (OSError, ValueError) as err:
            raise PathPatchError(
                f"model directory {path} has no tokenizer that loads ({err}); save one there "
                "(`tokenizer.save_pretrained(dir)`) or give [dataset] tokenizer = ...") from None
    if source.kind is SourceKind.CHECKPOINT:
        beside = path.with_suffix(".tokenizer.json")
        if beside.is_file():
            return from_file(beside)
        raise PathPatchError(
            f"checkpoint {path} has no tokenizer: put a `tokenizers` JSON file at {beside} or "
            "give [dataset] tokenizer = \"path/to/tokenizer.json\" (or a tokenizer directory)")
    official = get_official_model_name(spec)
    try:
        with hub_offline():
            return AutoTokenizer.from_pretrained(official, local_files_only=True)
    except (OSError, ValueError) as err:
        raise PathPatchError(
            f"the tokenizer of {spec!r} ({official}) is not in the local Hugging Face cache "
            f"({err}); download it where there is network (`huggingface-cli download "
            f"{official}`) and copy the cache, or give [dataset] tokenizer = ...") from None
