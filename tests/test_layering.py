"""medplan's imports flow one way (issue 12): a walk over every import with ``ast``.

Every ``import`` and ``from ... import`` in medplan (module level, inside functions and
classes, relative ones) becomes an edge between medplan modules. The tests fail on

- a cycle between modules (imports under ``if TYPE_CHECKING:`` are left out: they never run);
- an import against the layer order of :data:`LAYERS` (type-only imports included);
- a module over :data:`MAX_MODULE_LINES` lines or a class over :data:`MAX_CLASS_LINES` lines;
- a function-local medplan import without a comment, on its line or the line before, saying why;
- a private name (``_x``) imported from another medplan module, or a private module imported
  from outside its package.

Modules imported by name at run time are not seen here: each registry loads its own package's
built-in modules (architectures, trainers, planners, importers) on the first lookup.
"""
from __future__ import annotations

import ast
import io
import sys
import tokenize
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import medplan

PACKAGE_DIR = Path(medplan.__file__).resolve().parent

#: Lowest first. A module may import its own layer and the layers before it, never a later one.
#: A module belongs to the layer of its longest listed prefix (a package lists its submodules).
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    # the base: the one error, the name rule, checked reads and atomic writes, the roots, locks,
    # the fold folder; the generic registry, the progress bar, worker pools, safe-load
    # explanations and the paper's pure metric code (used by trainers, inference and evaluation)
    ("root", ("medplan",)),
    ("errors", ("medplan.errors",)),
    ("names", ("medplan.names",)),
    ("io", ("medplan.io", "medplan.registry", "medplan.progress", "medplan.parallel", "medplan.safeload",
            "medplan.metrics", "medplan.catalog")),
    ("paths", ("medplan.paths",)),
    ("locks", ("medplan.locks",)),
    ("rundir", ("medplan.rundir",)),
    # importers, the raw format, RawIndex and the one raw-folder resolver
    ("datasets", ("medplan.datasets",)),
    # the single decoding pass (arrays through a writer handed in) and the duplicate rules
    ("fingerprint", ("medplan.casescan", "medplan.fingerprint", "medplan.duplicates")),
    # fingerprint -> plan; folds; reading plans.json / splits.json back
    ("plan", ("medplan.planners", "medplan.plan", "medplan.splits", "medplan.stagefiles")),
    ("preprocessing", ("medplan.preprocessing",)),
    # nnU-Net interop: reads the plan stage's files (plans, splits, the raw index) to write an
    # nnU-Net dataset, and applies nnU-Net's post-processing rule; below the trainers (a later
    # nnunetv2 trainer exports through it) and inference (medplan_predict applies the rule)
    ("interop", ("medplan.interop",)),
    ("data", ("medplan.data",)),
    ("architectures", ("medplan.architectures",)),
    ("trainers", ("medplan.trainers",)),
    ("inference", ("medplan.inference",)),
    ("evaluation", ("medplan.evaluation",)),
    # the web report (issue 14): reads the results tree through evaluation; the CLI and the
    # study's end call it, so it sits below the drivers
    ("report", ("medplan.report",)),
    # the drivers: plan+preprocess as library calls (pipeline), the demo, Grad-CAM, the study.
    # pipeline orchestrates plan and preprocess, so it sits above preprocessing; it sits here so
    # that no stage (trainers, inference, evaluation) can reach up into it: they read the plan
    # and splits through medplan.stagefiles
    ("drivers", ("medplan.pipeline", "medplan.demo", "medplan.explain", "medplan.study")),
    ("cli", ("medplan.cli",)),
]

MAX_MODULE_LINES = 500
MAX_CLASS_LINES = 250
#: modules allowed over MAX_MODULE_LINES, with the reason
LONG_MODULES: dict[str, str] = {}
#: classes (module:Class) allowed over MAX_CLASS_LINES, with the reason
LONG_CLASSES: dict[str, str] = {}


@dataclass(frozen=True)
class Edge:
    source: str         # importing module
    target: str         # imported medplan module
    name: str           # what the statement names (module or module:attribute)
    line: int
    local: bool         # inside a function or class body
    type_only: bool     # under ``if TYPE_CHECKING:``
    commented: bool     # a comment on the statement's lines or the line before


