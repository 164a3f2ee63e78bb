"""The import graph of the package: no circles, and imports flow down the layers below.

The graph is read from the source with ``ast`` (nothing is imported): every ``import`` and
``from ... import`` statement counts, at module level and inside functions, relative or absolute.
``from pkg import name`` is an edge to ``pkg.name`` when that is a module, else to ``pkg``. Not
counted: the package ``__init__`` Python runs before any submodule (every package has that edge to
its parent; what the ``__init__`` files import themselves is counted).

Layers, lowest first; a module imports only from its own layer or lower ones, without circles:

* leaves: argument checks, extension access and environment switches, the BatchNorm-over-heads
  math, the collectives, the ``torch.library`` helpers, and the Triton kernels (``reattn.kernels``,
  installed from ``kernels/``);
* reference: the eager reference, pure math over the leaves (the fused backends use it for the
  derivative of their backward kernels, so it sits below them);
* backends: the registry, the shared custom-op + autograd ladder and the three fused backends;
* functional: ``re_attention`` (validation, backend choice, dispatch; no math);
* module: ``ReAttention``;
* applications: distributed, swap, models, diagnostics;
* api: ``reattn/__init__.py``, which re-exports the public names.
"""
from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, List, Set

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"reattn": ROOT / "reattn", "reattn.kernels": ROOT / "kernels"}

LAYERS = [
    ("leaves", ("reattn._checks", "reattn._extension", "reattn._ops", "reattn._batchnorm", "reattn._collectives",
                "reattn._C", "reattn.kernels")),
    ("reference", ("reattn.reference",)),
    ("backends", ("reattn.backends",)),
    ("functional", ("reattn.functional",)),
    ("module", ("reattn.module",)),
    ("applications", ("reattn.distributed", "reattn.swap", "reattn.models", "reattn.diagnostics")),
    ("api", ("reattn",)),
]


def package_modules() -> Dict[str, Path]:
    """Dotted name -> source file of every module of reattn (the kernels under their installed name)."""
    modules = {}
    for package, directory in PACKAGES.items():
        for path in sorted(directory.rglob("*.py")):
            relative = path.relative_to(directory).with_suffix("")
            if relative.parts[0] == "kernels" and package == "reattn":
                continue  # the development symlink reattn/kernels -> ../kernels: listed as reattn.kernels
            parts = list(relative.parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join([package] + parts)] = path
    return modules


def _resolve(module: str, is_package: bool, level: int, target: str) -> str:
    """The absolute name of a (possibly relative) import target inside ``module``."""
    if level == 0:
        return target
    base = module.split(".")
    base = base if is_package else base[:-1]
    base = base[:len(base) - (level - 1)]
    return ".".join(base + ([target] if target else []))


def import_graph() -> Dict[str, Set[str]]:
    """module -> the reattn modules it imports (every import statement, at any depth of the file)."""
    modules = package_modules()
    known = set(modules) | {"reattn._C"}

    def nearest(name: str) -> str:
        while name and name not in known:
            name = name.rpartition(".")[0]
        return name

    graph = {}
    for module, path in modules.items():
        is_package = path.name == "__init__.py"
        edges = set()
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = _resolve(module, is_package, node.level, node.module or "")
                targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base
                           for alias in node.names]
            else:
                continue
            for target in targets:
                if target == "reattn" or target.startswith("reattn."):
                    found = nearest(target)
                    if found and found != module:
                        edges.add(found)
        graph[module] = edges
    return graph


def strongly_connected(graph: Dict[str, Set[str]]) -> List[List[str]]:
    """The strongly connected components with more than one module (Tarjan), i.e. the import circles."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on_stack: Set[str] = set()
    components = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return components


def layer_of(module: str) -> int:
    """Index in LAYERS of the layer that owns ``module`` (the longest matching prefix decides)."""
    best, best_length = None, -1
    for number, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best_length:
                best, best_length = number, len(prefix)
    assert best is not None, f"{module} belongs to no layer: add it to LAYERS in tests/test_layering.py"
    return best


def test_graph_sees_the_known_imports():
    # The analysis itself: a function-level import, a relative-free absolute one and a package import.
    graph = import_graph()
    assert "reattn.backends" in graph["reattn.functional"]
    assert "reattn.module" in graph["reattn.swap"]
    assert {"reattn.module", "reattn.functional", "reattn.backends"} <= graph["reattn"]
    assert any(m.startswith("reattn.kernels") for m in graph["reattn.backends.triton"])


def test_no_import_circles():
    circles = strongly_connected(import_graph())
    assert circles == [], f"modules importing each other in a circle: {circles}"


def test_imports_flow_down_the_layers():
    graph = import_graph()
    upward = [f"{module} ({LAYERS[layer_of(module)][0]}) imports {target} ({LAYERS[layer_of(target)][0]})"
              for module, targets in sorted(graph.items()) for target in sorted(targets)
              if layer_of(target) > layer_of(module)]
    assert upward == [], "imports against the layering:\n" + "\n".join(upward)


def test_reference_imports_only_leaves():
    graph = import_graph()
    above = sorted(t for t in graph["reattn.reference"] if layer_of(t) != 0)
    assert above == [], f"the eager reference imports more than leaves: {above}"


if __name__ == "__main__":  # python tests/test_layering.py: print the graph and its circles
    g = import_graph()
    for name in sorted(g):
        print(f"{name} -> {', '.join(sorted(g[name])) or '-'}")
    circles = strongly_connected(g)
    print(f"circles: {len(circles)}, modules in circles: {sum(map(len, circles))}")
    for c in circles:
        print("  ", c)
