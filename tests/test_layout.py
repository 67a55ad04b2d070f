"""The package layout's rules, checked on the source: no import circles, no module importing another module's
underscore names, the benchmark harness imported by nothing else in the library, and a test module per module."""

import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PKG = os.path.join(ROOT, "jaxdp")


def _modules() -> dict[str, str]:
    """``{dotted module name: path}`` of every module under jaxdp/."""
    out = {}
    for folder, _, files in os.walk(PKG):
        for f in files:
            if f.endswith(".py"):
                rel = os.path.relpath(os.path.join(folder, f), ROOT)[:-3].replace(os.sep, ".")
                out[rel.removesuffix(".__init__")] = os.path.join(folder, f)
    return out


MODULES = _modules()


def _resolve(module: str, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    package = module if MODULES[module].endswith("__init__.py") else module.rpartition(".")[0]
    for _ in range(node.level - 1):
        package = package.rpartition(".")[0]
    return f"{package}.{node.module}" if node.module else package


def _imports(module: str):
    """``(imported module, names)`` for every import in ``module``, at any depth (lazy imports included)."""
    with open(MODULES[module]) as f:
        tree = ast.parse(f.read())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, []
        elif isinstance(node, ast.ImportFrom):
            yield _resolve(module, node), [a.name for a in node.names]


def _target(name: str, names: list[str]) -> list[str]:
    """The jaxdp modules an import statement reaches (a ``from package import submodule`` reaches the submodule)."""
    hits = [name] if name in MODULES else []
    hits += [f"{name}.{n}" for n in names if f"{name}.{n}" in MODULES]
    return hits


def _graph() -> dict[str, set[str]]:
    graph = {m: set() for m in MODULES}
    for m in MODULES:
        for name, names in _imports(m):
            for t in _target(name, names):
                # A package's face importing its own submodules, and a submodule importing its package's
                # face for a sibling, are how packages are built; every other edge counts.
                if t != m and not (t.startswith(m + ".") and MODULES[m].endswith("__init__.py")):
                    graph[m].add(t)
    return graph


def test_no_module_imports_another_modules_underscore_names():
    bad = []
    for m in MODULES:
        for name, names in _imports(m):
            if not name.startswith("jaxdp"):
                continue
            private_names = [n for n in names if n.startswith("_") and n != "__version__"]
            if private_names:
                bad.append(f"{m}: from {name} import {', '.join(private_names)}")
            # A private module may be imported by its own package only (jaxdp.accounting._base by jaxdp.accounting.*).
            parts = name.split(".")
            for i, part in enumerate(parts):
                if part.startswith("_") and part != "__init__":
                    owner = ".".join(parts[:i])
                    if not (m == owner or m.startswith(owner + ".")):
                        bad.append(f"{m}: imports the private module {name}")
    assert not bad, "\n".join(bad)


def test_no_import_circles():
    graph = _graph()
    state: dict[str, int] = {}
    cycles = []

    def visit(m, path):
        state[m] = 1
        for t in sorted(graph[m]):
            if state.get(t) == 1:
                cycles.append(" -> ".join(path[path.index(t) :] + [t]) if t in path else f"{m} -> {t}")
            elif t not in state:
                visit(t, path + [t])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    # A package face and its submodules import each other by design (jaxdp.train -> jaxdp.train.loop ->
    # jaxdp.train.setup); a circle through a face only counts when it leaves the package.
    real = [c for c in cycles if len({p.split(".")[1] if "." in p else p for p in c.split(" -> ")}) > 1]
    assert not real, "\n".join(real)


def test_the_bench_harness_is_imported_by_nothing_else_in_the_library():
    importers = sorted(
        m
        for m, targets in _graph().items()
        if not (m == "jaxdp.bench" or m.startswith("jaxdp.bench.") or m == "jaxdp.cli.bench")
        and any(t == "jaxdp.bench" or t.startswith("jaxdp.bench.") for t in targets)
    )
    assert not importers, importers


def test_every_module_has_a_test_module():
    """tests/test_<name>.py for every module (a package's modules may share its test module, e.g. test_audit_*)."""
    tests = {f[5:-3] for f in os.listdir(os.path.join(ROOT, "tests")) if f.startswith("test_") and f.endswith(".py")}
    missing = []
    for m in MODULES:
        parts = [p.lstrip("_") for p in m.split(".")[1:]] or ["jaxdp"]
        candidates = {parts[-1], "_".join(parts), parts[0]} | {t for t in tests if t.startswith(parts[0] + "_")}
        if parts[-1] in ("__main__", "jaxdp"):
            continue
        if not candidates & tests:
            missing.append(m)
    assert not missing, missing
