"""Model loading: every way a model enters pathpatch goes through `load_model(spec)`.

A spec is one of
  (a) a bundled name (`bundled_models()`: `attn-only-2l`, `mlp-2l`), read from package data;
  (b) a TransformerLens pretrained name such as `gpt2` (TransformerLens 4's aliases resolve it to
      its Hugging Face repository; only where the weights are cached or the hub is reachable,
      otherwise a fast error, never a hang);
  (c) a directory holding a Hugging Face model (`config.json` plus weights) of a family
      `pathpatch/model/families.py` maps (`pathpatch models` lists them);
  (d) a checkpoint file (`.safetensors`, or `.pt`/`.pth` read with `weights_only=True`) next to
      a JSON config of the same stem (`model.safetensors` + `model.json`).

Nothing is ever unpickled. Every model is a `Transformer` (`transformer.py`) with unfolded norms
and uncentred weights: the weights are those stored, in the dtype asked for, so `model_digest`
identifies them.
"""

from __future__ import annotations

import hashlib
import importlib.resources
import json
import os
import socket
import urllib.parse
import weakref
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from torch.multiprocessing.reductions import StorageWeakRef

from pathpatch.errors import PathPatchError
from pathpatch.model.config import ModelConfig
from pathpatch.model.families import read_hf_config, read_hf_directory
from pathpatch.model.transformer import Transformer

CHECKPOINT_FORMAT = "pathpatch-checkpoint/1"

# Architectures of the bundled models (ModelConfig fields, TransformerLens's names). The training
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

_CHECKPOINT_SUFFIXES = (".safetensors", ".pt", ".pth")
_HUB_PROBE_TIMEOUT_S = 3.0


def bundled_models() -> list[str]:
    """Names of the models shipped as package data, loadable with `load_model(name)`."""
    return sorted(BUNDLED_ARCHS)


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


def _arch_from_json(config: Mapping[str, Any], src: str) -> dict[str, Any]:
    """The architecture part of a checkpoint JSON (ours, or a bare dict of ModelConfig fields, as
    TransformerLens 3's HookedTransformerConfig named them)."""
    if config.get("format") == CHECKPOINT_FORMAT:
        return dict(config["architecture"])
    if "format" in config:
        raise PathPatchError(
            f"{src}: unknown checkpoint format {config['format']!r}, expected {CHECKPOINT_FORMAT!r}"
        )
    return dict(config)


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


def _load_bundled(name: str, device: str | torch.device, dtype: torch.dtype) -> Transformer:
    config = bundled_config(name)
    res = importlib.resources.files("pathpatch") / "bundled" / f"{name}.safetensors"
    state_dict = safetensors.torch.load(res.read_bytes())
    digest = _check_digest(config, state_dict, f"bundled model {name!r}")
    model = build_model(_arch_from_json(config, name), device=device, dtype=dtype, init_weights=False)
    _load_checked(model, state_dict, f"bundled model {name!r}", digest)
    return model


