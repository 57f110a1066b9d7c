"""Every exception class path reproq writes into a run's ``errors`` imports as an exception.

`TaskError.exception_class` imports the stored path: a path naming a class that does not exist
breaks ``result.errors[i].exception_class`` for every reader. Most paths are computed from the
class that was raised (``f"{cls.__module__}.{cls.__qualname__}"``); the ones written as text —
in Python (a dict with an ``exception_class_path`` key) or in SQL (``jsonb_build_object`` in
`reproq.sql`, the migrations' triggers, statements elsewhere) — are found here by scanning the
source, so a new one is checked without anyone listing it.
"""

from __future__ import annotations

import ast
import re
from inspect import isclass
from pathlib import Path

import pytest
from django.tasks.base import TaskError
from django.utils.module_loading import import_string

PACKAGE = Path(__file__).resolve().parent.parent / "reproq"
KEY = "exception_class_path"
# The key quoted inside SQL or JSON text, and what comes before and after it.
QUOTED_KEY = re.compile(r"""(->>?\s*|#>>?\s*)?(['"])exception_class_path\2""")
# Written: 'exception_class_path', 'literal' (jsonb_build_object) or "...": "literal" (JSON).
WRITTEN = re.compile(r"""\s*[,:]\s*(['"])([^'"]*)\1""")


def _sql_writes(text: str) -> tuple[list[str], int]:
    """(literal paths the text writes, quoted mentions that are neither a read nor a literal
    write). Unquoted mentions are prose (docstrings): SQL and JSON quote the key."""
    paths, unknown = [], 0
    for m in QUOTED_KEY.finditer(text):
        if m.group(1):  # ->> 'exception_class_path': a read
            continue
        written = WRITTEN.match(text, m.end())
        if written:
            paths.append(written.group(2))
        else:
            unknown += 1
    return paths, unknown


def _sources() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py"))  # migrations (triggers) included


def _literal(node: ast.AST | None) -> str | None:
    return node.value if isinstance(node, ast.Constant) and isinstance(node.value, str) else None


def written_paths() -> tuple[dict[str, list[str]], list[str]]:
    """({literal path: [where]}, [places that write the key in a form this scan cannot read])."""
    found: dict[str, list[str]] = {}
    unknown: list[str] = []
    for path in _sources():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        rel = path.relative_to(PACKAGE.parent)
        for node in ast.walk(tree):
            where = f"{rel}:{getattr(node, 'lineno', '?')}"
            if isinstance(node, ast.Dict):
                for key, value in zip(node.keys, node.values, strict=True):
                    if _literal(key) == KEY and (text := _literal(value)) is not None:
                        found.setdefault(text, []).append(where)
            elif isinstance(node, ast.Call):
                for kw in node.keywords:
                    if kw.arg == KEY and (text := _literal(kw.value)) is not None:
                        found.setdefault(text, []).append(where)
            elif (text := _literal(node)) is not None and KEY in text and text != KEY:
                paths, unreadable = _sql_writes(text)
                for written in paths:
                    found.setdefault(written, []).append(where)
                if unreadable:
                    unknown.append(where)
    return found, unknown


def test_the_scan_finds_the_paths_reproq_writes_as_text():
    found, unknown = written_paths()
    assert not unknown, (f"{KEY} written in a form this scan does not read (give it a literal "
                         f"class path, or teach the scan): {unknown}")
    # the scan works: these are written as text today (SQL, Python, a split literal)
    assert {"reproq.exceptions.LeaseExpired", "reproq.runtime.completer.UnstorableOutcome",
            "reproq.runtime.executor.TaskCancelled"} <= set(found), sorted(found)


@pytest.mark.parametrize("path", sorted(written_paths()[0]))
def test_each_exception_class_path_written_as_text_imports_as_an_exception(path):
    cls = import_string(path)
    assert isclass(cls) and issubclass(cls, BaseException), path
    assert f"{cls.__module__}.{cls.__qualname__}" == path
    assert cls.__doc__, f"{path}: say what this error means"
    assert TaskError(exception_class_path=path, traceback="").exception_class is cls
