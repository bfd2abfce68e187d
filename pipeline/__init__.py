"""pipeline: plans, runs and stores path patching sweeps on a Ray cluster; knows nothing of heads."""
