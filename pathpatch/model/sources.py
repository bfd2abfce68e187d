"""Where a model comes from: a spec's form decided once (`locate`), and its config read without
torch or weights where the form allows (`read_config`).

A spec is one of
  (a) a bundled name (`bundled_models()`: `attn-only-2l`, `mlp-2l`), read from package data;
  (b) a directory holding a Hugging Face model (`config.json` plus weights);
  (c) a checkpoint file (`.safetensors`, or `.pt`/`.pth`) next to a JSON config of the same stem
      (`model.safetensors` + `model.json`);
  (d) a TransformerLens pretrained name such as `gpt2` (TransformerLens 4's aliases resolve it to
      its Hugging Face repository, read from the local cache or the hub when it is reachable).

`loading.py` builds models and reads weights from a `ModelSource`. Bundled models and
checkpoints give their config from JSON alone, so `pathpatch graph`, `explain` and `circuit`
answer without importing torch; a Hugging Face directory's config goes through transformers'
own config classes (their defaults fill what config.json leaves out), which import torch.
"""

from __future__ import annotations

import enum
import importlib.resources
import json
import os
import socket
import urllib.parse
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pathpatch.errors import PathPatchError
from pathpatch.model.config import ModelConfig

CHECKPOINT_FORMAT = "pathpatch-checkpoint/1"
CHECKPOINT_SUFFIXES = (".safetensors", ".pt", ".pth")
_HUB_PROBE_TIMEOUT_S = 3.0

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


class SourceKind(enum.Enum):
    BUNDLED = "bundled model"
    HF_DIRECTORY = "Hugging Face directory"
    CHECKPOINT = "checkpoint"
    PRETRAINED = "TransformerLens pretrained name"


@dataclass(frozen=True)
class ModelSource:
    """A model spec with its form decided: what every loader dispatches on."""

    spec: str
    kind: SourceKind
    path: Path | None = None
    """The directory (HF_DIRECTORY) or weights file (CHECKPOINT; it may be absent when only the
    architecture is read); None for bundled and pretrained names."""

    @property
    def config_path(self) -> Path:
        """A checkpoint's JSON config: the weights file's path with suffix `.json`."""
        assert self.path is not None
        return self.path.with_suffix(".json")


def bundled_models() -> list[str]:
    """Names of the models shipped as package data, loadable with `load_model(name)`."""
    return sorted(BUNDLED_ARCHS)


def locate(spec: str) -> ModelSource:
    """The form of model spec `spec` (the module docstring's four), or a PathPatchError naming
    them. Bundled names win over TransformerLens aliases (TransformerLens also calls
    `NeelNanda/Attn_Only_2L512W_C4_Code` "attn-only-2l"; use that full name to get it). Only a
    spec of no other form pays TransformerLens's import (about 2 s) to look up its aliases."""
    if spec in BUNDLED_ARCHS:
        return ModelSource(spec, SourceKind.BUNDLED)
    path = Path(spec).expanduser()
    if path.is_dir():
        return ModelSource(spec, SourceKind.HF_DIRECTORY, path)
    if path.suffix in CHECKPOINT_SUFFIXES:
        return ModelSource(spec, SourceKind.CHECKPOINT, path)
    if is_pretrained_name(spec):
        return ModelSource(spec, SourceKind.PRETRAINED)
    raise PathPatchError(
        f"unknown model {spec!r}: give a bundled name ({', '.join(bundled_models())}), a "
        "TransformerLens pretrained name (e.g. gpt2), a Hugging Face model directory, or a "
        "checkpoint file (.safetensors/.pt next to a .json config of the same stem)"
    )


def read_config(model: str | ModelSource) -> ModelConfig:
    """The `ModelConfig` of a model spec, from its config alone (no weights read; a checkpoint's
    weights file need not exist). Bundled models and checkpoints are read without torch."""
    source = model if isinstance(model, ModelSource) else locate(model)
    if source.kind is SourceKind.BUNDLED:
        return ModelConfig.from_dict(arch_from_json(bundled_config(source.spec), source.spec))
    if source.kind is SourceKind.CHECKPOINT:
        json_path = source.config_path
        return ModelConfig.from_dict(arch_from_json(checkpoint_json(source), str(json_path)))
    from pathpatch.model.families import read_hf_config  # transformers' config classes

    if source.kind is SourceKind.HF_DIRECTORY:
        return read_hf_config(source.path)
    return read_hf_config(pretrained_folder(source.spec, ["*.json"]))


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


def checkpoint_json(source: ModelSource) -> dict[str, Any]:
    """A checkpoint's JSON config, read whole (architecture, and digest where pathpatch wrote it)."""
    json_path = source.config_path
    if not json_path.is_file():
        raise PathPatchError(
            f"checkpoint {source.path} has no config: expected {json_path} holding the "
            "ModelConfig fields (or a pathpatch checkpoint JSON)"
        )
    try:
        return json.loads(json_path.read_text())
    except json.JSONDecodeError as err:
        raise PathPatchError(f"{json_path} is not valid JSON: {err}") from err


def arch_from_json(config: Mapping[str, Any], src: str) -> dict[str, Any]:
    """The architecture part of a checkpoint JSON (ours, or a bare dict of ModelConfig fields, as
    TransformerLens 3's HookedTransformerConfig named them)."""
    if config.get("format") == CHECKPOINT_FORMAT:
        return dict(config["architecture"])
    if "format" in config:
        raise PathPatchError(
            f"{src}: unknown checkpoint format {config['format']!r}, expected {CHECKPOINT_FORMAT!r}"
        )
    return dict(config)


# --- TransformerLens names and the Hugging Face hub --------------------------------------------


def get_official_model_name(name: str) -> str:
    """The Hugging Face repository of a TransformerLens name or alias (TransformerLens 4's table;
    case-insensitive); a PathPatchError for a name it does not know."""
    from transformer_lens.supported_models import get_official_model_name as official

    try:
        return official(name)
    except ValueError as err:
        raise PathPatchError(str(err)) from None


def is_pretrained_name(spec: str) -> bool:
    try:
        get_official_model_name(spec)
    except PathPatchError:
        return False
    return True


def pretrained_folder(name: str, patterns: list[str]) -> Path:
    """The local snapshot of TransformerLens name `name`'s repository, files `patterns`: from
    the cache when the hub is off or unreachable, a fast error when it is in neither."""
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
        with nullcontext() if online else hub_offline():
            folder = Path(snapshot_download(official, allow_patterns=patterns))
    except (OSError, ValueError) as err:  # missing files in a partial cache
        raise PathPatchError(
            f"could not load pretrained model {name!r} ({official}"
            f"{'' if online else ', from the cache only'}): {err}"
        ) from err
    return folder


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
def hub_offline() -> Iterator[None]:
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
