"""Tooling around the method, outside its core: benchmarks, evidence of the bundled models, explain."""
