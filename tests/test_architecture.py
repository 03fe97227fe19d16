"""The package's import structure, read from the source: layers import only downwards, there
are no cycles, anyquant modules are imported at module top (function-level imports only for
the optional heavy dependencies listed below), and no private name crosses modules.

docs/architecture.md describes the layers; this test is what keeps the code and that map equal."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import anyquant

PKG = Path(anyquant.__file__).parent

# Bottom to top: a module may import its own layer's modules and those of lower layers.
LAYERS: list[set[str]] = [
    {"errors", "config", "progress", "primitives", "answers", "patterns"},
    {"runtime"},
    {"model"},
    {"numerics"},
    {"calib"},
    {"methods"},
    {"planning"},
    {"formats"},
    {"eval"},
    {"pipeline", "stream", "diagnosis", "inspection", "demo"},
    {"api"},
    {"cli"},
]
LAYER_OF = {name: i for i, names in enumerate(LAYERS) for name in names}

# Imported inside functions on purpose: optional or heavy third-party modules that most runs
# never need (bitsandbytes and the GPU stack where no GPU is; plotting; image data), so that
# importing anyquant, and the CLI's argument checks, stay fast.
LAZY_THIRD_PARTY = {
    "bitsandbytes", "triton", "compressed_tensors", "skimage", "matplotlib", "torch.utils.cpp_extension",
    "rich", "gguf", "peft", "transformers", "safetensors", "numpy", "PIL", "huggingface_hub", "gemlite",
}
# anyquant modules that import one of those at their top and so are imported only where it is
# needed, like the package itself (the Triton kernels: `import triton` runs at their import).
LAZY_ANYQUANT_MODULES = {"anyquant.runtime.triton_int4"}
# The CLI imports the API inside each command: argument errors answer before torch loads; the
# package's __init__ resolves the public names from anyquant.api on first use, for the same reason.
LAZY_ANYQUANT_IN = {"cli", "__init__"}


def _modules() -> dict[str, ast.Module]:
    out = {}
    for f in sorted(PKG.rglob("*.py")):
        rel = f.relative_to(PKG).with_suffix("")
        parts = [p for p in rel.parts if p != "__init__"]
        out[".".join(["anyquant", *parts])] = ast.parse(f.read_text(), str(f))
    return out


def _top(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _imports(tree: ast.Module, module: str):
    """(imported module, names, lineno, at module top?) for every import in the file."""
    top_level = {id(n) for n in tree.body}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                yield a.name, [], node.lineno, id(node) in top_level
        elif isinstance(node, ast.ImportFrom) and node.module:
            base = node.module
            if node.level:  # relative import
                base = ".".join(module.split(".")[: -node.level] + [node.module])
            yield base, [a.name for a in node.names], node.lineno, id(node) in top_level


def _target(imported: str, names: list[str], modules: dict) -> list[str]:
    """`from anyquant import primitives` imports the module anyquant.primitives."""
    subs = [f"{imported}.{n}" for n in names if f"{imported}.{n}" in modules]
    return subs or [imported]


MODULES = _modules()


def _edges():
    for mod, tree in MODULES.items():
        for imported, names, line, top in _imports(tree, mod):
            if not imported.startswith("anyquant"):
                continue
            for t in _target(imported, names, MODULES):
                yield mod, t, names, line, top


def test_layers_import_only_downwards():
    bad = []
    for mod, t, _, line, _ in _edges():
        a, b = _top(mod), _top(t)
        if a == "__init__" or b == "__init__" and t == "anyquant" and not _:
            continue
        if a in LAYER_OF and b in LAYER_OF and LAYER_OF[b] > LAYER_OF[a]:
            bad.append(f"{mod}:{line} imports {t} (layer {b} is above {a})")
        assert a in LAYER_OF or a == "__init__", f"{mod}: top-level module {a} has no layer in LAYERS"
    assert not bad, "upward imports:\n" + "\n".join(bad)


def test_no_cycles_between_subpackages():
    graph: dict[str, set[str]] = {}
    for mod, t, _, _, _ in _edges():
        a, b = _top(mod), _top(t)
        if a != b and a != "__init__" and b != "__init__":
            graph.setdefault(a, set()).add(b)

    def reach(start):
        seen, todo = set(), [start]
        while todo:
            for n in graph.get(todo.pop(), ()):
                if n not in seen:
                    seen.add(n)
                    todo.append(n)
        return seen

    cycles = sorted(a for a in graph if a in reach(a))
    assert not cycles, f"subpackages in an import cycle: {cycles}"


def test_no_module_level_cycles():
    graph: dict[str, set[str]] = {}
    for mod, t, _, _, top in _edges():
        if top and t in MODULES and t != mod:
            graph.setdefault(mod, set()).add(t)
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n):
        state[n] = 1
        stack.append(n)
        for m in sorted(graph.get(n, ())):
            if state.get(m) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(m):] + [m]))
            if m not in state:
                visit(m)
        stack.pop()
        state[n] = 2

    for n in sorted(graph):
        if n not in state:
            visit(n)


def test_imports_at_module_top():
    bad = []
    for mod, tree in MODULES.items():
        for imported, names, line, top in _imports(tree, mod):
            if top:
                continue
            if imported.startswith("anyquant"):
                if _top(mod) in LAZY_ANYQUANT_IN or set(_target(imported, names, MODULES)) <= LAZY_ANYQUANT_MODULES:
                    continue
                bad.append(f"{mod}:{line} imports {imported} inside a function")
            elif _top(mod) in LAZY_ANYQUANT_IN and imported.split(".")[0] == "torch":
                continue  # the CLI's commands import torch only once their arguments are checked
            elif imported.split(".")[0] not in LAZY_THIRD_PARTY and imported not in LAZY_THIRD_PARTY:
                bad.append(f"{mod}:{line} imports {imported} inside a function (not in LAZY_THIRD_PARTY)")
    assert not bad, "\n".join(bad)


def test_no_private_names_across_modules():
    bad = []
    for mod, tree in MODULES.items():
        for imported, names, line, _ in _imports(tree, mod):
            if imported.startswith("anyquant") and imported != mod:
                bad += [f"{mod}:{line} imports {imported}.{n}" for n in names if n.startswith("_") and n != "__version__"]
    assert not bad, "private names used across modules:\n" + "\n".join(bad)


@pytest.mark.parametrize("name", anyquant.__all__)
def test_no_submodule_shadows_a_public_name(name):
    assert not (PKG / f"{name}.py").exists() and not (PKG / name).is_dir(), (
        f"anyquant/{name} would replace anyquant.{name} once imported")


def test_architecture_map_names_every_module():
    doc = (PKG.parent.parent / "docs" / "architecture.md").read_text()
    missing = [f.relative_to(PKG).as_posix() for f in sorted(PKG.rglob("*.py"))
               if f"`{f.relative_to(PKG).as_posix()}`" not in doc]
    assert not missing, f"docs/architecture.md does not list: {missing}"
