"""The one exception tree: every exception class lives in exceptions.py, under HaipError, drawn in its docstring."""

from __future__ import annotations

import ast
import re

from haip_runtime import exceptions
from tests.support.serving import ROOT

PACKAGE = ROOT / "haip_runtime"


def test_no_module_but_exceptions_defines_an_exception_class() -> None:
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.name == "exceptions.py" and path.parent == PACKAGE:
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ClassDef):
                bases = {ast.unparse(base).rpartition(".")[2] for base in node.bases}
                if any(b.endswith(("Error", "Exception")) or b in exceptions.__all__ for b in bases):
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name}")
    assert found == []


def test_every_exception_is_a_haip_error_and_drawn_in_the_tree() -> None:
    doc = exceptions.__doc__ or ""
    drawn = set(re.findall(r"[├└]── (\w+)", doc))
    for name in exceptions.__all__:
        assert issubclass(getattr(exceptions, name), exceptions.HaipError), name
    assert drawn == set(exceptions.__all__) - {"HaipError"}


def test_each_drawn_parent_is_the_real_parent() -> None:
    parents: list[str] = ["HaipError"]
    for line in (exceptions.__doc__ or "").splitlines():
        match = re.match(r"\s*((?:│   |    )*)[├└]── (\w+)", line)
        if match is None:
            continue
        depth = len(match.group(1)) // 4 + 1
        del parents[depth:]
        name = match.group(2)
        assert getattr(exceptions, name).__bases__ == (getattr(exceptions, parents[-1]),), name
        parents.append(name)
