"""The model layer: everything that knows how a model is built and computes.

`config` (ModelConfig) and `transformer` (the hooked module every model is), `families` (Hugging
Face checkpoints, one entry per family, and the classification of every architecture
TransformerLens 4 supports), `loading` (bundled names, TransformerLens names, local directories,
checkpoints), `support` (what the engine computes exactly), `adapter` (how the engine reads a
model), `graph` (nodes, edges and their names). The only package that imports `transformer_lens`
or `transformers` modelling code.
"""
