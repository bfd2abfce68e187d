"""pathpatch: path patching (Goldowsky-Dill et al. 2023) done exactly, without building the tree.

The method lives here and knows nothing of Ray or DuckDB; `pipeline/` runs it at scale. The names
below are the stable public API (the README's Python example); the modules behind them may move.

    import pathpatch
    model = pathpatch.load_model("attn-only-2l")
    data = pathpatch.make_dataset("induction", n=256)
    rows = pathpatch.evaluate(model, data, [pathpatch.Hypothesis("q", "in -> a1.*[q] -> out")])
    pathpatch.summarize(rows).to_pandas()
    pathpatch.open_sweeps("sweeps/default").sql("SELECT * FROM scores").df()
"""

from __future__ import annotations

import importlib
from typing import Any

from pathpatch.data.pairs import PairDataset, load_parquet, save_parquet
from pathpatch.data.tasks import make_dataset
from pathpatch.engine.evaluation import evaluate
from pathpatch.engine.metrics import BUILTIN_METRICS, Metric, get_metric
from pathpatch.errors import PathPatchError
from pathpatch.language.hypotheses import Hypothesis
from pathpatch.model.config import ModelConfig
from pathpatch.model.graph import Graph
from pathpatch.model.loading import bundled_models, load_model, model_digest
from pathpatch.model.transformer import Transformer

__version__ = "0.1.0"

__all__ = [
    "BUILTIN_METRICS", "Graph", "Hypothesis", "Metric", "ModelConfig", "PairDataset",
    "PathPatchError", "Transformer", "bundled_models", "evaluate", "get_metric", "load_model",
    "load_parquet", "make_dataset", "model_digest", "open_sweeps", "save_parquet", "summarize",
]


_FROM_PIPELINE = {"open_sweeps": "pipeline.query", "summarize": "pipeline.intervals"}
"""Names the public API takes from `pipeline/` (results, not the method): imported on first use,
so `import pathpatch` loads neither DuckDB nor Ray, and the method's packages never import them."""


def __getattr__(name: str) -> Any:
    if name in _FROM_PIPELINE:
        return getattr(importlib.import_module(_FROM_PIPELINE[name]), name)
    raise AttributeError(f"module 'pathpatch' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_FROM_PIPELINE])
