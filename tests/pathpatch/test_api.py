"""The public API and the one model layer: what `import pathpatch` gives, and which code may
import TransformerLens or transformers modelling code (and never a name TransformerLens 4 removed)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import transformer_lens

import pathpatch

ROOT = Path(__file__).parents[2]
PACKAGES = ("pathpatch", "pipeline", "jobs", "scripts", "tests")


def _imports(path: Path) -> list[tuple[str, str | None]]:
    """(module, name) of every import in `path`; name None for `import module`."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(alias.name, None) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found += [(node.module, alias.name) for alias in node.names]
    return found


def _python_files():
    for package in PACKAGES:
        yield from (ROOT / package).rglob("*.py")


def test_nothing_imports_a_name_transformer_lens_4_removed():
    removed = set(transformer_lens._REMOVED_IN_4_0)  # HookedTransformer, utils, loading_from_pretrained...
    assert {"HookedTransformer", "HookedTransformerConfig", "utils", "loading_from_pretrained"} <= removed
    bad = []
    for path in _python_files():
        for module, name in _imports(path):
            parts = module.split(".")
            if parts[0] != "transformer_lens":
                continue
            if set(parts[1:]) & removed or name in removed:
                bad.append(f"{path.relative_to(ROOT)}: {module} {name or ''}")
    assert bad == []


def test_only_the_model_layer_imports_transformer_lens_or_transformers_modelling_code():
    """Tests and scripts build their Hugging Face references with transformers; `tasks.py` reads
    tokenizers only."""
    outside = []
    for path in _python_files():
        rel = path.relative_to(ROOT)
        if rel.parts[:2] == ("pathpatch", "model") or rel.parts[0] in ("tests", "scripts"):
            continue
        for module, name in _imports(path):
            top = module.split(".")[0]
            if top == "transformer_lens" or (top == "transformers" and name != "AutoTokenizer"):
                outside.append(f"{rel}: {module}.{name}")
    assert outside == []


def test_the_public_api_runs_the_readme_example():
    model = pathpatch.load_model("attn-only-2l")
    data = pathpatch.make_dataset("induction", n=8)
    rows = pathpatch.evaluate(model, data, [pathpatch.Hypothesis("q", "in -> a1.*[q] -> out")])
    summary = pathpatch.summarize(rows).to_pydict()
    assert summary["n"] == [8] and 0 < summary["ate"][0]
    assert set(pathpatch.__all__) <= set(dir(pathpatch))
    assert callable(pathpatch.open_sweeps)


def test_import_pathpatch_loads_neither_ray_nor_duckdb():
    code = "import sys, pathpatch; print(sorted({'ray', 'duckdb'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_model_package_has_no_import_cycle():
    """Every module of pathpatch/model imports the others at module level, in one direction."""
    order = ["config", "costs", "transformer", "families", "sources", "loading", "support", "adapter",
             "graph", "names"]
    for path in (ROOT / "pathpatch" / "model").glob("*.py"):
        if path.stem == "__init__":
            continue
        for module, _ in _imports(path):
            if module.startswith("pathpatch.model."):
                other = module.rsplit(".", 1)[-1]
                assert order.index(other) < order.index(path.stem), (path.stem, other)


def test_the_method_s_packages_import_downwards_only():
    """model <- data <- language <- engine <- discovery <- tools (ARCHITECTURE.md): a package
    imports only those before it, and none of pathpatch/ imports pipeline/ (but the public
    API's two names from it, imported on first use by pathpatch/__init__.py)."""
    order = ["model", "data", "language", "engine", "discovery", "tools"]
    for package in order:
        for path in (ROOT / "pathpatch" / package).glob("*.py"):
            for module, _ in _imports(path):
                assert not module.startswith("pipeline"), (path, module)
                if module.startswith("pathpatch.") and module.split(".")[1] in order:
                    other = module.split(".")[1]
                    assert order.index(other) <= order.index(package), (path, module)


def test_module_names_are_unique_across_the_project():
    stems = [p.stem for p in _python_files() if p.stem not in ("__init__", "conftest")]
    assert sorted(stems) == sorted(set(stems)), {s for s in stems if stems.count(s) > 1}
