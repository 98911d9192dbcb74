"""Layering rules of src/dsv3, checked on the source with ``ast`` (nothing is imported):

- the module import graph has no cycle: every ``import`` / ``from ... import`` counts, at module
  level and inside functions alike (a function-level import only defers a cycle, it doesn't remove
  it); imports under ``if TYPE_CHECKING:`` don't run and don't count;
- neither has the package graph: the subpackages of dsv3 (``dsv3.engine``, ``dsv3.train``, ...) and
  its top-level modules are the nodes, and a module's import is an edge between their packages, so
  ``engine`` importing ``quant`` while ``quant`` imports ``engine`` is a cycle even when no two
  modules import each other (the layers are: a package builds on the ones below it, never the
  reverse);
- no module imports another module's private name (``from X import _name`` or ``X._name`` on an
  imported dsv3 module): what a module shares is public and documented;
- no ``obj.__class__ = ...``: fast paths are applied by explicit module replacement (dsv3.replace).
"""

from __future__ import annotations

import ast
from dataclasses import dataclass, field
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent / "src"

# Private names still imported across modules, each with the module that imports it. Every entry
# must still occur (the test fails on a stale one, so the list only shrinks); don't add to it.
KNOWN_PRIVATE_IMPORTS: set[tuple[str, str]] = set()


@dataclass
class Module:
    name: str
    path: Path
    is_package: bool
    imports: dict[str, int] = field(default_factory=dict)        # imported dsv3 module -> first line
    private: list[tuple[int, str]] = field(default_factory=list)  # (line, "dsv3.x._name")
    class_assignments: list[int] = field(default_factory=list)    # lines of `... .__class__ = ...`


def _modules() -> dict[str, Module]:
    out = {}
    for path in sorted((SRC / "dsv3").rglob("*.py")):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        if is_package:
            parts = parts[:-1]
        out[".".join(parts)] = Module(".".join(parts), path, is_package)
    return out


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _owner(name: str, modules: dict[str, Module]) -> str | None:
    """The module that defines dotted ``name`` (itself a module, or an attribute of its longest module prefix)."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def _is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _scan(mod: Module, modules: dict[str, Module]) -> None:
    tree = ast.parse(mod.path.read_text(), filename=str(mod.path))
    package = mod.name if mod.is_package else mod.name.rpartition(".")[0]
    aliases: dict[str, str] = {}  # local name -> the dsv3 module it is bound to

    def add(target: str, line: int) -> None:
        if target != mod.name:
            mod.imports.setdefault(target, line)

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            for a in node.names:
                owner = _owner(a.name, modules) if a.name.split(".")[0] == "dsv3" else None
                if owner:
                    add(owner, node.lineno)
                    if a.asname:
                        aliases[a.asname] = owner
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            if source.split(".")[0] == "dsv3":
                for a in node.names:
                    full = f"{source}.{a.name}"
                    if full in modules:                    # `from pkg import submodule`
                        add(full, node.lineno)
                        aliases[a.asname or a.name] = full
                        continue
                    owner = _owner(source, modules)
                    add(owner, node.lineno)
                    if _is_private(a.name) and owner != mod.name:
                        mod.private.append((node.lineno, f"{owner}.{a.name}"))
        elif isinstance(node, ast.Call) and _is_import_module(node):
            # importlib.import_module("dsv3.x") with a literal name: a dynamic import, same edge
            target = _owner(node.args[0].value, modules)
            if target:
                add(target, node.lineno)
        elif (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases
              and _is_private(node.attr) and f"{aliases[node.value.id]}.{node.attr}" not in modules):
            mod.private.append((node.lineno, f"{aliases[node.value.id]}.{node.attr}"))
        elif isinstance(node, (ast.Assign, ast.AugAssign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            if any(isinstance(t, ast.Attribute) and t.attr == "__class__" for t in targets):
                mod.class_assignments.append(node.lineno)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    # setattr(obj, "__class__", cls) is the same swap spelled differently
    for node in ast.walk(tree):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "setattr"
                and len(node.args) >= 2 and isinstance(node.args[1], ast.Constant) and node.args[1].value == "__class__"):
            mod.class_assignments.append(node.lineno)


def _is_import_module(node: ast.Call) -> bool:
    f = node.func
    named = (isinstance(f, ast.Attribute) and f.attr == "import_module") or (
        isinstance(f, ast.Name) and f.id == "import_module")
    return named and len(node.args) >= 1 and isinstance(node.args[0], ast.Constant) and isinstance(
        node.args[0].value, str) and node.args[0].value.startswith("dsv3")


def _graph() -> dict[str, Module]:
    modules = _modules()
    for mod in modules.values():
        _scan(mod, modules)
    return modules


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                connect(w)
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
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            connect(v)
    return found


def _one_cycle(component: list[str], edges: dict[str, set[str]], modules: dict[str, Module]) -> str:
    """A concrete cycle inside ``component``, as ``a (line) -> b (line) -> ... -> a``."""
    members = set(component)
    start = component[0]
    path, seen = [start], {start}
    while True:  # every module of a strongly connected component has an edge back into it
        nxt = sorted(w for w in edges[path[-1]] if w in members)
        back = [w for w in nxt if w in seen]
        step = back[0] if back else nxt[0]
        if step in seen:
            path = path[path.index(step):] + [step]
            break
        path.append(step)
        seen.add(step)
    return " -> ".join(f"{a} (line {modules[a].imports[b]})" for a, b in zip(path, path[1:])) + f" -> {path[-1]}"


def test_the_scanner_sees_every_kind_of_import():
    # The rules are only as good as the scan: check it on the real tree's known edges.
    modules = _graph()
    assert "dsv3.hf_layout" in modules["dsv3.checkpoint"].imports            # module level, relative
    assert "dsv3.quant.linear" in modules["dsv3.quant"].imports              # inside __getattr__
    assert "dsv3.tasks" in modules["dsv3.eval.tasks"].imports           # inside a function
    assert "dsv3.fp8" in modules["dsv3.train.fp8"].imports                   # `from .. import fp8`
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycles():
    modules = _graph()
    edges = {name: set(mod.imports) for name, mod in modules.items()}
    cycles = _cycles(edges)
    assert not cycles, "import cycle(s) in src/dsv3:\n" + "\n".join(_one_cycle(c, edges, modules) for c in cycles)


def package_of(module: str) -> str:
    """The node of ``module`` in the package graph: ``dsv3.<first name>`` (a subpackage or a top-level
    module), or ``dsv3`` itself for the package's ``__init__``."""
    parts = module.split(".")
    return ".".join(parts[:2])


