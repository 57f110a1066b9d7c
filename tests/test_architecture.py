"""The shape of reproq's import graph: no cycles, and the runtime never imports the web layer.

The graph is read from the source with `ast` (nothing is imported): every ``import`` and
``from ... import`` of a reproq module, at module level and inside functions (a lazy import is
still a dependency), where ``from pkg import name`` also counts as importing ``pkg.name`` when
that is a module. Migrations are left out (Django loads them, nothing imports them).

As in Python, ``from . import x`` also imports the package itself (its ``__init__`` runs first):
inside a package whose ``__init__`` imports the module, write ``from .x import name`` instead.

Imports under ``if TYPE_CHECKING:`` never execute, so the cycle check **excludes** them (they
are annotations, not dependencies at run time). The runtime/asgi rule includes them: no module
under ``reproq/runtime`` mentions ``reproq.asgi`` in any import at all.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "reproq"


def _type_checking(node: ast.AST) -> bool:
    test = getattr(node, "test", None)
    return isinstance(node, ast.If) and (
        (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING")
        or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"))


def modules(root: Path = PACKAGE) -> dict[str, Path]:
    """Every module of the package under `root`, by dotted name (migrations left out)."""
    out: dict[str, Path] = {}
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root.parent).with_suffix("")
        if "migrations" in rel.parts:
            continue
        out[".".join(rel.parts).removesuffix(".__init__")] = path
    return out


def imported(path: Path, module: str, *, type_only: bool) -> set[str]:
    """Dotted names `module` (at `path`) imports from its own top-level package; with
    `type_only`, imports under ``if TYPE_CHECKING:`` count too."""
    top = module.split(".")[0]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if _type_checking(node) and not type_only:
            return
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == top)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = parts[: len(parts) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] == top:
                found.add(target)
                found.update(f"{target}.{a.name}" for a in node.names)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text(encoding="utf-8")))
    return found


def graph(root: Path = PACKAGE, *, type_only: bool = False) -> dict[str, set[str]]:
    mods = modules(root)
    return {name: {t for t in imported(p, name, type_only=type_only) if t in mods and t != name}
            for name, p in mods.items()}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []
    for start in sorted(edges):
        if start in index:
            continue
        work = [(start, iter(sorted(edges[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            v, children = work[-1]
            for w in children:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(edges.get(w, ())))))
                    break
                if w in on_stack:
                    low[v] = min(low[v], index[w])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[v])
                if low[v] == index[v]:
                    component = []
                    while True:
                        w = stack.pop()
                        on_stack.discard(w)
                        component.append(w)
                        if w == v:
                            break
                    if len(component) > 1:
                        out.append(sorted(component))
    return out


def _describe(found: list[list[str]], edges: dict[str, set[str]]) -> str:
    lines = []
    for component in found:
        members = set(component)
        lines.append(" <-> ".join(component))
        lines += [f"    {a} imports {b}" for a in component for b in sorted(edges[a] & members)]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- the checker


def _package(tmp_path: Path, files: dict[str, str]) -> Path:
    root = tmp_path / "pkg"
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def test_the_check_finds_lazy_and_relative_cycles_and_leaves_type_only_ones_out(tmp_path):
    root = _package(tmp_path, {
        "__init__.py": "",
        "a.py": "from . import b\n",
        "b.py": "def f():\n    from .sub.c import thing\n",  # lazy, two levels
        "sub/__init__.py": "",
        "sub/c.py": "import pkg.a\n",
        "d.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .e import E\n",
        "e.py": "from .d import D\n",
        "migrations/__init__.py": "",
        "migrations/m.py": "from pkg import a\n",
    })
    edges = graph(root)
    assert cycles(edges) == [["pkg.a", "pkg.b", "pkg.sub.c"]]
    assert "pkg.migrations.m" not in edges
    assert cycles(graph(root, type_only=True)) == [["pkg.a", "pkg.b", "pkg.sub.c"],
                                                   ["pkg.d", "pkg.e"]]


# ----------------------------------------------------------------------------- reproq itself


def test_reproq_has_no_import_cycle():
    edges = graph()
    assert len(edges) > 50  # the scan sees the package
    found = cycles(edges)
    assert not found, "import cycles among reproq's modules:\n" + _describe(found, edges)


def test_no_module_under_reproq_runtime_imports_reproq_asgi_even_for_type_checking():
    edges = graph(type_only=True)
    offenders = {m: sorted(t for t in targets if t == "reproq.asgi" or t.startswith("reproq.asgi."))
                 for m, targets in edges.items()
                 if m == "reproq.runtime" or m.startswith("reproq.runtime.")}
    assert not {m: t for m, t in offenders.items() if t}, offenders


def test_reproq_cron_needs_no_model_no_database_and_no_other_reproq_module():
    path = PACKAGE / "cron.py"
    assert imported(path, "reproq.cron", type_only=True) == set()
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    assert {n for n in names if n.split(".")[0] == "django"} == {"django.conf"}  # TIME_ZONE


@pytest.mark.parametrize("module", ["reproq.cron", "reproq.schedules", "reproq.recurring"])
def test_schedule_modules_import_before_django_is_set_up(module):
    """``from reproq.schedules import recurring`` in a tasks module that is imported early."""
    code = (f"import sys, {module}; "
            "assert 'reproq.models' not in sys.modules, 'imported the models'; "
            "assert 'reproq.backend' not in sys.modules, 'imported the backend'")
    done = subprocess.run([sys.executable, "-c", code], cwd=PACKAGE.parent, capture_output=True,
                          text=True, timeout=60, env={"PATH": "", "PYTHONPATH": ""})
    assert done.returncode == 0, done.stderr


def test_reproq_recurring_still_exports_the_names_it_documented_from_their_new_homes():
    from reproq import cron, recurring, schedules

    for name in recurring.__all__:
        home = cron if hasattr(cron, name) else schedules
        assert getattr(recurring, name) is getattr(home, name), name
    assert {"recurring", "run_now", "current_leader", "CronSchedule", "plan", "sync_recurring",
            "InvalidSchedule"} <= set(recurring.__all__)


def test_periodic_task_applies_the_rules_reproq_schedules_provides_and_says_when_they_are_missing(
        monkeypatch):
    from django.core.exceptions import ImproperlyConfigured, ValidationError

    from reproq import models, schedules

    bad = models.PeriodicTask(name="bad", cron_expr="61 * * * *",
                              task_path="tests.testapp.tasks.add")
    with pytest.raises(ValidationError) as refused:
        bad.clean()  # installed by reproq.apps.ReproqConfig.ready
    assert "cron_expr" in refused.value.message_dict
    assert models._rules().validate is schedules.validate_schedule
    monkeypatch.setattr(models, "_schedule_rules", None)
    with pytest.raises(ImproperlyConfigured, match="INSTALLED_APPS"):
        bad.clean()
    with pytest.raises(ImproperlyConfigured, match="INSTALLED_APPS"):
        bad.save()