def _load_checkpoint(path: Path, device: str | torch.device, dtype: torch.dtype) -> Transformer:
    json_path = path.with_suffix(".json")
    if not json_path.is_file():
        raise PathPatchError(
            f"checkpoint {path} has no config: expected {json_path} holding the "
            "ModelConfig fields (or a pathpatch checkpoint JSON)"
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
    digest = _check_digest(config, state_dict, str(path))
    arch = _arch_from_json(config, str(json_path))
    model = build_model(arch, device=device, dtype=dtype, init_weights=False)
    _load_checked(model, dict(state_dict), str(path), digest)
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


def _load_pretrained(name: str, device: str | torch.device, dtype: torch.dtype) -> Transformer:
    """A TransformerLens pretrained name: TransformerLens 4's alias table gives its Hugging Face
    repository, whose snapshot loads as a local directory (`families.py`), from the cache when
    the hub is off or unreachable, a fast error when it is in neither."""
    return load_hf_directory(_pretrained_folder(name, ["*.json", "*.safetensors"]), device, dtype)


def _pretrained_folder(name: str, patterns: list[str]) -> Path:
    """The local snapshot of TransformerLens name `name`'s repository, files `patterns`."""
    from huggingface_hub import constants, snapshot_download, try_to_load_from_cache

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
            folder = Path(snapshot_download(official, allow_patterns=patterns))
    except (OSError, ValueError) as err:  # missing files in a partial cache
        raise PathPatchError(
            f"could not load pretrained model {name!r} ({official}"
            f"{'' if online else ', from the cache only'}): {err}"
        ) from err
    return folder


def get_official_model_name(name: str) -> str:
    """The Hugging Face repository of a TransformerLens name or alias (TransformerLens 4's table;
    case-insensitive); a PathPatchError for a name it does not know."""
    from transformer_lens.supported_models import get_official_model_name as official

    try:
        return official(name)
    except ValueError as err:
        raise PathPatchError(str(err)) from None


def _is_pretrained_name(spec: str) -> bool:
    try:
        get_official_model_name(spec)
    except PathPatchError:
        return False
    return True


def load_model(
    spec: str, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> Transformer:
    """Load a model by bundled name, TransformerLens name, HF model directory or checkpoint.

    Bundled names win over TransformerLens aliases (TransformerLens also calls
    `NeelNanda/Attn_Only_2L512W_C4_Code` "attn-only-2l"; use that full name to get it).

    Args:
        spec: see the module docstring for the four accepted forms.
        device, dtype: where and in what precision the weights live.

    Returns:
        A `Transformer` in eval mode (norms unfolded, weights as stored, in `dtype`).
    """
    if spec in BUNDLED_ARCHS:
        return _load_bundled(spec, device, dtype)
    path = Path(spec).expanduser()
    if path.is_dir():
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


def load_architecture(spec: str, *, dtype: torch.dtype = torch.float32) -> Transformer:
    """The model `spec` names (the forms of `load_model`) with its architecture and no weights:
    parameters on torch's meta device, so that its graph, shapes and costs are known and
    nothing of the size of its weights is read or allocated. What plans a sweep needs (a
    dry-run plans Llama-3.1-8B's scan on a machine that cannot hold its weights); whatever runs
    the model loads it with `load_model`.

    A Hugging Face directory needs only its config.json, a checkpoint only its JSON config.
    """
    if spec in BUNDLED_ARCHS:
        arch: Mapping[str, Any] | ModelConfig = _arch_from_json(bundled_config(spec), spec)
    else:
        path = Path(spec).expanduser()
        if path.is_dir():
            arch = read_hf_config(path, dtype)
        elif path.suffix in _CHECKPOINT_SUFFIXES:
            json_path = path.with_suffix(".json")
            if not json_path.is_file():
                raise PathPatchError(f"checkpoint {path} has no config: expected {json_path} "
                                     "holding the ModelConfig fields (or a pathpatch checkpoint JSON)")
            try:
                arch = _arch_from_json(json.loads(json_path.read_text()), str(json_path))
            except json.JSONDecodeError as err:
                raise PathPatchError(f"{json_path} is not valid JSON: {err}") from err
            model = build_model(arch, device="meta", dtype=dtype, init_weights=False)
            if path.suffix == ".safetensors" and path.is_file():
                _check_safetensors_header(path, model)
            return model
        elif _is_pretrained_name(spec):
            arch = read_hf_config(_pretrained_folder(spec, ["*.json"]), dtype)
        else:
            return load_model(spec, device="meta", dtype=dtype)  # its error names the forms
    return build_model(arch, device="meta", dtype=dtype, init_weights=False)


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

    if spec in BUNDLED_ARCHS:
        res = importlib.resources.files("pathpatch") / "bundled" / f"{spec}.tokenizer.json"
        with importlib.resources.as_file(res) as path:
            return from_file(path)
    path = Path(spec).expanduser()
    if path.is_file() and path.suffix == ".json":
        return from_file(path)
    if path.is_dir():
        try:
            with _hub_offline():
                return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        except (OSError, ValueError) as err:
            raise PathPatchError(
                f"model directory {path} has no tokenizer that loads ({err}); save one there "
                "(`tokenizer.save_pretrained(dir)`) or give [dataset] tokenizer = ...") from None
    if path.suffix in _CHECKPOINT_SUFFIXES:
        beside = path.with_suffix(".tokenizer.json")
        if beside.is_file():
            return from_file(beside)
        raise PathPatchError(
            f"checkpoint {path} has no tokenizer: put a `tokenizers` JSON file at {beside} or "
            "give [dataset] tokenizer = \"path/to/tokenizer.json\" (or a tokenizer directory)")
    if _is_pretrained_name(spec):
        official = get_official_model_name(spec)
        try:
            with _hub_offline():
                return AutoTokenizer.from_pretrained(official, local_files_only=True)
        except (OSError, ValueError) as err:
            raise PathPatchError(
                f"the tokenizer of {spec!r} ({official}) is not in the local Hugging Face cache "
                f"({err}); download it where there is network (`huggingface-cli download "
                f"{official}`) and copy the cache, or give [dataset] tokenizer = ...") from None
    raise PathPatchError(
        f"no tokenizer for {spec!r}: give a bundled name, a Hugging Face directory, a "
        "TransformerLens name, or a tokenizer.json file")
