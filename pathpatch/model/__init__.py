"""The model layer: everything that knows how a model is built and computes.

`config` (ModelConfig) and `costs` (what each computation costs, from the config), `transformer`
(the hooked module every model is), `families` (Hugging Face checkpoints, one entry per family,
and the classification of every architecture TransformerLens 4 supports), `sources` (a model
spec's form, and its config without weights), `loading` (models and weights from a source),
`support` (what the engine computes exactly), `adapter` (how the engine reads a
model), `graph` (nodes, edges and their names). The only package that imports `transformer_lens`
or `transformers` modelling code.
"""
