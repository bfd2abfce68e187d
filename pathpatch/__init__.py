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
from typing import TYPE_CHECKING, Any

from pathpatch.errors import PathPatchError

if TYPE_CHECKING:  # for type checkers and editors; at run time each name loads on first use
    from pathpatch.data.pairs import PairDataset, load_parquet, save_parquet
    from pathpatch.data.tasks import make_dataset
    from pathpatch.engine.evaluation import evaluate
    from pathpatch.engine.metrics import BUILTIN_METRICS, Metric, get_metric
    from pathpatch.language.hypotheses import Hypothesis
    from pathpatch.model.config import ModelConfig
    from pathpatch.model.graph import Graph
    from pathpatch.model.loading import load_model, model_digest
    from pathpatch.model.sources import bundled_models
    from pathpatch.model.transformer import Transformer
    from pipeline.intervals import summarize
    from pipeline.query import open_sweeps

__version__ = "0.1.0"

__all__ = [
    "BUILTIN_METRICS", "Graph", "Hypothesis", "Metric", "ModelConfig", "PairDataset",
    "PathPatchError", "Transformer", "bundled_models", "evaluate", "get_metric", "load_model",
    "load_parquet", "make_dataset", "model_digest", "open_sweeps", "save_parquet", "summarize",
]

_LAZY = {
    "PairDataset": "pathpatch.data.pairs", "load_parquet": "pathpatch.data.pairs",
    "save_parquet": "pathpatch.data.pairs", "make_dataset": "pathpatch.data.tasks",
    "evaluate": "pathpatch.engine.evaluation", "BUILTIN_METRICS": "pathpatch.engine.metrics",
    "Metric": "pathpatch.engine.metrics", "get_metric": "pathpatch.engine.metrics",
    "Hypothesis": "pathpatch.language.hypotheses", "ModelConfig": "pathpatch.model.config",
    "Graph": "pathpatch.model.graph", "bundled_models": "pathpatch.model.sources",
    "load_model": "pathpatch.model.loading", "model_digest": "pathpatch.model.loading",
    "Transformer": "pathpatch.model.transformer",
    # results, not the method: from pipeline/, so the method's packages never import DuckDB
    "open_sweeps": "pipeline.query", "summarize": "pipeline.intervals",
}
"""Where each public name lives, imported on first use (PEP 562): `import pathpatch` (and every
`pathpatch.*` module the command line needs, such as `pathpatch.errors`) costs milliseconds, not
the seconds torch and TransformerLens take; `import pathpatch` loads neither DuckDB nor Ray."""


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value  # once: later look-ups are plain attribute reads
        return value
    raise AttributeError(f"module 'pathpatch' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})
