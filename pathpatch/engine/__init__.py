"""Exact evaluation of hypotheses: cached runs, the stage plan of a group, its evaluation, metrics."""
