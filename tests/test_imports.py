"""Import direction of the package, read from the source with `ast` (nothing is imported): each module
imports only from its own unit or from units below it, there are no import cycles, and no module is
longer than MAX_LINES. The checker works on a plain graph {module: set(imported modules)}, so it is
tested on synthetic graphs (it must fail there) as well as on the real package."""

import ast
from collections import deque
from pathlib import Path

import pytest

from tests.conftest import ROOT

PACKAGE = "lwm_jax"
MAX_LINES = 400

# The units, lowest first. A module belongs to the longest unit name that equals it or is a dotted
# prefix of it (`lwm_jax.config` covers `lwm_jax.config.schema`); the bare package name covers only
# `lwm_jax/__init__.py`. A module may import from its own unit and from any lower level; units on the
# same level are peers and may import one another only where PEER_IMPORTS allows it.
LEVELS: list[tuple[str, ...]] = [
    ("lwm_jax", "lwm_jax.errors", "lwm_jax.outputs", "lwm_jax.progress"),
    ("lwm_jax.config", "lwm_jax.hardware"),
    ("lwm_jax.data", "lwm_jax.attention", "lwm_jax.parallel"),
    ("lwm_jax.model",),
    ("lwm_jax.train",),
    ("lwm_jax.convert", "lwm_jax.doctor", "lwm_jax.eval", "lwm_jax.generate", "lwm_jax.planner"),
    ("lwm_jax.cli",),
]

# importer unit -> the peer units (same level) it may import; a peer not listed here imports none.
PEER_IMPORTS: dict[str, set[str]] = {
    "lwm_jax.outputs": {"lwm_jax.errors"},
    "lwm_jax.attention": {"lwm_jax.parallel"},
    "lwm_jax.data": set(),
    "lwm_jax.parallel": set(),
    "lwm_jax.eval": {"lwm_jax.generate"},
    "lwm_jax.doctor": {"lwm_jax.planner"},
    "lwm_jax.convert": set(),
}

LEVEL = {unit: level for level, units in enumerate(LEVELS) for unit in units}


# --- the checker: pure functions over a graph ------------------------------------------------------


def unit_of(module: str) -> str | None:
    """The unit a module belongs to, or None when the table does not place it."""
    if module == PACKAGE:
        return PACKAGE
    best = None
    for unit in LEVEL:
        if unit != PACKAGE and (module == unit or module.startswith(unit + ".")):
            best = unit if best is None or len(unit) > len(best) else best
    return best


def layer_violations(graph: dict[str, set[str]], sites: dict[tuple[str, str], str] | None = None) -> list[str]:
    """Imports that go up the table or sideways without a PEER_IMPORTS entry, and modules (importers
    or imported) that the table does not place. `sites` maps (importer, imported) to 'file:line'."""
    sites = sites or {}
    problems = []
    for module in sorted(set(graph) | {m for deps in graph.values() for m in deps}):
        if unit_of(module) is None:
            problems.append(f"{module}: not placed in LEVELS (add its unit to the table in this test)")
    for src in sorted(graph):
        src_unit = unit_of(src)
        for dst in sorted(graph[src]):
            dst_unit = unit_of(dst)
            if src_unit is None or dst_unit is None or src_unit == dst_unit:
                continue
            where = f" ({sites[src, dst]})" if (src, dst) in sites else ""
            src_level, dst_level = LEVEL[src_unit], LEVEL[dst_unit]
            if dst_level > src_level:
                problems.append(f"{src} -> {dst}: upward import, level {src_level} -> {dst_level}{where}")
            elif dst_level == src_level and dst_unit not in PEER_IMPORTS.get(src_unit, set()):
                problems.append(f"{src} -> {dst}: peer import {src_unit} -> {dst_unit} not allowed "
                                f"by PEER_IMPORTS{where}")
    return problems


def import_cycles(graph: dict[str, set[str]]) -> list[tuple[list[str], list[str]]]:
    """The strongly connected components with more than one module (or a module importing itself):
    (its members, one shortest cycle [a, b, ..., a] through its first member). Function-local
    imports count: a cycle that only works because one side imports late is still a cycle."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[set[str]] = []

    def connect(v: str) -> None:  # Tarjan; the package graph is small enough for recursion
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1 or v in graph.get(v, ()):
                components.append(component)

    for v in sorted(graph):
        if v not in index:
            connect(v)

    return sorted((sorted(c), _shortest_cycle(graph, c)) for c in components)


def _shortest_cycle(graph: dict[str, set[str]], component: set[str]) -> list[str]:
    """One shortest cycle [a, b, ..., a] through the component's first member, by BFS."""
    start = min(component)
    parent: dict[str, str | None] = {start: None}
    queue = deque([start])
    while queue:
        v = queue.popleft()
        if start in graph.get(v, ()):
            path = [v]
            while parent[path[-1]] is not None:
                path.append(parent[path[-1]])
            return [*reversed(path), start]
        for w in sorted(graph.get(v, ())):
            if w in component and w not in parent:
                parent[w] = v
                queue.append(w)
    return [start, start]


