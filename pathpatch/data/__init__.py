"""Datasets of (reference, counterfactual) pairs and the synthetic tasks that generate them."""
