"""The package's floors, read from the source with ``ast`` (no import is executed).

Top to bottom: ``kdfast.cli`` -> ``kdfast.experiments`` (with ``kdfast.model_file``, the application's
checkpoints) -> ``kdfast.methods`` -> ``kdfast.distill`` (the engine) -> the ground floor (ops, nn, losses,
models, data, decomposition, robustness, ...). A module may import its own floor or any floor below, never
one above; kdfast modules import each other without a circle (counting imports inside functions too:
a circle closed at call time is still two modules that cannot be read apart);
``kdfast.testing`` (float64 oracles) is never imported by the package; and no module imports a
``_private`` name (a function, class or module whose name starts with one underscore) from another
package. The root package's own helpers ``kdfast._checks`` / ``kdfast._ext`` / ``kdfast._spatial`` /
``kdfast._registrations`` (argument checks, the extension loader, one pooling convention) are the
library's shared internals and may be imported from anywhere in kdfast.
"""
from __future__ import annotations

import ast
import os
from collections import defaultdict

import pytest

ROOT = os.path.join(os.path.dirname(__file__), os.pardir, os.pardir, "kdfast")
ROOT = os.path.normpath(ROOT)

FLOORS = {"cli": 4, "experiments": 3, "model_file": 3, "__main__": 4, "methods": 2, "distill": 1}
GROUND = 0
LIBRARY_INTERNALS = {"kdfast._checks", "kdfast._ext", "kdfast._spatial", "kdfast._registrations", "kdfast._C"}


def _module_name(path: str) -> str:
    rel = os.path.relpath(path, os.path.dirname(ROOT))[:-3].replace(os.sep, ".")
    return rel[: -len(".__init__")] if rel.endswith(".__init__") else rel


def _package_of(module: str, is_package: bool) -> str:
    return module if is_package else module.rpartition(".")[0]


def _modules():
    """{module name: (path, is_package)} of every kdfast source file."""
    out = {}
    for directory, _, files in os.walk(ROOT):
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(directory, f)
                out[_module_name(path)] = (path, f == "__init__.py")
    return out


MODULES = _modules()


def _resolve(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    base = _package_of(module, is_package).split(".")
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _imports(module: str):
    """(target module, imported name or None, line, at module level) for every kdfast import of ``module``
    (``importlib.import_module`` by name, the registries' lazy lookups, is not an import edge)."""
    path, is_package = MODULES[module]
    tree = ast.parse(open(path, encoding="utf-8").read(), filename=path)
    top_level = {id(n) for n in tree.body}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == "kdfast" or alias.name.startswith("kdfast."):
                    yield alias.name, None, node.lineno, id(node) in top_level
        elif isinstance(node, ast.ImportFrom):
            target = _resolve(module, is_package, node)
            if target != "kdfast" and not target.startswith("kdfast."):
                continue
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                if sub in MODULES or sub in LIBRARY_INTERNALS:  # `from . import ops`: a module
                    yield sub, None, node.lineno, id(node) in top_level
                else:
                    yield target, alias.name, node.lineno, id(node) in top_level


def floor(module: str) -> int:
    parts = module.split(".")
    return FLOORS.get(parts[1], GROUND) if len(parts) > 1 else GROUND


EDGES = [(m, *imp) for m in MODULES for imp in _imports(m)]


def test_the_graph_is_read():
    # the parser sees the imports it must see: guards against a test that checks nothing
    targets = {(m, t) for m, t, *_ in EDGES}
    assert ("kdfast.experiments.bss", "kdfast.methods.bss") in targets
    assert ("kdfast.methods.bss", "kdfast.distill") in targets
    assert ("kdfast.cli.demo", "kdfast.experiments") in targets
    assert len(MODULES) > 40


def test_no_import_runs_upward():
    upward = [f"{m}:{line} imports {t} (floor {floor(t)} above {floor(m)})"
              for m, t, _, line, _ in EDGES if floor(t) > floor(m)]
    assert not upward, "\n".join(upward)


@pytest.mark.parametrize("forbidden", ["kdfast.experiments", "kdfast.cli", "kdfast.model_file"])
def test_methods_import_neither_experiments_cli_nor_model_file(forbidden):
    bad = [f"{m}:{line} imports {t}" for m, t, _, line, _ in EDGES
           if m.startswith("kdfast.methods") and (t == forbidden or t.startswith(forbidden + "."))]
    assert not bad, "\n".join(bad)


def test_testing_is_never_imported_by_the_package():
    bad = [f"{m}:{line}" for m, t, _, line, _ in EDGES
           if t.startswith("kdfast.testing") and not m.startswith("kdfast.testing")]
    assert not bad, "\n".join(bad)


def _known(target: str) -> str:
    """The kdfast module an import target names (a symbol imported from a package maps to the package)."""
    while target and target not in MODULES:
        target = target.rpartition(".")[0]
    return target


def test_no_circle_among_kdfast_modules():
    graph = defaultdict(set)
    for m, t, _, _, top in EDGES:
        t = _known(t)
        if t and t != m:
            graph[m].add(t)
    # a package's __init__ runs when a submodule is imported: importing kdfast.x.y imports kdfast.x
    for m in MODULES:
        parent = m.rpartition(".")[0]
        if parent and parent in MODULES and parent != m:
            graph[m].add(parent)
    # Tarjan's strongly connected components
    index, low, stack, on_stack, circles = {}, {}, [], set(), []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for v in list(MODULES):
        if v not in index:
            visit(v)
    # a package importing its own submodules (an __init__ re-exporting them) is not a circle
    real = [c for c in circles if not all(x == c[0] or x.startswith(c[0] + ".") for x in c)]
    assert not real, real


def test_no_private_name_is_imported_across_packages():
    bad = []
    for m, target, name, line, _ in EDGES:
        _, is_package = MODULES[m]
        importer = _package_of(m, is_package)
        target_module = _known(target)
        if target_module in LIBRARY_INTERNALS or target in LIBRARY_INTERNALS:
            continue
        target_package = _package_of(target_module, MODULES.get(target_module, ("", False))[1])
        if target_package == importer:
            continue
        private_module = any(p.startswith("_") and not p.startswith("__") for p in target.split(".")[1:])
        private_name = name is not None and name.startswith("_") and not name.startswith("__")
        if private_module or private_name:
            bad.append(f"{m}:{line} imports {target}{'.' + name if name else ''}")
    assert not bad, "\n".join(bad)


def test_methods_contract_is_the_method_only():
    # the registry's modules define the method; experiments and tour sections live one floor up
    from kdfast import experiments, methods

    for name in methods.available():
        module = methods.get(name)
        for attr in ("NAME", "TITLE", "PAPER", "OPTIONS", "build"):
            assert hasattr(module, attr), (name, attr)
        assert not hasattr(module, "run_experiment") and not hasattr(module, "demo_section"), name
    for name in experiments.available():
        module = experiments.get(name)
        assert module.NAME == name and callable(module.run) and callable(module.demo_section)