def long_modules(lines: dict[str, int], limit: int = MAX_LINES) -> list[str]:
    return [f"{module}: {n} lines (limit {limit})" for module, n in sorted(lines.items()) if n > limit]


def check(graph: dict[str, set[str]], lines: dict[str, int],
          sites: dict[tuple[str, str], str] | None = None) -> list[str]:
    """Every problem, one line each; empty when the package is in order."""
    return ([f"layering: {p}" for p in layer_violations(graph, sites)]
            + [f"cycle among {', '.join(members)}: e.g. {' -> '.join(c)}" for members, c in import_cycles(graph)]
            + [f"too long: {p}" for p in long_modules(lines)])


# --- reading the package ---------------------------------------------------------------------------


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.AST):
    """Every Import / ImportFrom node, in functions too, skipping `if TYPE_CHECKING:` bodies."""
    todo = [tree]
    while todo:
        node = todo.pop()
        if isinstance(node, ast.Import | ast.ImportFrom):
            yield node
        elif isinstance(node, ast.If) and _is_type_checking(node.test):
            todo.extend(node.orelse)
        else:
            todo.extend(ast.iter_child_nodes(node))


def read_package(root: Path, package: str = PACKAGE):
    """(graph, lines, sites, shadowed) for the package under `root`: graph {module: set(imported
    package modules)}, lines {module: line count}, sites {(importer, imported): 'path:line'}, and the
    files Python never imports because a package of the same name wins (`x.py` beside `x/`).
    `from p import x` is an import of module `p.x` when that module exists, else of `p`."""
    files: dict[str, Path] = {}
    shadowed = []
    for p in sorted((root / package).rglob("*.py"), key=lambda p: p.name != "__init__.py"):
        name = module_name(p, root)
        if name in files:  # the package's __init__.py was sorted first: it is what `import` loads
            shadowed.append(f"{p.relative_to(root)}: never imported, the package "
                            f"{files[name].parent.relative_to(root)}/ takes the name {name}")
        else:
            files[name] = p
    graph: dict[str, set[str]] = {m: set() for m in files}
    sites: dict[tuple[str, str], str] = {}
    lines = {}
    for module, path in files.items():
        text = path.read_text(encoding="utf-8")
        lines[module] = len(text.splitlines())
        is_package = path.name == "__init__.py"
        for node in sorted(_imports(ast.parse(text, filename=str(path))), key=lambda n: n.lineno):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                base = node.module or ""
                if node.level:  # relative: resolve against the importing module's package
                    anchor = module.split(".") if is_package else module.split(".")[:-1]
                    anchor = anchor[: len(anchor) - (node.level - 1)]
                    base = ".".join(anchor + ([base] if base else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in files else base for a in node.names]
            for target in targets:
                if target == package or target.startswith(package + "."):
                    graph[module].add(target)
                    sites.setdefault((module, target), f"{path.relative_to(root)}:{node.lineno}")
    return graph, lines, sites, shadowed


# --- the checker must fail on bad graphs -----------------------------------------------------------


def test_checker_reports_an_upward_import():
    graph = {"lwm_jax.errors": set(), "lwm_jax.config": {"lwm_jax.errors"},
             "lwm_jax.train.runner": {"lwm_jax.config", "lwm_jax.eval.perplexity"},
             "lwm_jax.eval.perplexity": {"lwm_jax.config"}}
    problems = check(graph, {}, {("lwm_jax.train.runner", "lwm_jax.eval.perplexity"): "runner.py:7"})
    assert problems == ["layering: lwm_jax.train.runner -> lwm_jax.eval.perplexity: upward import, "
                        "level 4 -> 5 (runner.py:7)"]


def test_checker_applies_the_peer_table():
    graph = {"lwm_jax.attention.ring": {"lwm_jax.parallel.mesh"},  # allowed
             "lwm_jax.parallel.mesh": {"lwm_jax.attention"},  # the wrong way
             "lwm_jax.data.pipeline": {"lwm_jax.parallel.mesh"},  # data imports no peer
             "lwm_jax.eval.niah": {"lwm_jax.generate"},  # allowed
             "lwm_jax.generate": {"lwm_jax.eval.scoring"},  # the wrong way
             "lwm_jax.eval.scoring": set(), "lwm_jax.attention": set()}
    problems = layer_violations(graph)
    assert [p.split(":")[0] for p in problems] == [
        "lwm_jax.data.pipeline -> lwm_jax.parallel.mesh", "lwm_jax.generate -> lwm_jax.eval.scoring",
        "lwm_jax.parallel.mesh -> lwm_jax.attention"]
    assert all("peer import" in p for p in problems)


def test_checker_reports_unplaced_modules():
    graph = {"lwm_jax.newthing": {"lwm_jax.errors"}, "lwm_jax.errors": set(), "lwm_jax.cli": {"lwm_jax.other"}}
    assert layer_violations(graph) == [
        "lwm_jax.newthing: not placed in LEVELS (add its unit to the table in this test)",
        "lwm_jax.other: not placed in LEVELS (add its unit to the table in this test)"]


def test_checker_reports_a_cycle_and_long_modules():
    graph = {"lwm_jax.config": {"lwm_jax.data.config"},  # a cycle that is also an upward import
             "lwm_jax.data.config": {"lwm_jax.config"},
             "lwm_jax.model.a": {"lwm_jax.model.b"}, "lwm_jax.model.b": {"lwm_jax.model.c"},
             "lwm_jax.model.c": {"lwm_jax.model.a"},  # a cycle inside one unit
             "lwm_jax.train.x": {"lwm_jax.model.a"}}
    graph["lwm_jax.model.b"].add("lwm_jax.model.a")
    assert import_cycles(graph) == [
        (["lwm_jax.config", "lwm_jax.data.config"], ["lwm_jax.config", "lwm_jax.data.config", "lwm_jax.config"]),
        (["lwm_jax.model.a", "lwm_jax.model.b", "lwm_jax.model.c"],
         ["lwm_jax.model.a", "lwm_jax.model.b", "lwm_jax.model.a"])]  # the shortest cycle through a
    problems = check(graph, {"lwm_jax.cli": 401, "lwm_jax.errors": 400})
    assert "layering: lwm_jax.config -> lwm_jax.data.config: upward import, level 1 -> 2" in problems
    assert ("cycle among lwm_jax.config, lwm_jax.data.config: e.g. lwm_jax.config -> lwm_jax.data.config -> "
            "lwm_jax.config") in problems
    assert problems[-1] == "too long: lwm_jax.cli: 401 lines (limit 400)"
    assert len(problems) == 4


def test_reader_finds_every_kind_of_import(tmp_path):
    files = {
        "lwm_jax/__init__.py": "",
        "lwm_jax/errors.py": "import os\n",
        "lwm_jax/config/__init__.py": "from .schema import X\nfrom . import model\n",
        "lwm_jax/config/schema.py": "from ..errors import UserError\n",
        "lwm_jax/config/model.py": "import lwm_jax.errors as e\n",
        "lwm_jax/data/__init__.py": "",
        "lwm_jax/data/config.py": ("from typing import TYPE_CHECKING\n"
                                   "if TYPE_CHECKING:\n    from lwm_jax.train import Nope\n"
                                   "def f():\n    from lwm_jax.config import X\n"),
        "lwm_jax/train.py": "from lwm_jax import errors, __version__\n" + "x = 1\n" * 400,
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    graph, lines, sites, shadowed = read_package(tmp_path)
    assert graph == {"lwm_jax": set(), "lwm_jax.errors": set(),
                     "lwm_jax.config": {"lwm_jax.config.schema", "lwm_jax.config.model"},
                     "lwm_jax.config.schema": {"lwm_jax.errors"}, "lwm_jax.config.model": {"lwm_jax.errors"},
                     "lwm_jax.data": set(), "lwm_jax.data.config": {"lwm_jax.config"},
                     "lwm_jax.train": {"lwm_jax.errors", "lwm_jax"}}
    assert sites["lwm_jax.data.config", "lwm_jax.config"] == "lwm_jax/data/config.py:5"
    assert check(graph, lines, sites) == ["too long: lwm_jax.train: 401 lines (limit 400)"]
    assert shadowed == []
    (tmp_path / "lwm_jax/config.py").write_text("from lwm_jax.cli import main\n")  # beside config/
    graph, lines, sites, shadowed = read_package(tmp_path)
    assert shadowed == [
        "lwm_jax/config.py: never imported, the package lwm_jax/config/ takes the name lwm_jax.config"]
    assert graph["lwm_jax.config"] == {"lwm_jax.config.schema", "lwm_jax.config.model"}


# --- the real package ------------------------------------------------------------------------------


def test_every_unit_in_the_tables_is_known():
    assert set(PEER_IMPORTS) <= set(LEVEL)
    for unit, peers in PEER_IMPORTS.items():
        assert all(LEVEL[p] == LEVEL[unit] for p in peers), unit


def test_package_import_direction():
    graph, lines, sites, shadowed = read_package(ROOT)
    assert len(graph) > 10
    problems = [f"shadowed: {s}" for s in shadowed] + check(graph, lines, sites)
    if problems:
        pytest.fail(f"{len(problems)} import-structure problem(s) in {PACKAGE} "
                    f"(units, peers and limits at the top of tests/test_imports.py):\n  "
                    + "\n  ".join(problems), pytrace=False)
