"""The package's rooms and the newcomer's first minutes: no import cycles (function-level
imports included), each room imports only what it may, and a python started in the repo root
imports lorafx, peft and transformers and runs the README quickstart."""

import ast
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FOLDERS = {"lorafx": "lorafx", "passes": "lorafx.passes", "kernels": "lorafx.kernels"}  # pyproject's package-dir


def modules() -> dict[str, str]:
    """module name → file, for every module of the installed package."""
    found = {}
    for folder, package in FOLDERS.items():
        for dirpath, _, files in os.walk(os.path.join(ROOT, folder)):
            rel = os.path.relpath(dirpath, os.path.join(ROOT, folder))
            prefix = package if rel == "." else package + "." + rel.replace(os.sep, ".")
            for f in files:
                if f.endswith(".py"):
                    found[prefix if f == "__init__.py" else f"{prefix}.{f[:-3]}"] = os.path.join(dirpath, f)
    return found


def imports(name: str, path: str, known: set[str]) -> set[str]:
    """lorafx modules `name` imports anywhere in its file (top level or inside functions)."""
    package = name if path.endswith("__init__.py") else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            out |= {f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names}
    return {m for m in out if m in known and m != name}


# Entry points on LoraModel that defer, at call time, to the room that builds them (the model's
# methods are where users look; the code lives above core). The only upward edges allowed.
DEFERRED = {("lorafx.core.model", "lorafx.generation.generate")}


@pytest.fixture(scope="module")
def graph():
    found = modules()
    edges = {name: imports(name, path, set(found)) for name, path in found.items()}
    return {name: {t for t in targets if (name, t) not in DEFERRED} for name, targets in edges.items()}


def test_deferred_imports_are_inside_functions():
    found = modules()
    for module, target in DEFERRED:
        tree = ast.parse(open(found[module], encoding="utf-8").read())
        top = {n.module for n in tree.body if isinstance(n, ast.ImportFrom)}
        assert target not in top, f"{module} imports {target} at top level"


def test_import_graph_has_no_cycle(graph):
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(module, path):
        state[module] = 1
        for target in sorted(graph[module]):
            if state.get(target) == 1:
                cycle = path[path.index(target):] + [target]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if target not in state:
                visit(target, path + [target])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])


def room(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "lorafx"


# What each room may import (besides itself): the layering the README's Layout section describes.
ALLOWED = {
    "kernels": set(),
    "formats": {"kernels"},
    "passes": {"kernels", "formats"},
    "core": {"kernels", "formats", "passes", "variants"},
    "variants": {"formats", "passes", "core"},
    "runtime": {"formats", "passes", "core", "variants"},
    "generation": {"formats", "passes", "core", "variants"},
    "serving": {"formats", "passes", "core", "variants", "generation"},
    "integrations": {"formats", "passes", "core", "variants", "runtime"},
    "tools": {"kernels", "formats", "passes", "core", "variants", "runtime", "generation", "serving"},
}


def test_rooms_import_only_the_rooms_below(graph):
    for module, targets in graph.items():
        if module == "lorafx":
            continue
        for target in targets:
            assert room(target) in ALLOWED[room(module)] | {room(module)}, f"{module} imports {target}"
    # a variant reads the spec vocabulary, never the model that reads the variants table
    assert not {t for m, ts in graph.items() if room(m) == "variants" for t in ts} - {
        "lorafx.core.spec", "lorafx.formats.adapters", "lorafx.passes", "lorafx.variants.ia3", "lorafx.variants.vera"
    }


def test_package_init_only_reexports():
    tree = ast.parse(open(os.path.join(ROOT, "lorafx", "__init__.py"), encoding="utf-8").read())
    for node in tree.body:
        docstring = isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)
        exports = isinstance(node, ast.Assign) and [t.id for t in node.targets] == ["__all__"]
        assert docstring or exports or isinstance(node, ast.ImportFrom), ast.dump(node)[:200]


def run_in_repo_root(code, cwd=ROOT):
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=300)


def test_repo_root_imports_lorafx_peft_transformers():
    """A python started in the repo root has the root first on sys.path: kernels/ must not
    shadow PyPI's `kernels` (a transformers dependency that peft's import reaches)."""
    out = run_in_repo_root(
        "import lorafx, peft, transformers, kernels, lorafx.kernels.nf4\n"
        "print(kernels.__file__); print(lorafx.kernels.nf4.__file__)"
    )
    assert out.returncode == 0, out.stderr[-3000:]
    theirs, ours = out.stdout.split()
    assert theirs != os.path.join(ROOT, "kernels", "__init__.py") and "site-packages" in theirs
    assert ours == os.path.join(ROOT, "kernels", "nf4.py")


def test_import_lorafx_is_silent():
    out = run_in_repo_root("import lorafx, transformers")
    assert out.returncode == 0 and out.stdout == "" and out.stderr == "", out.stderr[-3000:]


def readme_quickstart() -> str:
    readme = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    section = readme[readme.index("## Quickstart"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_quickstart_runs_from_the_repo_root(tmp_path):
    # sys.path[0] = repo root is exactly what `cd repo && python` gives; cwd is tmp_path so the
    # snippet's output folder lands there, not in the checkout.
    code = f"import sys; sys.path.insert(0, {ROOT!r})\n" + readme_quickstart() + "\nprint('merged', type(merged).__name__)"
    out = run_in_repo_root(code, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "trainable params:" in out.stdout and "merged LoraModel" in out.stdout
    assert out.stderr == "", out.stderr[-3000:]
    assert (tmp_path / "out" / "adapter" / "adapter_model.safetensors").is_file()
