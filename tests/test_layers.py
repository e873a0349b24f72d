"""The package's imports point one way: kit → stages → orchestration (STYLE.md 13).

Walks every ``import`` of every module (module level *and* inside functions: a lazy import
is still a dependency) with ``ast`` and fails on an import that climbs a layer, on a stage
reaching into another package's ``_private`` name, and on any import cycle, naming the
modules.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "raypipe"

#: lower rank = lower floor; a module may import only modules of its own rank or below.
#: Stages are ordered too (atlas < llm < genes < embed < annotate < evaluate).
RANKS = {
    "raypipe.errors": 0,
    "raypipe.registry": 0,
    "raypipe.config": 0,
    "raypipe.core": 1,
    "raypipe.atlas": 2,
    "raypipe.llm": 3,
    "raypipe.genes": 4,
    "raypipe.embed": 5,
    "raypipe.annotate": 6,
    "raypipe.evaluate": 7,
    "raypipe.orchestrate": 8,
    "raypipe.bench": 8,
    "raypipe.cli": 8,
    "raypipe.docs_gen": 8,
    "raypipe.__main__": 8,
    "raypipe.api": 8,
    "raypipe": 8,
}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PKG.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _layer(module: str) -> str:
    best = ""
    for prefix in RANKS:
        if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > len(best):
            best = prefix
    assert best, f"{module} is on no floor: add its package to RANKS in tests/test_layers.py"
    return best


def _imports() -> dict[str, list[tuple[str, list[str], int]]]:
    """Module → [(imported module, names imported, line)]."""
    out: dict[str, list[tuple[str, list[str], int]]] = {}
    for path in sorted(PKG.rglob("*.py")):
        mod = _module_name(path)
        tree = ast.parse(path.read_text(), filename=str(path))
        found = []
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                if node.module == "raypipe" or node.module.startswith("raypipe."):
                    found.append((node.module, [a.name for a in node.names], node.lineno))
            elif isinstance(node, ast.Import):
                for a in node.names:
                    if a.name == "raypipe" or a.name.startswith("raypipe."):
                        found.append((a.name, [], node.lineno))
        out[mod] = found
    return out


IMPORTS = _imports()


def _resolve(target: str, names: list[str]) -> list[str]:
    """``from raypipe.x import y`` imports module ``raypipe.x.y`` when that is a module."""
    mods = [target]
    for n in names:
        if f"{target}.{n}" in IMPORTS:
            mods.append(f"{target}.{n}")
    return mods


def test_every_module_is_on_a_floor():
    for mod in IMPORTS:
        _layer(mod)


def test_no_import_climbs_a_floor():
    bad = []
    for mod, deps in IMPORTS.items():
        lo = RANKS[_layer(mod)]
        for target, _names, line in deps:
            if target == "raypipe" and _names == ["__version__"]:
                continue  # the version string, not the package's API
            hi = RANKS[_layer(target)]
            if hi > lo:
                bad.append(f"{mod}:{line} imports {target} (floor {hi} > {lo})")
    assert not bad, "upward imports:\n" + "\n".join(bad)


def test_no_stage_uses_another_packages_private_names():
    bad = []
    for mod, deps in IMPORTS.items():
        for target, names, line in deps:
            if _layer(target) == _layer(mod):
                continue
            private = [n for n in names if n.startswith("_") and n != "__version__"]
            if private:
                bad.append(f"{mod}:{line} imports {private} from {target}")
    assert not bad, "private names used across packages:\n" + "\n".join(bad)


def test_no_import_cycles():
    graph: dict[str, set[str]] = {m: set() for m in IMPORTS}
    for mod, deps in IMPORTS.items():
        for target, names, _line in deps:
            for t in _resolve(target, names):
                if t in graph and t != mod and not _is_package_of(t, mod):
                    graph[mod].add(t)
    cycles = []
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join([*stack[stack.index(nxt) :], nxt]))
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def _is_package_of(pkg: str, mod: str) -> bool:
    """A package ``__init__`` re-exporting its own modules is not a cycle with them."""
    return mod.startswith(pkg + ".")


@pytest.mark.parametrize("mod", ["raypipe.core.stage", "raypipe.core.ledger"])
def test_the_kit_imports_no_stage(mod):
    if mod not in IMPORTS:
        pytest.skip(f"{mod} does not exist")
    for target, _names, line in IMPORTS[mod]:
        assert RANKS[_layer(target)] <= 1, f"{mod}:{line} imports the stage {target}"


def test_no_module_is_a_catch_all():
    """Modules stay well under ~500 lines (STYLE.md 1): a longer one holds two things."""
    long = {
        _module_name(p): n
        for p in PKG.rglob("*.py")
        if (n := len(p.read_text().splitlines())) > 500
    }
    assert not long, f"split these modules: {long}"