def _module_name(path: Path) -> tuple[str, bool]:
    rel = path.relative_to(PACKAGE_DIR.parent).with_suffix("")
    parts = list(rel.parts)
    is_package = parts[-1] == "__init__"
    return ".".join(parts[:-1] if is_package else parts), is_package


@lru_cache(maxsize=None)
def modules() -> dict[str, tuple[Path, bool]]:
    out = {}
    for path in sorted(PACKAGE_DIR.rglob("*.py")):
        name, is_package = _module_name(path)
        out[name] = (path, is_package)
    return out


def _existing(name: str) -> str:
    """The longest prefix of ``name`` that is a medplan module."""
    mods = modules()
    while name and name not in mods:
        name = name.rpartition(".")[0]
    return name


def _comment_lines(source: str) -> set[int]:
    lines = set()
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            text = tok.string.lstrip("#").strip()
            if text and not text.startswith(("noqa", "type:")):
                lines.add(tok.start[0])
    return lines


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _walk(node: ast.AST, local: bool, type_only: bool):
    """(import node, local, type_only) for every import below ``node``."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, (ast.Import, ast.ImportFrom)):
            yield child, local, type_only
        elif isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            yield from _walk(child, True, type_only)
        elif isinstance(child, ast.If) and _is_type_checking(child.test):
            for stmt in child.body:
                yield from _walk(ast.Module(body=[stmt], type_ignores=[]), local, True)
            for stmt in child.orelse:
                yield from _walk(ast.Module(body=[stmt], type_ignores=[]), local, type_only)
        else:
            yield from _walk(child, local, type_only)


@lru_cache(maxsize=None)
def edges() -> tuple[Edge, ...]:
    mods = modules()
    out = []
    for module, (path, is_package) in mods.items():
        source = path.read_text(encoding="utf-8")
        comments = _comment_lines(source)
        for node, local, type_only in _walk(ast.parse(source), False, False):
            lines = range(node.lineno - 1, (node.end_lineno or node.lineno) + 1)
            commented = any(n in comments for n in lines)
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name == "medplan" or alias.name.startswith("medplan."):
                        out.append(Edge(module, _existing(alias.name), alias.name, node.lineno, local, type_only,
                                        commented))
                continue
            if node.level:  # relative: from the module's package, one level up per extra dot
                base = module.split(".") if is_package else module.split(".")[:-1]
                base = base[:len(base) - (node.level - 1)]
                full = ".".join(base + ([node.module] if node.module else []))
            else:
                full = node.module or ""
            if full != "medplan" and not full.startswith("medplan."):
                continue
            for alias in node.names:
                sub = f"{full}.{alias.name}"
                target = sub if sub in mods else _existing(full)  # ``from pkg import submodule``
                name = sub if sub in mods else f"{full}:{alias.name}"
                out.append(Edge(module, target, name, node.lineno, local, type_only, commented))
    return tuple(out)


def layer_of(module: str) -> int:
    best, index = "", None
    for i, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > len(best):
                best, index = prefix, i
    assert index is not None, f"{module} is in no layer of LAYERS"
    return index


def _where(edge: Edge) -> str:
    return f"{modules()[edge.source][0].relative_to(PACKAGE_DIR.parent)}:{edge.line}"


# ---------------------------------------------------------------------------- the tests
def test_every_module_has_a_layer_and_sits_no_lower_than_its_package():
    """Importing ``a.b.c`` runs ``a/b/__init__`` first: a submodule below its package's layer
    would pull that layer in."""
    for module in modules():
        layer = layer_of(module)
        parent = module.rpartition(".")[0]
        while parent:
            assert layer_of(parent) <= layer, f"{module} sits below its package {parent}"
            parent = parent.rpartition(".")[0]


def test_imports_follow_the_layer_order():
    wrong = []
    for e in edges():
        if layer_of(e.target) > layer_of(e.source):
            wrong.append(f"{_where(e)}: {e.source} ({LAYERS[layer_of(e.source)][0]}) imports {e.name} "
                         f"({LAYERS[layer_of(e.target)][0]})")
    assert not wrong, "imports against the layer order:\n" + "\n".join(wrong)


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []
    counter = 0
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_no_import_cycles():
    graph: dict[str, set[str]] = {m: set() for m in modules()}
    for e in edges():
        if not e.type_only and e.target != e.source:
            graph[e.source].add(e.target)
    cycles = _cycles(graph)
    lines = []
    for component in cycles:
        members = set(component)
        lines.append(" <-> ".join(component) + ": " + "; ".join(
            f"{_where(e)} {e.source} -> {e.name}" for e in edges()
            if e.source in members and e.target in members and not e.type_only and e.target != e.source))
    assert not cycles, "import cycles:\n" + "\n".join(lines)


def test_function_local_medplan_imports_say_why():
    silent = [f"{_where(e)}: {e.name}" for e in edges() if e.local and not e.commented]
    assert not silent, ("function-local medplan imports without a comment saying why (move them to the "
                        "module's imports, or say why not):\n" + "\n".join(silent))


def _private(part: str) -> bool:
    return part.startswith("_") and not part.startswith("__")


def test_no_private_names_across_modules():
    wrong = []
    for e in edges():
        if e.target == e.source:
            continue
        attr = e.name.partition(":")[2]
        if attr and _private(attr):
            wrong.append(f"{_where(e)}: {e.name}")
        module_parts = e.target.split(".")
        for i, part in enumerate(module_parts):
            package = ".".join(module_parts[:i])
            if _private(part) and not (e.source == package or e.source.startswith(package + ".")):
                wrong.append(f"{_where(e)}: {e.target} (private to {package})")
    assert not wrong, "private names imported from another medplan module:\n" + "\n".join(wrong)


def test_module_and_class_sizes():
    long_modules, long_classes = [], []
    for module, (path, _) in modules().items():
        source = path.read_text(encoding="utf-8")
        n = len(source.splitlines())
        if n > MAX_MODULE_LINES and module not in LONG_MODULES:
            long_modules.append(f"{module}: {n} lines")
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.ClassDef):
                size = (node.end_lineno or node.lineno) - node.lineno + 1
                if size > MAX_CLASS_LINES and f"{module}:{node.name}" not in LONG_CLASSES:
                    long_classes.append(f"{module}:{node.name}: {size} lines")
    assert not long_modules, f"modules over {MAX_MODULE_LINES} lines:\n" + "\n".join(long_modules)
    assert not long_classes, f"classes over {MAX_CLASS_LINES} lines:\n" + "\n".join(long_classes)


def test_listed_exceptions_are_still_needed():
    """An exception that no longer applies is removed from the list, so it cannot hide a new one."""
    mods = modules()
    for module in LONG_MODULES:
        assert module in mods and len(mods[module][0].read_text().splitlines()) > MAX_MODULE_LINES, module
    for qualified in LONG_CLASSES:
        assert qualified.partition(":")[0] in mods, qualified


# ---------------------------------------------------------------------------- the walker itself
def _edges_of(tmp_path: Path, monkeypatch, files: dict[str, str]) -> list[Edge]:
    root = tmp_path / "medplan"
    for name, text in {"__init__.py": "", **files}.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE_DIR", root)
    modules.cache_clear()
    edges.cache_clear()
    try:
        return list(edges())
    finally:
        modules.cache_clear()
        edges.cache_clear()


def test_the_walker_sees_every_kind_of_import(tmp_path, monkeypatch):
    found = _edges_of(tmp_path, monkeypatch, {
        "a.py": "",
        "pkg/__init__.py": "from . import sub\n",
        "pkg/sub.py": ("from typing import TYPE_CHECKING\n"
                       "from ..a import thing\n"
                       "import medplan.a as alias\n"
                       "if TYPE_CHECKING:\n    from medplan.b import B\n"
                       "def f():\n    # why: cycle\n    from medplan.pkg import _private\n"
                       "class C:\n    def g(self):\n        from medplan import a\n"),
        "b.py": "",
    })
    by = {(e.source, e.name): e for e in found}
    assert by[("medplan.pkg", "medplan.pkg.sub")].target == "medplan.pkg.sub"
    assert by[("medplan.pkg.sub", "medplan.a:thing")].target == "medplan.a"
    assert by[("medplan.pkg.sub", "medplan.b:B")].type_only is True
    private = by[("medplan.pkg.sub", "medplan.pkg:_private")]
    assert private.local and private.commented and private.target == "medplan.pkg"
    assert [(e.line, e.local) for e in found if e.source == "medplan.pkg.sub" and e.name == "medplan.a"] == \
        [(3, False), (11, True)]
    assert not next(e for e in found if e.line == 11).commented


def test_the_cycle_finder():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []
