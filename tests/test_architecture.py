"""The import graph keeps the package arrows: services → canopy → {ssl_backbone, data_catalog}.

Built from the source with ``ast``, imports inside functions included (a lazy import is still a
dependency; it only hides a cycle until the day someone moves it to the top). Fails on any cycle
between project modules, on prediction or the model importing training code, on the lower
packages importing ``canopy`` (or each other, or ``services``), on ``data_catalog`` importing
torch, and on ``ssl_backbone`` importing anything but torch, timm, numpy and the standard library.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("canopy", "ssl_backbone", "data_catalog", "services")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def project_modules() -> dict[str, Path]:
    return {module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


def imports_of(name: str, path: Path) -> set[str]:
    """Absolute names of everything ``path`` imports, wherever in the file: ``import a.b`` gives
    ``a.b``; ``from a import b`` gives ``a.b`` (a submodule or a name in ``a``)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[:len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def graph() -> dict[str, set[str]]:
    modules = project_modules()
    edges = {}
    for name, path in modules.items():
        targets = set()
        for imported in imports_of(name, path):
            # a name inside a module is an edge to that module (its closest enclosing module)
            while imported and imported not in modules and imported.split(".")[0] in PACKAGES:
                imported = imported.rpartition(".")[0]
            if imported in modules and imported != name:
                targets.add(imported)
        edges[name] = targets
    return edges


def third_party_roots(name: str, path: Path) -> set[str]:
    return {i.split(".")[0] for i in imports_of(name, path) if i} - set(PACKAGES) - {""}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []
    counter = [0]
    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def test_the_guard_sees_lazy_imports_and_cycles():
    """The checker itself: an import inside a function is an edge, and a 2-cycle is found."""
    tree_edges = {"a": {"b"}, "b": {"a"}, "c": {"a"}}
    assert cycles(tree_edges) == [["a", "b"]]
    edges = graph()
    # canopy/__init__.py imports the model loader inside a function only
    assert "canopy.model.checkpoints" in edges["canopy"]


def test_no_import_cycles():
    assert cycles(graph()) == []


@pytest.mark.parametrize("prefix,forbidden", [
    ("canopy.predict", "canopy.train"),
    ("canopy.model", "canopy.train"),
    ("canopy.model", "canopy.predict"),
    ("canopy.io", "canopy.train"),
    ("data_catalog", "canopy"),
    ("data_catalog", "ssl_backbone"),
    ("data_catalog", "services"),
    ("ssl_backbone", "canopy"),
    ("ssl_backbone", "data_catalog"),
    ("ssl_backbone", "services"),
    ("canopy", "services"),
])
def test_arrows_point_one_way(prefix, forbidden):
    def within(name, pkg):
        return name == pkg or name.startswith(pkg + ".")

    bad = sorted(f"{src} → {dst}" for src, dsts in graph().items() if within(src, prefix)
                 for dst in dsts if within(dst, forbidden))
    assert bad == []


def test_lower_packages_keep_their_dependencies():
    # safetensors comes with timm (its dependency) and is how weights are stored; torchvision
    # (timm's dependency) gives the crop/colour ops of pretraining, and PIL (torchvision's) reads
    # JPEG/PNG: "torch + timm only" means nothing beyond what installing timm installs
    allowed_ssl = {"torch", "timm", "numpy", "safetensors", "torchvision", "PIL", "__future__",
                   *sys.stdlib_module_names}
    for name, path in project_modules().items():
        roots = third_party_roots(name, path)
        if name.startswith("data_catalog"):
            assert not roots & {"torch", "timm", "torchvision"}, f"{name} imports torch"
        if name.startswith("ssl_backbone"):
            assert roots <= allowed_ssl, f"{name} imports {sorted(roots - allowed_ssl)}"
