"""The hypothesis language: patterns, their automata, the copies they compile to, and named
hypotheses with their families."""
