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

from typing import Any

from pathpatch.dataset import PairDataset, load_parquet, save_parquet
from pathpatch.engine import evaluate
from pathpatch.errors import PathPatchError
from pathpatch.hypotheses import Hypothesis
from pathpatch.metrics import BUILTIN_METRICS, Metric, get_metric, summarize
from pathpatch.model.config import ModelConfig
from pathpatch.model.graph import Graph
from pathpatch.model.loading import bundled_models, load_model, model_digest
from pathpatch.model.transformer import Transformer
from pathpatch.tasks import make_dataset

__version__ = "0.1.0"

__all__ = [
    "BUILTIN_METRICS", "Graph", "Hypothesis", "Metric", "ModelConfig", "PairDataset",
    "PathPatchError", "Transformer", "bundled_models", "evaluate", "get_metric", "load_model",
    "load_parquet", "make_dataset", "model_digest", "open_sweeps", "save_parquet", "summarize",
]


def __getattr__(name: str) -> Any:
    """`open_sweeps`, the one name from `pipeline/`: imported on first use, so `import pathpatch`
    loads neither DuckDB nor Ray."""
    if name == "open_sweeps":
        from pipeline.query import open_sweeps

        return open_sweeps
    raise AttributeError(f"module 'pathpatch' has no attribute {name!r}")