def package_graph(modules: dict[str, Module]) -> tuple[dict[str, set[str]], dict[tuple[str, str], str]]:
    """Edges between packages, and for each edge one module import that makes it (``a -> b (line n)``)."""
    edges: dict[str, set[str]] = {}
    why: dict[tuple[str, str], str] = {}
    for name, mod in sorted(modules.items()):
        a = package_of(name)
        for target, line in sorted(mod.imports.items()):
            b = package_of(target)
            if a != b:
                edges.setdefault(a, set()).add(b)
                why.setdefault((a, b), f"{name} -> {target} (line {line})")
    return edges, why


def test_package_graph_rule_on_a_made_up_tree():
    # The rule itself: modules that never import each other still make a package cycle.
    imports = {"dsv3.engine.llm": {"dsv3.quant.linear": 3}, "dsv3.quant.quality": {"dsv3.engine": 9},
               "dsv3.quant.linear": {}, "dsv3.engine": {}, "dsv3.cli.x": {"dsv3.engine.llm": 1}}
    modules = {n: Module(n, Path(n), False, dict(i)) for n, i in imports.items()}
    assert _cycles({n: set(m.imports) for n, m in modules.items()}) == []
    edges, why = package_graph(modules)
    assert _cycles(edges) == [["dsv3.engine", "dsv3.quant"]]
    assert why[("dsv3.quant", "dsv3.engine")] == "dsv3.quant.quality -> dsv3.engine (line 9)"
    assert package_of("dsv3") == "dsv3" and package_of("dsv3.tasks") == "dsv3.tasks"


def test_no_package_import_cycles():
    edges, why = package_graph(_graph())
    cycles = _cycles(edges)
    lines = []
    for component in cycles:
        members = set(component)
        lines.append(" <-> ".join(component) + ":")
        lines += [f"    {why[(a, b)]}" for a in component for b in sorted(edges.get(a, ())) if b in members]
    assert not cycles, "package import cycle(s) in src/dsv3 (move what is shared below both):\n" + "\n".join(lines)


def test_no_private_names_across_modules():
    modules = _graph()
    found = {(mod.name, name): line for mod in modules.values() for line, name in mod.private}
    new = sorted(f"{modules[m].path.relative_to(SRC)}:{line} uses {name}" for (m, name), line in found.items()
                 if (m, name) not in KNOWN_PRIVATE_IMPORTS)
    assert not new, "private names used across modules (make them public, or keep them in one module):\n" + "\n".join(new)
    stale = sorted(f"{m} -> {name}" for m, name in KNOWN_PRIVATE_IMPORTS - set(found))
    assert not stale, "fixed, delete from KNOWN_PRIVATE_IMPORTS in tests/test_imports.py: " + ", ".join(stale)


def test_no_class_reassignment():
    modules = _graph()
    found = [f"{mod.path.relative_to(SRC)}:{line}" for mod in modules.values() for line in mod.class_assignments]
    assert not found, ("`__class__` assignment (apply a fast path by module replacement, dsv3.replace): "
                       + ", ".join(found))
