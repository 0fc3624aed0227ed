"""The package's shape (docs/architecture.md): packages are layers and imports only go down
(:data:`LAYERS`), no cycles between modules' top-level imports, no module imports another's
private names, and no function or class is longer than about 120 lines (the C file aside)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "sparsestitch"
LONGEST = 120


def modules() -> dict[str, tuple[Path, ast.Module]]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = (path, ast.parse(path.read_text()))
    return found


def imports(name: str, path: Path, tree: ast.Module, known) -> list[tuple[str, str, bool]]:
    """``(module imported, name imported, at top level)`` for every sparsestitch import."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    out = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.ImportFrom):
            continue
        if node.level:
            parts = package.split(".")
            target = ".".join(parts[:len(parts) - node.level + 1] + ([node.module] if node.module
                                                                      else []))
        else:
            target = node.module or ""
        if not target.startswith("sparsestitch"):
            continue
        for alias in node.names:
            full = f"{target}.{alias.name}"
            out.append((full if full in known else target, alias.name, node in tree.body))
    return out


#: Each package's layer: a module may import its own package and any lower layer, never a
#: higher one nor a sibling of its layer (function-level imports included).
LAYERS = {
    "core": 0, "_version": 0, "_native": 0,   # errors, dtypes, sizes, options, the C loops
    "checkpoint": 1,                          # model files: safetensors, GGUF, Hub, guard
    "delta": 2,                               # the delta file: records, reader, writer, codecs
    "engine": 3,                              # the walk within a memory budget
    "localize": 4, "combine": 4,              # what a delta keeps; how deltas combine
    "ops": 5,                                 # each command's work
    "live": 6, "zoo": 6,                      # hot-swap on a resident model; model zoos
    "(api)": 7,                               # sparsestitch/__init__.py: the public API
    "cli": 8,                                 # the command line
}


def layer_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "(api)"


def test_packages_are_layers_and_imports_go_down():
    found = modules()
    assert {layer_of(name) for name in found} <= set(LAYERS), "a package without a layer"
    upward = []
    for name, (path, tree) in found.items():
        for target, imported, _ in imports(name, path, tree, found):
            if target == "sparsestitch" and imported == "_native":
                target = "sparsestitch._native"
            source, goal = layer_of(name), layer_of(target)
            higher = LAYERS[goal] > LAYERS[source]
            sibling = LAYERS[goal] == LAYERS[source] > 0  # layer 0 is one foundation
            if source != goal and (higher or sibling):
                upward.append((name, target))
    assert upward == []


def test_no_import_cycles():
    found = modules()
    graph = {name: {target for target, _, top in imports(name, path, tree, found)
                    if top and target in found and target != name}
             for name, (path, tree) in found.items()}
    state, cycles = {}, []

    def visit(node, stack):
        state[node] = "open"
        stack.append(node)
        for target in sorted(graph[node]):
            if state.get(target) == "open":
                cycles.append(stack[stack.index(target):] + [target])
            elif target not in state:
                visit(target, stack)
        stack.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [])
    # A package's __init__ importing its own submodules is not a cycle worth reporting
    # unless a submodule imports the package back at top level.
    assert cycles == []


def test_no_private_names_imported_across_modules():
    found = modules()
    private = [(name, target, imported) for name, (path, tree) in found.items()
               for target, imported, _ in imports(name, path, tree, found)
               if imported.startswith("_") and imported not in ("__version__", "_native")]
    assert private == []


def test_no_function_or_class_over_120_lines():
    long = []
    for name, (_, tree) in modules().items():
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                length = node.end_lineno - node.lineno + 1
                if length > LONGEST:
                    long.append((name, node.name, length))
    assert long == []
