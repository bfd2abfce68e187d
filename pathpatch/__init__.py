"""pathpatch: path patching (Goldowsky-Dill et al. 2023) done exactly, without building the tree.

The method lives here and knows nothing of Ray or DuckDB; `pipeline/` runs it at scale.
"""

__version__ = "0.1.0"
