"""Imports run one way: every module's imports, parsed, form no cycle and no edge against the direction.

scripts/, benchmarks/ -> ps/ -> train/, export/, interop/, serve/ -> optim/, compress/, data/, checkpoint/ -> models/, parallel/ -> config.
Lazy imports (inside functions) count like any other, so a lazy import cannot hide a cycle from this test; each
lazy import says in a comment why it is lazy (the exception: THIRD_PARTY_LAZY_DOCUMENTED_BY_PACKAGE).
"""

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SOURCES = ("jaxbig", "scripts", "benchmarks")

# The unit of layering: a jaxbig subpackage, a top-level jaxbig module, or a whole top-level directory.
LAYER = {
    "jaxbig.config": 0, "jaxbig.xla_options": 0, "jaxbig.runtime": 0, "jaxbig.profile": 0, "jaxbig": 0,
    "jaxbig.models": 1, "jaxbig.parallel": 1,
    "jaxbig.optim": 2, "jaxbig.compress": 2, "jaxbig.data": 2, "jaxbig.checkpoint": 2,
    "jaxbig.train": 3, "jaxbig.ps": 3, "jaxbig.export": 3, "jaxbig.interop": 3, "jaxbig.serve": 3, "jaxbig.sample": 3, "jaxbig.cli": 3,
    "benchmarks": 4, "scripts": 5,
}  # fmt: skip
# Edges the layers alone allow (same layer or downwards) but the design forbids.
FORBIDDEN = {
    "jaxbig.models": {"jaxbig.parallel", "jaxbig.train", "jaxbig.optim"},  # models read injected hooks instead
    "jaxbig.parallel": {"jaxbig.train", "jaxbig.optim", "jaxbig.data"},
    "jaxbig.checkpoint": {"jaxbig.train"},
    "jaxbig.data": {"jaxbig.models"},
    "jaxbig.serve": {"jaxbig.train", "jaxbig.optim", "jaxbig.parallel"},
    "jaxbig.export": {"jaxbig.train"},
    "jaxbig.interop": {"jaxbig.train", "jaxbig.optim"},  # reads and writes run directories, never the loop
    "jaxbig.train": {"jaxbig.interop", "jaxbig.ps"},  # fine-tuning starts from a run directory; conversion is scripts/convert.py's
    # The parameter server builds on train/ (a worker runs the run's own jitted step); train/ never knows about it.
}


def _module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for top in SOURCES for p in sorted((REPO / top).rglob("*.py"))}


MODULES = _modules()


def _resolve(name: str) -> str | None:
    """The project module an import names (`from a.b import c` may name module a.b.c or a name in a.b)."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _imports(module: str, path: Path) -> list[tuple[str, int, bool]]:
    """(imported project module, line, lazy) for every import statement in the file."""
    tree = ast.parse(path.read_text(), filename=str(path))
    top_level = {id(node) for node in tree.body}
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the package, `level - 1` parents up
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            targets = [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        for target in targets:
            resolved = _resolve(target)
            if resolved is not None and resolved != module:
                found.append((resolved, node.lineno, id(node) not in top_level))
    return found


def _unit(module: str) -> str:
    """`jaxbig.train.loop` -> `jaxbig.train`; `jaxbig.config` -> itself; `scripts.train` -> `scripts`."""
    parts = module.split(".")
    if parts[0] != "jaxbig":
        return parts[0]
    return ".".join(parts[:2])


EDGES = {module: _imports(module, path) for module, path in MODULES.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A cycle in `graph` as [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1 on the current path, 2 done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_cycle_finder_finds_cycles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_the_parser_sees_known_imports_lazy_ones_included():
    # parallel.rules installs the model's constrain hook; scripts/train.py imports the loop inside main().
    assert ("jaxbig.models", False) in {(m, lazy) for m, _, lazy in EDGES["jaxbig.parallel.rules"]}
    assert ("jaxbig.train.loop", True) in {(m, lazy) for m, _, lazy in EDGES["scripts.train"]}
    assert all(_unit(m) in LAYER for m in MODULES), sorted({_unit(m) for m in MODULES} - set(LAYER))


def test_no_import_cycle_between_packages():
    graph: dict[str, set[str]] = {}
    for module, imports in EDGES.items():
        for target, _, _ in imports:
            if _unit(target) != _unit(module):
                graph.setdefault(_unit(module), set()).add(_unit(target))
    assert find_cycle(graph) is None, f"import cycle between packages: {' -> '.join(find_cycle(graph))}"


def test_no_import_cycle_between_modules():
    """Within a package too (a parent package's __init__ runs before its submodules, so edges to it are left out)."""
    graph: dict[str, set[str]] = {}
    for module, imports in EDGES.items():
        for target, _, _ in imports:
            if not module.startswith(target + "."):
                graph.setdefault(module, set()).add(target)
    assert find_cycle(graph) is None, f"import cycle: {' -> '.join(find_cycle(graph))}"


@pytest.mark.parametrize("unit", sorted(LAYER))
def test_imports_run_one_way(unit):
    bad = []
    for module, imports in EDGES.items():
        if _unit(module) != unit:
            continue
        for target, line, _ in imports:
            other = _unit(target)
            if other != unit and (LAYER[other] > LAYER[unit] or other in FORBIDDEN.get(unit, set())):
                bad.append(f"{MODULES[module].relative_to(REPO)}:{line} imports {target}")
    bad = sorted(set(bad))  # `from m import a, b` names m once per name
    assert not bad, "imports against the direction (see this file's docstring):\n" + "\n".join(bad)


# serve/ and export/ import TensorFlow (and its protos) where it is used, as their package docstrings say; their
# lazy imports of other libraries are not commented one by one. Lazy imports of jaxbig modules are, everywhere.
THIRD_PARTY_LAZY_DOCUMENTED_BY_PACKAGE = ("jaxbig.serve", "jaxbig.export")


def test_each_lazy_import_says_why():
    """A lazy import only to break a cycle is a design bug (the cycle tests above would fail); the others say their reason."""
    silent = []
    for module, path in MODULES.items():
        if not module.startswith("jaxbig"):
            continue
        lines = path.read_text().splitlines()
        tree = ast.parse("\n".join(lines))
        top_level = {id(node) for node in tree.body}
        for node in ast.walk(tree):
            if not isinstance(node, (ast.Import, ast.ImportFrom)) or id(node) in top_level:
                continue
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            ours = any(n.startswith("jaxbig") for n in names) or (isinstance(node, ast.ImportFrom) and node.level > 0)
            if not ours and module.startswith(THIRD_PARTY_LAZY_DOCUMENTED_BY_PACKAGE):
                continue
            # Said on the import's line, in the block of imports it belongs to, or in a comment line just above that block.
            line = node.lineno
            start = line - 1
            while start > 0 and lines[start - 1].strip().startswith(("from ", "import ")):
                start -= 1
            if not any("#" in text for text in lines[start:line]) and not lines[start - 1].strip().startswith("#"):
                silent.append(f"{path.relative_to(REPO)}:{line} imports {', '.join(names)} lazily without saying why")
    assert not silent, "\n".join(silent)
